# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 12 · Pipeline parallelism (流水线并行): GPipe and 1F1B by hand
#
# Data parallelism copies the whole model to every GPU; ZeRO and tensor parallelism split every layer. Pipeline
# parallelism splits the model the other way: **by depth**. Stage 0 holds the first blocks, stage 1 the next ones,
# and a batch flows from stage to stage like parts down an assembly line. Each GPU keeps only its stage's weights,
# gradients and optimizer state, and sends only the activations at the cut (one tensor per micro-batch), not every
# layer's weights or gradients. The price is idle time, the **bubble** (气泡): a stage waits for its input in the
# forward pass and for its gradient in the backward pass. Cutting the batch into micro-batches (微批次) and
# ordering their forwards and backwards well (the *schedule*) shrinks it.
#
# This chapter builds both classic schedules and the interleaved one by hand (`dit_core/parallel/schedules.py`,
# `dit_core/parallel/pipeline.py`, `launchers/pipeline.py`), predicts their bubble, measures it from real events,
# shows what each schedule costs in activation memory, and proves that two and four stages train exactly like one
# process, also against PyTorch's own `torch.distributed.pipelining`.

# %%
import os, json, inspect
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.model import DiT, count_parameters
from dit_core.parallel.pipeline import Stage, schedule, simulate, bubble_formula, gpipe, one_f_one_b, interleaved_1f1b
from dit_core.parity import run_launchers, run_here, compare, max_rel, format_table

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=4", "--set", "model.num_heads=2",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.05",     # below the gradient norm: clipping acts at every step
         "--overwrite"]                       # the /tmp/ch12 folders are scratch: a re-run replaces them
os.chdir("..")  # launchers are run from the repository root

# %% [markdown]
# ## 1. Why a DiT can be cut by depth, and what has to cross the cut
#
# A DiT is a chain: patch embedding (+ position), then N identical blocks, then the final layer. Each block reads
# two things: the tokens `h` (B, T, H) from the block before, and the **conditioning vector** `c` (B, H), the
# timestep and label embedding that sets every block's shift, scale and gate (adaLN). So a cut between two blocks
# must pass both forward, and both gradients back: `dc` collects a contribution from every later block.
# `Stage` packs them side by side into one (B, T·H + H) buffer per micro-batch, whose shape is known from the
# config, so the receiving stage allocates it in advance and the transfer is a plain `irecv` of a tensor.
#
# Stage 0 also holds the embeddings; the last stage the final layer and the loss. Blocks are split as evenly as
# possible (the first stages take the remainder); `launchers/pipeline.py` prints the split before it trains, e.g.
# `5 blocks over 2 stages (uneven: the first take one block more); stage 0: blocks 0-2, stage 1: blocks 3-4`:

# %%
cfg = load_config("configs/tiny.yaml", {"model.depth": 6, "model.hidden_size": 64, "model.num_heads": 4})
for P in (2, 3, 4):
    torch.manual_seed(0)
    stages = [Stage(DiT(cfg.model), s, P) for s in range(P)]
    print(f"P = {P}: " + " | ".join(f"stage {st.stage}: block{'s' if st.hi - st.lo > 1 else ''} {st.lo}"
                                    f"{'-' + str(st.hi - 1) if st.hi - st.lo > 1 else ''}"
                                    f"{' + embeddings' if st.first else ''}{' + final layer' if st.last else ''} "
                                    f"({count_parameters(st):,} params)" for st in stages))
print(inspect.getsource(Stage.forward))

# %% [markdown]
# The proof that the cut changes nothing: run the stages one after another in this process, handing each the
# previous stage's packed output, and compare with the whole DiT on the same weights and the same batch. (Each
# stage is cut from its own copy of the DiT, as each rank does: a `Stage` frees the weights it does not hold.)

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
whole = DiT(cfg.model)
x, t, y = torch.randn(5, 1, 28, 28), torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,))
drop = torch.tensor([True, False, False, True, False])
want = whole(x, t, y, drop)
def fresh():                     # what every rank does: the same seed, the same initial DiT, then its own stage
    torch.manual_seed(0)
    return DiT(cfg.model)

for P in (2, 3, 6):
    out = (x, t, y, drop)
    for s in range(P):
        out = Stage(fresh(), s, P)(out)
    print(f"{P} stages in a row == the whole DiT: {torch.equal(out, want)}")

# %% [markdown]
# ## 2. The naive pipeline, and why it idles
#
# Send the whole batch through: stage 0 computes its forward while the others wait, then stage 1, ...; the backward
# runs the other way. With P stages each stage works 1/P of the time. The diagrams below are the simulator in
# `dit_core.parallel.pipeline.simulate`: it replays each stage's list of actions (`F3` = forward of micro-batch 3,
# `B3` its backward) with a backward costing twice a forward, and the dependencies between stages.

# %%
def gantt(ax, rows, title, unit="time (forward = 1)"):
    """rows[s]: (op, label, start, end) of every action stage s ran."""
    colors = {"F": "#4C72B0", "B": "#DD8452"}
    span = max(e for row in rows for *_, e in row)
    for s, acts in enumerate(rows):
        for op, label, start, end in acts:
            ax.barh(s, end - start, left=start, color=colors[op], edgecolor="white")
            if end - start > 0.02 * span:
                ax.text((start + end) / 2, s, label, ha="center", va="center", color="white", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"stage {s}" for s in range(len(rows))]); ax.invert_yaxis()
    ax.set_title(title, fontsize=9); ax.set_xlabel(unit)

P = 4
fig, axes = plt.subplots(3, 1, figsize=(10, 6.5))
for ax, (name, M) in zip(axes, (("gpipe", 1), ("gpipe", 8), ("1f1b", 8))):
    sim = simulate(schedule(name, P, M))
    gantt(ax, [[(a.op, repr(a), b, e) for a, b, e in row] for row in sim["timeline"]], f"{name}, P = {P}, M = {M}: bubble {max(sim['bubble']):.0%} "
                               f"(formula (P-1)/(M+P-1) = {bubble_formula(P, M):.0%})")
plt.tight_layout(); plt.show()

# %% [markdown]
# **What to notice.** Top: one micro-batch, each stage busy a quarter of the time. Middle: GPipe (Huang et al., 2019)
# cuts the batch into M micro-batches and runs all forwards, then all backwards; the idle corners are the **bubble**,
# (P − 1)/(M + P − 1) of the step: the first stage waits P − 1 slots for the last stage's first backward, the last
# stage waits P − 1 slots for the first forward. Bottom: 1F1B (PipeDream-flush, Narayanan et al., 2019/2021) has the
# *same* bubble, but starts each micro-batch's backward as soon as it can.
#
# ## 3. The schedules, as lists of actions
#
# Each schedule is a small function from (P, M, stage) to a list of actions, the same lists the simulator replays and
# the executor runs:

# %%
print(inspect.getsource(one_f_one_b))
for s in range(4):
    print(f"stage {s}  gpipe: {' '.join(map(repr, gpipe(4, 6, s)))}")
for s in range(4):
    print(f"stage {s}  1f1b:  {' '.join(map(repr, one_f_one_b(4, 6, s)))}")

# %% [markdown]
# The difference that matters is memory. A micro-batch's activations (everything autograd saves for its backward)
# live from its forward to its backward. GPipe holds all M of them at the peak; 1F1B holds at most P − s on stage s,
# whatever M is. So with 1F1B, M can grow (shrinking the bubble) while the activations held stay those of P
# micro-batches.

# %%
# NBVAL_CHECK_OUTPUT
def in_flight(actions):
    live = peak = 0
    for a in actions:
        live += 1 if a.op == "F" else -1
        peak = max(peak, live)
    return peak
for M in (4, 8, 16):
    print(f"M = {M:2d}: micro-batches in flight per stage, gpipe {[in_flight(a) for a in schedule('gpipe', 4, M)]}, "
          f"1f1b {[in_flight(a) for a in schedule('1f1b', 4, M)]}")

# %%
Ms = [1, 2, 4, 8, 16, 32]
plt.figure(figsize=(5.5, 3.2))
for P in (2, 4, 8):
    plt.plot(Ms, [bubble_formula(P, M) for M in Ms], "o-", label=f"P = {P}")
plt.xscale("log", base=2); plt.xlabel("micro-batches M"); plt.ylabel("bubble (idle share)")
plt.title("(P-1)/(M+P-1): more micro-batches, smaller bubble"); plt.legend(); plt.grid(alpha=0.3); plt.show()

# %% [markdown]
# ### Interleaved 1F1B: more, smaller stages on the same ranks
#
# The bubble is P − 1 slots of one stage's work. Make each slot shorter: cut the model into P·v chunks and give
# rank s the chunks s, s + P, ..., s + (v − 1)P (Narayanan et al., 2021). A micro-batch now visits every rank v
# times, each visit 1/v of the work, so the bubble shrinks v-fold: (P − 1)/(v·M + P − 1) of the step. The price:
# v times the messages (every chunk boundary is a send), and micro-batches must go round in groups of P.
# `F2.1` below is the forward of micro-batch 2 on this rank's chunk 1 (`F2`: on its chunk 0).

# %%
for s in range(2):
    print(f"rank {s}  interleaved (P = 2, M = 4, v = 2): {' '.join(map(repr, interleaved_1f1b(2, 4, s, 2)))}")
fig, axes = plt.subplots(2, 1, figsize=(10, 4.3))
for ax, (name, v) in zip(axes, (("1f1b", 1), ("interleaved", 2))):
    sim = simulate(schedule(name, 4, 8, v), chunks=v)
    gantt(ax, [[(a.op, repr(a), b, e) for a, b, e in row] for row in sim["timeline"]],
          f"{name}, P = 4, M = 8{', v = 2' if v > 1 else ''}: bubble {max(sim['bubble']):.0%} "
          f"(formula (P-1)/(vM+P-1) = {bubble_formula(4, 8, v):.0%})")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4. Running a schedule: sends, receives, and where the loss lives
#
# `Executor.run` walks a stage's list. A forward receives the packed activations from the previous stage (stage 0
# builds them from the images), runs the stage, and sends its output on; the last stage computes the loss instead.
# A backward receives the gradient of its output from the next stage, back-propagates through the stage's graph of
# that micro-batch, and sends the gradient of its input back. After each action, its sends and the next action's
# receives go out together in one `batch_isend_irecv`: on NCCL a send and a receive between the same two GPUs must
# be in one group, or each GPU waits for the other to finish first (a deadlock in 1F1B's steady state, where every
# stage sends forward and receives backward at once).
#
# The stage then waits for its **receives only**; its sends are waited for at the end of the step. The first
# version waited for both, and the interleaved schedule (P = 2, M = 4, v = 2, listed in section 3) hung on gloo.
# Replaying the two lists by hand: rank 0, after B0.1, waited for its send of micro-batch 0's gradient, which rank 1
# takes only just before its B0; rank 1 was still in its previous exchange, waiting for its send of micro-batch 1's
# gradient, which rank 0 takes only after its own send is done. Each waited on the other. A send that nobody needs
# yet must not block the sender: that is the whole fix, and it is why real pipeline runtimes (Megatron's,
# `torch.distributed.pipelining`'s) keep send handles and wait for them late.
#
# **Where the loss lives.** Only the last stage has it. Each micro-batch's mean loss is divided by M × (gradient
# accumulation steps) before its backward, so the gradients summed over the step are the gradient of the mean over
# the whole batch, as on one process. The logged loss is the last stages' sum over all ranks, divided by the
# number of pipelines.

# %%
from dit_core.parallel.pipeline import PipelineEngine
print(inspect.getsource(PipelineEngine.run_step))

# %% [markdown]
# ## 5. The proof: the pipeline trains exactly like one process
#
# The real launcher, `torchrun --nproc_per_node N launchers/pipeline.py --pp-degree P --schedule S --microbatches M`,
# against `python launchers/single.py`, same seed, same global batch of 16, clipping on (the gradient norm is summed
# over the stages: each holds different weights). Each table of runs goes into one job (`run_launchers`: the
# launcher's `main` once per row). Then the same stages through PyTorch's `torch.distributed.pipelining`
# (`PipelineStage` with `ScheduleGPipe` / `Schedule1F1B` / `ScheduleInterleaved1F1B`, `--impl torch`; the
# interleaved runs use a depth-4 DiT, one block per chunk, chunks 0 and 2 on rank 0), four stages (4 processes), and data
# parallelism across two pipelines (DP 2 × PP 2 on 4 processes). The rung of the tolerance ladder
# (`dit_core.parity.LADDER`, chapter 06) is sum order, 1e-5: each micro-batch's loss is summed in another order, and
# the gradient norm is summed over stages, but no number is computed differently.

# %%
single = dict(zip((1, 2), run_here("launchers/single.py", [SMALL + ["--grad-accum", str(a), "--results-dir",
                                                                          f"/tmp/ch12/single{a}"] for a in (1, 2)])))
cases2 = [("gpipe", 4, 1, "hand"), ("gpipe", 8, 1, "hand"), ("1f1b", 4, 1, "hand"), ("1f1b", 8, 1, "hand"),
          ("gpipe", 4, 2, "hand"), ("1f1b", 4, 2, "hand"), ("interleaved", 4, 1, "hand"), ("interleaved", 4, 2, "hand"),
          ("gpipe", 4, 1, "torch"), ("1f1b", 4, 2, "torch"), ("interleaved", 4, 1, "torch")]
cases4 = [("gpipe", 4, 1, 4), ("1f1b", 8, 1, 4), ("1f1b", 4, 1, 2)]     # (schedule, M, accumulation, stages)
if SMOKE:   # CI: one run of each kind (tests/test_pipeline.py runs every row of both tables)
    cases2 = [c for c in cases2 if c in (("1f1b", 4, 1, "hand"), ("interleaved", 4, 2, "hand"), ("1f1b", 4, 2, "torch"))]
    cases4 = [("1f1b", 4, 1, 2)]
# Section 6's broken runs (`--break rescale-grads`) go into the same job: one torchrun start-up for the 2-stage runs.
runs2 = run_launchers("launchers/pipeline.py", [SMALL + ["--pp-degree", "2", "--schedule", s, "--microbatches", str(m),
                      "--grad-accum", str(a), "--impl", impl, "--results-dir", f"/tmp/ch12/{s}{m}a{a}{impl}",
                      *(["--virtual-stages", "2"] if s == "interleaved" else [])]
                      for s, m, a, impl in cases2]
                      + [SMALL + ["--pp-degree", "2", "--schedule", "1f1b", "--microbatches", "4", "--grad-accum", str(a),
                                  "--break", "rescale-grads", "--results-dir", f"/tmp/ch12/broken{a}"] for a in (1, 2)], nproc=2)
runs2, broken = runs2[:len(cases2)], runs2[len(cases2):]
runs4 = run_launchers("launchers/pipeline.py", [SMALL + ["--pp-degree", str(p), "--schedule", s, "--microbatches", str(m),
                      "--results-dir", f"/tmp/ch12/four{s}{m}p{p}"] for s, m, a, p in cases4], nproc=4)
print(format_table(compare(single[1], runs2[cases2.index(("1f1b", 4, 1, "hand"))])[:6], "single", "1F1B, 2 stages"))

# %%
verdicts = []
for (s, m, a, impl), log in zip(cases2, runs2):
    r = max_rel(compare(single[a], log))
    verdicts.append(r <= 1e-5)
    print(f"PP 2, {s + (' v=2' if s == 'interleaved' else ''):15s} M={m}, accumulation {a}, {impl:5s}: "
          f"{'PASS' if r <= 1e-5 else 'FAIL'} (max rel diff {r:.1e})")
for (s, m, a, p), log in zip(cases4, runs4):
    r = max_rel(compare(single[a], log))
    verdicts.append(r <= 1e-5)
    print(f"4 processes, {'PP 4' if p == 4 else 'DP 2 x PP 2'}, {s:5s} M={m}: {'PASS' if r <= 1e-5 else 'FAIL'} "
          f"(max rel diff {r:.1e})")

# %%
# NBVAL_CHECK_OUTPUT
print("every pipeline run above (hand-written and torch.distributed.pipelining, 2 and 4 processes) matches the single "
      "process within 1e-5:", all(verdicts))

# %%
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.3))
steps = [r["step"] for r in single[1]]
a.plot(steps, [r["loss"] for r in single[1]], "k-", lw=3, alpha=0.3, label="single process")
for (s, m, acc, impl), log in zip(cases2, runs2):
    if acc == 1:
        a.plot(steps, [r["loss"] for r in log], "--", lw=1, label=f"{s} M={m} {impl}")
        b.semilogy(steps, [max(x["rel"], 1e-9) for x in compare(single[1], log)], lw=1, label=f"{s} M={m} {impl}")
a.set_xlabel("step"); a.set_ylabel("loss"); a.legend(fontsize=7); a.set_title("2 stages vs one process")
b.axhline(1e-5, color="r", ls=":"); b.set_xlabel("step"); b.set_ylabel("relative difference"); b.legend(fontsize=7)
b.set_title("float32 rounding only"); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 6. Break it: rescaling the gradients at every accumulation step
#
# A bug found in public code (torchtitan#1733): PyTorch's pipeline schedules divide every `.grad` by M after each
# `step()` call (`scale_grads=True`, the default). With one accumulation step that is the right mean. With two, the
# second division shrinks the first step's gradients again: the accumulated gradient becomes a decaying average, not
# a sum. `--break rescale-grads` reproduces it with the hand-written schedules (and `--impl torch` above avoids it
# with `scale_grads=False` and the loss divided by M × accumulation).

# %%
# NBVAL_CHECK_OUTPUT
# (`broken`: these two runs ran in section 5's job)
for a, log in zip((1, 2), broken):
    r = max_rel(compare(single[a], log))
    print(f"rescale every step, accumulation {a}: parity {'PASS' if r <= 1e-5 else 'FAIL'}")

# %% [markdown]
# ## 7. Measured: the bubble from real events, activation memory, bytes
#
# `launchers/pipeline.py --timeline R.json` records, on every stage, when each forward and backward ran and when
# the stage waited for a send or a receive, from a barrier at each step's start. `tools/bench_pipeline.py` runs the
# three schedules (interleaved with v = 2) for M = 1 ... 16 on 2 stages (hidden 256, depth 8, 49 tokens, batch 64:
# computing dominates the sends) and turns the events into a bubble per stage. The full run below reads the numbers measured on this 2-core CPU
# (`docs/bench_pipeline_cpu.json`; the command is in `docs/results.md`); in CI a smaller measurement runs.

# %%
import subprocess, sys
if SMOKE:
    subprocess.run([sys.executable, "tools/bench_pipeline.py", "--out", "/tmp/ch12/bench.json", "--microbatches", "2,4",
                    "--steps", "2", "--model", "hidden_size=64,depth=4,num_heads=2,patch_size=4",
                    "--global-batch-size", "16"], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    bench = json.load(open("/tmp/ch12/bench.json"))
else:
    bench = json.load(open("docs/bench_pipeline_cpu.json"))
rows = bench["rows"]
print(f"{'schedule':>11} {'M':>3} | {'measured bubble (stage 0, 1)':>29} | {'formula':>7} | {'simulated':>9} | "
      f"{'in flight':>9} | {'saved activations MiB':>22}")
for r in rows:
    print(f"{r['schedule']:>11} {r['M']:>3} | {' '.join(f'{b:.3f}' for b in r['bubble_measured']):>29} | "
          f"{r['bubble_formula']:7.3f} | {r['bubble_simulated']:9.3f} | {str(r['peak_in_flight']):>9} | "
          f"{' '.join(f'{m:6.1f}' for m in r['peak_saved_mib']):>22}")

# %%
# NBVAL_CHECK_OUTPUT
P = rows[0]["P"]
print("GPipe holds all M micro-batches on every stage:",
      all(r["peak_in_flight"] == [r["M"]] * P for r in rows if r["schedule"] == "gpipe"))
print("1F1B holds at most P - s on stage s:",
      all(r["peak_in_flight"] == [min(P - s, r["M"]) for s in range(P)] for r in rows if r["schedule"] == "1f1b"))
g = {r["M"]: r for r in rows if r["schedule"] == "gpipe"}
f = {r["M"]: r for r in rows if r["schedule"] == "1f1b"}
big = max(set(g) & set(f))
print("at the largest M both ran, 1F1B's stage 0 keeps less activation memory than GPipe's:",
      f[big]["peak_saved_mib"][0] < g[big]["peak_saved_mib"][0])
print("bytes sent per step, all ranks together = 2 (P·v - 1) boundaries x M x micro-batch x (T·H + H) x 4 bytes:",
      all(sum(r["bytes_sent"]) == 2 * (P * r["v"] - 1) * r["M"] * r["micro_batch"] * r["packed_width"] * 4 for r in rows))

# %%
names = [n for n in ("gpipe", "1f1b", "interleaved") if any(r["schedule"] == n for r in rows)]
fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.2 * len(names)))
for ax, name in zip(axes, names):
    r = min((x for x in rows if x["schedule"] == name), key=lambda x: abs(x["M"] - 4))    # M = 4: readable
    tl = [[(e["kind"], e["what"], 1e3 * e["start"], 1e3 * e["end"]) for e in ev if e["kind"] in ("F", "B")]
          for ev in r["step_events"]]
    gantt(ax, tl, f"measured: {name}, P = {r['P']}, M = {r['M']}{', v = %d' % r['v'] if r['v'] > 1 else ''} "
                  f"(bubble {max(r['bubble_measured']):.0%}, "
                  f"formula {r['bubble_formula']:.0%})", unit="ms since the step's barrier")
plt.tight_layout(); plt.show()
plt.figure(figsize=(5.5, 3.2))
for name, mk in (("gpipe", "o"), ("1f1b", "s"), ("interleaved", "^")):
    xs = [r for r in rows if r["schedule"] == name]
    if xs:
        plt.plot([r["M"] for r in xs], [max(r["bubble_measured"]) for r in xs], mk + "-", label=f"{name}, measured")
Ms = sorted({r["M"] for r in rows})
plt.plot(Ms, [bubble_formula(P, M) for M in Ms], "k:", label="(P-1)/(M+P-1)")
v = max(r["v"] for r in rows)
plt.plot(Ms, [bubble_formula(P, M, v) for M in Ms], "k--", lw=0.8, label=f"(P-1)/({v}M+P-1)")
plt.xscale("log", base=2); plt.xlabel("micro-batches M"); plt.ylabel("bubble"); plt.legend(); plt.grid(alpha=0.3)
plt.title(f"P = {P} on this CPU"); plt.show()

# %% [markdown]
# **What to notice.** The measured bubble follows (P − 1)/(M + P − 1) down as M grows, a little above it: real
# stages are not perfectly even (stage 0 also embeds, the last stage also runs the final layer and the loss), and
# every send and receive takes time the formula leaves out. The batch is fixed here (64), so GPipe's activation
# memory is the whole batch's whatever M is, while 1F1B's holds P micro-batches at most and falls as P/M: at M = 16
# stage 0 keeps an eighth of GPipe's. (With a fixed micro-batch size instead, GPipe's memory grows with M and 1F1B's
# stays flat: the same fact.) Interleaving (v = 2) cuts the measured bubble further, towards (P − 1)/(v·M + P − 1),
# and pays twice: its longer warm-up keeps more activations than 1F1B (stage 0 holds 5 chunk-micro-batches, each
# half a stage, against 1F1B's 2 whole ones), and it sends v times the messages: every one of the P·v − 1 chunk boundaries sends one (B, T·H + H) tensor per
# micro-batch each way. Those bytes are small; data parallelism all-reduces every weight's gradient instead.
#
# ## 8. Pipelines with the other axes, and better schedules
#
# * **PP × DP.** With N = P × D processes, ranks [dP, (d+1)P) form pipeline d and train on data-parallel slice d of
#   the global batch; after the schedule, each stage all-reduces its gradients with the same stage of the other
#   pipelines (its data-parallel group). Proved above on 4 processes.
# * **PP × TP × DP (Megatron's 3-D layout).** Tensor parallelism inside a node (it talks in every layer, on the
#   fastest links), pipeline stages across nodes (one activation per micro-batch crosses), data parallelism
#   outermost. The same mesh builder (`dit_core.parallel.dist.build_mesh`) lays ranks out for it.
# * **Interleaved 1F1B** (Narayanan et al., 2021; built above): each rank holds v non-adjacent chunks of layers
#   (virtual stages), so a micro-batch passes every rank v times; the bubble falls to (P − 1)/(v · M) of the ideal
#   time, at v times the messages.
# * **Zero-bubble schedules** (Qi et al., 2023): split each backward into the gradient of the input (needed by the
#   previous stage at once) and the gradient of the weights (needed only by the optimizer), and push the weight
#   gradients into the idle slots. ZB-H1 keeps 1F1B's memory and cuts its bubble to about a third; ZB-H2 removes it
#   almost entirely with more activation memory.
#
# **Try it:** `torchrun --nproc_per_node 2 launchers/pipeline.py --pp-degree 2 --schedule gpipe --microbatches 8
# --device cpu --timeline tl.json`, then `python tools/bench_pipeline.py --out bench.json` to draw your own bubbles.

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** The bubble of P = 4, M = 8 for 1F1B and for interleaved with v = 2, from the formula; then `simulate(schedule('interleaved', 4, 8, 2), chunks=2)`.
# 2. **Break it.** Section 6's `--break rescale-grads` passes with accumulation 1 and fails with 2. Predict accumulation 4: pass or fail, and is the curve further off than with 2? Run it.
# 3. **Predict.** Why does interleaved 1F1B need `--microbatches` to be a multiple of `--pp-degree`?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-12).

# %% [markdown]
# ## 中文要点
#
# 流水线并行（pipeline parallelism）：按深度把 DiT 切成若干阶段，条件向量随激活一起传给下一阶段，梯度原路返回。
#
# 朴素流水线大部分时间在空等；把批次切成微批次（micro-batch），再排好前向和反向的顺序（调度）：GPipe、1F1B、交错式 1F1B。
#
# 气泡（空闲占比）公式 (P−1)/(v·M+P−1)，本章用真实事件测量来检验；1F1B 每个阶段至多保留 P 个微批次的激活，显存远少于 GPipe。
#
# 只等待接收、发送留到步末再等，否则交错式调度会死锁；流水线与单进程损失一致，也与 `torch.distributed.pipelining` 一致。
