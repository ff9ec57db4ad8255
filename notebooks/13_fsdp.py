# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 13 · Fully sharded data parallelism (全分片数据并行): FSDP by hand, and PyTorch's FSDP2
#
# Chapter 07 cut the model states (weights, gradients, Adam's moments) into N slices with DeepSpeed ZeRO-3. PyTorch
# has the same idea built in: **FSDP** (Fully Sharded Data Parallel), today in its second form, FSDP2
# (`torch.distributed.fsdp.fully_shard`, the engine of torchtitan). ZeRO-3 and FSDP are one partitioning behind two
# APIs: every rank trains on its slice of the global batch, as under DDP, but keeps only 1/N of every model state, and
# gathers a piece of the model whole only for the moment it computes with it.
#
# | per rank, fp32 + AdamW | weights | gradients | Adam moments | sent per step (ring) |
# |---|---|---|---|---|
# | DDP (chapter 06) | 4Ψ | 4Ψ | 8Ψ | all-reduce: 2Ψ(N-1)/N elements |
# | ZeRO-3 / FSDP | 4Ψ/N | 4Ψ/N | 8Ψ/N | all-gather ×2 + reduce-scatter: 3Ψ(N-1)/N |
#
# This chapter builds FSDP by hand (`dit_core/parallel/fsdp.py`, ~300 lines; `fsdp_train.py` plugs it and FSDP2 into
# the training loop, `fsdp_checkpoint.py` reads and writes the sharded checkpoints), runs FSDP2 on the same units as the
# reference (`launchers/fsdp.py --impl {hand,torch}`), proves both equal to one process, draws when each unit is
# gathered and freed, measures what a rank holds and sends, explains why sharding sometimes saves nothing, and
# reshards a checkpoint from 2 ranks to 4 and to one process.

# %%
import os, json, inspect
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.model import DiT
from dit_core.parallel import fsdp as F
from dit_core.parallel.fsdp_checkpoint import load_into_plain
from dit_core.parity import run_launchers, run_here, compare, max_rel, format_table
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
# The parity DiT of chapters 09-12 (hidden 32, depth 2, 4 heads). Clipping at 0.05 is below its gradient norm
# (about 0.5): it acts at every step, so the norm summed over the shards is checked at every step too.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.05",
         "--overwrite"]   # the /tmp/ch13 folders are scratch: a re-run replaces them
os.chdir("..")  # launchers are run from the repository root

# %% [markdown]
# ## 1. Units and the flat parameter
#
# FSDP does not gather the whole model at once (that would hold Ψ on every rank again, if only for a moment). It
# cuts the model into **units** and gathers one unit at a time. Here each DiT block is a unit; the rest (patch, time
# and label embeddings, the final layer) is the **root** unit. Inside a unit all parameters are laid end to end as
# one flat fp32 vector, padded to a multiple of N, and rank r keeps elements [r·s, (r+1)·s): its **shard**, the only
# parameter the optimizer ever sees. One flat vector per unit means one all-gather and one reduce-scatter per unit,
# not one per tensor (the same reason DDP packs gradients into buckets).
#
# `--report PATH` writes what one step did. The units of the chapter 07 tiny DiT (hidden 64, depth 4) on 2 ranks:

# %%
TINY = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", "2", "--set", "train.global_batch_size=8",
        "--set", "train.train_subset=64", "--set", "train.tensorboard=false",
        "--set", "run.save_final=false", "--overwrite"]    # measurements: their reports are what they leave
# Every multi-process run of this chapter, in three jobs: one torchrun start-up (~8 s on 2 cores) per world size, not
# one per run. The sections below read their reports and logs. In a job the runs go in order, so a resume follows the
# run that wrote its checkpoint.
REPORTS = {"hand": [], "no prefetch": ["--no-prefetch"], "one unit": ["--unit", "model"], "torch": ["--impl", "torch"]}
cases = [(impl, acc) for impl in ("hand", "torch") for acc in (1, 2)]
half = STEPS // 2
ck = f"/tmp/ch13/hand1/checkpoint-{half}"            # section 7 resumes it
jobs = {2: {("report", k): TINY + extra + ["--results-dir", f"/tmp/ch13/r-{k}", "--report", f"/tmp/ch13/{k}.json"]
            for k, extra in REPORTS.items()},
        4: {("report", "four"): TINY + ["--results-dir", "/tmp/ch13/r-four", "--report", "/tmp/ch13/four.json"]},
        1: {}}
jobs[2].update({("parity", impl, acc): SMALL + ["--impl", impl, "--grad-accum", str(acc), "--set", f"train.ckpt_every={half}",
                                               "--results-dir", f"/tmp/ch13/{impl}{acc}"] for impl, acc in cases})
jobs[2].update({("one step", impl): SMALL + ["--impl", impl, "--max-steps", "1", "--results-dir", f"/tmp/ch13/one-step-{impl}"]
                for impl in ("hand", "torch")})
jobs[2][("resume", "hand x2")] = SMALL + ["--resume", ck, "--results-dir", "/tmp/ch13/re2"]
jobs[4].update({("parity", impl, 4): SMALL + ["--impl", impl, "--results-dir", f"/tmp/ch13/four-{impl}"] for impl in ("hand", "torch")})
jobs[4][("resume", "FSDP2 x4")] = SMALL + ["--impl", "torch", "--resume", ck, "--results-dir", "/tmp/ch13/re4"]
jobs[1][("resume", "hand x1")] = SMALL + ["--resume", ck, "--results-dir", "/tmp/ch13/re1"]
logs = {}
for nproc, rows in jobs.items():
    logs.update(zip(rows, run_launchers("launchers/fsdp.py", list(rows.values()), nproc=nproc)))
rep = {k: json.load(open(f"/tmp/ch13/{k}.json")) for k in [*REPORTS, "four"]}
r = rep["hand"]
print(f"Ψ = {r['psi']:,} parameters, N = {r['world_size']}")
print(f"{'unit':>9} | {'elements':>8} | {'padded':>7} | {'shard (per rank)':>16}")
for u in r["units"]:
    print(f"{u['name']:>9} | {u['numel']:8,} | {u['padded']:7,} | {u['shard']:16,}")

# %%
# NBVAL_CHECK_OUTPUT
for k in ("hand", "four"):
    r = rep[k]; N = r["world_size"]
    ok = all(u["padded"] % N == 0 and u["padded"] - u["numel"] < N and u["shard"] * N == u["padded"] for u in r["units"])
    print(f"N = {N}: every unit padded by fewer than N elements and cut into N equal shards: {ok}; "
          f"units hold every parameter once: {sum(u['numel'] for u in r['units']) == r['psi']}")

# %% [markdown]
# ## 2. The code: gather, compute, free; gather, backward, reduce-scatter
#
# A forward pre-hook on each block all-gathers its flat vector through a small autograd function (`_Gather`), points
# the block's weights at views of it, and the block runs as ever. A forward hook then **frees** the vector. It frees
# the *storage* (`untyped_storage().resize_(0)`), not the tensor: autograd still holds the views it saved for
# backward. Just before the block's backward (`_BeforeBackward`, an identity on the block's output whose backward
# runs first), the storage is re-allocated and re-gathered, and the saved views read valid weights again. When all of
# the unit's weight gradients are summed into the flat gradient, `_Gather.backward` reduce-scatters it: each rank
# receives the sum over the ranks of its own shard's gradient, divides by N (the mean, as DDP), and frees the rest.

# %%
for fn in (F.FullyShardedDiT._block_pre, F.FullyShardedDiT._block_post, F.FullyShardedDiT.reduce_grad):
    print(inspect.getsource(fn))

# %% [markdown]
# The optimizer steps on the shards alone. AdamW is element-wise (every element's update reads only that element's
# gradient and moments), so a shard steps exactly as its elements would inside the whole model. Two things are not
# element-wise and need one collective each: the **gradient norm** for clipping (each rank sums the squares of its
# shards, an all-reduce adds the ranks: `FSDPStrategy.clip_grad_norm_`) and the logged loss (the mean over all ranks).
#
# ## 3. The proof: two and four ranks train like one process
#
# Hand-written and FSDP2 (`fully_shard` on every block, then on the root, the same units), with gradient
# accumulation 1 and 2, on 2 ranks, and both on 4 ranks, against `launchers/single.py`:

# %%
# (run in section 1's jobs)
two = {(impl, acc): logs[("parity", impl, acc)] for impl, acc in cases}
four = {impl: logs[("parity", impl, 4)] for impl in ("hand", "torch")}
single = dict(zip((1, 2), run_here("launchers/single.py", [SMALL + ["--grad-accum", str(a), "--results-dir",
              f"/tmp/ch13/single{a}"] for a in (1, 2)])))
runs = {(f"{impl} x2", acc): two[(impl, acc)] for impl, acc in cases}
runs.update({(f"{impl} x4", 1): four[impl] for impl in ("hand", "torch")})
print(format_table(compare(single[1], two[("hand", 1)])[:6], "single", "FSDP hand x2"))

# %%
# NBVAL_CHECK_OUTPUT
for (name, acc), log in runs.items():
    ref = single[acc]
    norms = max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(log, ref))
    print(f"FSDP {name:8s} accumulation {acc}: every step logged: {len(log) == STEPS}, max rel loss diff <= 1e-5: "
          f"{'PASS' if max_rel(compare(ref, log)) <= 1e-5 else 'FAIL'}, gradient norm within 1e-5: {norms <= 1e-5}")

# %%
for (name, acc), log in runs.items():
    print(f"FSDP {name:8s} accumulation {acc}: max rel diff {max_rel(compare(single[acc], log)):.1e}")
parity_curves(single[1], two[("hand", 1)], names=("single", "FSDP hand x2"));

# %% [markdown]
# **What to notice.** The differences are float32 rounding of sums taken in another order (N ranks' partial
# gradients added by the reduce-scatter; the norm's squares summed per shard, then over ranks): the sum-order rung of
# the tolerance ladder (`dit_core.parity.LADDER`, chapter 06). Accumulation 2 passes too: inside `no_sync` a unit
# keeps its whole flat gradient and reduce-scatters the sum at the last micro-step (section 5 prices it).
#
# After one step the hand-written and FSDP2 weights are the same numbers. Both checkpoints are DCP folders in one
# layout (section 7), so they compare directly, parameter by parameter:

# %%
# NBVAL_CHECK_OUTPUT
def plain_weights(folder):
    m = DiT(load_config("configs/tiny.yaml", {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 4}).model)
    load_into_plain(folder, m, None)
    return dict(m.named_parameters())
h, t = (plain_weights(f"/tmp/ch13/one-step-{impl}/checkpoint-1") for impl in ("hand", "torch"))
worst = max((h[n] - t[n]).abs().max().item() for n in h)
print(f"after one step, hand-written shards == FSDP2's (<= 1e-6): {worst <= 1e-6} ({len(h)} parameters compared)")

# %% [markdown]
# ## 4. When each unit is whole: the gather/free timeline, and prefetch
#
# A unit's all-gather need not wait until the unit runs: while block i computes, block i+1's all-gather can already be
# on the wire (**prefetch**; FSDP2 does it by default, `reshard_after_forward` and its forward/backward prefetch
# settings tune it). In backward the order reverses: while block i runs its backward, block i-1 is gathered. With NCCL
# the collective runs on its own CUDA stream and `wait()` makes the compute stream wait only when the weights are
# needed; on the CPU (gloo) the calls are issued in the same order and gloo's background thread does the transfer.
# The events of one training step, from the reports of section 1 (4 blocks, 2 ranks):

# %%
ORDER = ["root"] + [f"blocks.{i}" for i in range(4)]
STYLE = {"all-gather": ("C0", "v"), "free": ("C3", "x"), "backward": ("C2", "s"), "reduce-scatter": ("C1", "^")}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.4), sharey=True)
for ax, k in zip(axes, ("hand", "no prefetch")):
    seen = set()
    for i, (what, unit) in enumerate(rep[k]["timeline"]):
        c, mk = STYLE[what]
        ax.scatter(i, ORDER.index(unit), color=c, marker=mk, s=40, label=None if what in seen else what); seen.add(what)
    ax.set_yticks(range(len(ORDER)), ORDER); ax.set_xlabel("event, in the order rank 0 issued it")
    ax.set_title(f"{k}: peak gathered {rep[k]['ranks'][0]['gathered_peak_bytes'] / 2**10:.0f} KiB")
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=8, loc="lower right"); axes[0].invert_yaxis(); plt.tight_layout()

# %%
# NBVAL_CHECK_OUTPUT
for k in ("hand", "no prefetch"):
    tl = [f"{w} {u}" for w, u in rep[k]["timeline"]]
    early = tl.index("all-gather blocks.1") < tl.index("free blocks.0")
    print(f"{k:11s}: block 1 gathered before block 0 is freed (in flight while block 0 computes): {early}")
u = {x["name"]: x["padded"] for x in rep["hand"]["units"]}
blocks = max(u[f"blocks.{i}"] for i in range(4))
print("without prefetch the peak is the root + one block:",
      rep["no prefetch"]["ranks"][0]["gathered_peak_bytes"] == 4 * (u["root"] + blocks))
print("with prefetch, the root + two blocks (one computing, one arriving):",
      rep["hand"]["ranks"][0]["gathered_peak_bytes"] == 4 * (u["root"] + 2 * blocks))
print("one unit for the whole model: the whole model, gathered on every rank:",
      rep["one unit"]["ranks"][0]["gathered_peak_bytes"] == 4 * rep["one unit"]["units"][0]["padded"])

# %% [markdown]
# **What to notice.** Read the left plot row by row: a block is gathered (▼) one event before it is needed, freed (×)
# right after its forward, gathered again for its backward (■), and reduce-scattered (▲). The root is gathered once
# and kept until the very end: its embeddings run first in forward and last in backward, so freeing it in between
# would only gather it again (FSDP2 treats its root the same way). Prefetch costs one more unit of memory (the next
# block arriving while this one computes); the unit size sets that peak: one block here, the whole model with
# `--unit model`, which is plain ZeRO-1/2 memory at the moment of compute.
#
# ## 5. What a rank holds and sends, measured
#
# The report walks the tensors of every rank after the first micro-batch's backward of step 1 (weights, gradients and
# Adam's moments all exist then) and counts every collective of that step. Beside the formulas of the table at the top:

# %%
MB = 2**20
print(f"{'run':>12} {'N':>2} | {'weights':>15} | {'gradients':>15} | {'Adam':>15} | {'sent per step (ring)':>21}   KiB, rank 0: measured / formula")
for k, r in rep.items():
    m, f, N = r["ranks"][0]["memory"], r["formula"], r["world_size"]
    sent = r["ranks"][0]["comm_ring_bytes"]
    print(f"{k:>12} {N:>2} | " + " | ".join(f"{m[c] / 2**10:6.1f} / {f[c] / 2**10:6.1f}" for c in ("parameters", "gradients", "optimizer"))
          + f" | {sent / 2**10:8.1f} / {r['comm_formula_bytes'] / 2**10:8.1f}")

# %%
# NBVAL_CHECK_OUTPUT
def moved(r, kind):          # bytes of rank 0's all-gathers or reduce-scatters (either name torch gives them)
    b = r["ranks"][0]["comm_bytes"]
    return b.get(f"{kind}_single", 0) + b.get({"all_gather": "all_gather_into_tensor", "reduce_scatter": "reduce_scatter_tensor"}[kind], 0)
for k, r in rep.items():
    f, N = r["formula"], r["world_size"]
    worst = max(abs(rank["memory"][c] - f[c]) / f[c] for rank in r["ranks"] for c in f)
    line = f"{k:>12} x{N}: model states within 1% of 16Ψ/N on every rank: {worst <= 0.01}"
    if r["units"]:           # hand: forward gathers every unit, backward every block again, one reduce-scatter each
        pads = [u["padded"] for u in r["units"]]
        line += (f"; gathered every unit, then every block again for backward, reduce-scattered each once, to the byte: "
                 f"{moved(r, 'all_gather') == 4 * (pads[0] + 2 * sum(pads[1:])) and moved(r, 'reduce_scatter') == 4 * sum(pads)}")
    else:                    # FSDP2: the same traffic as the hand-written units, to its own padding
        h = rep["hand"]
        line += (f"; the hand-written FSDP's bytes within 0.1%: "
                 f"{all(abs(moved(r, c) / moved(h, c) - 1) <= 1e-3 for c in ('all_gather', 'reduce_scatter'))}")
    print(line)

# %% [markdown]
# **What to notice.** Weights, gradients and moments are 1/N of DDP's, to the padding (a few elements per unit). The
# bytes on the wire are 3Ψ(N-1)/N elements less the root's second gather (it was kept): more than DDP's 2Ψ(N-1)/N,
# the price of not holding the weights. Gradient accumulation under `no_sync` keeps each unit's *whole* flat
# gradient until the last micro-step: 4Ψ bytes per rank (the gradient of DDP) in exchange for one reduce-scatter per
# step instead of one per micro-step. Without `no_sync`, FSDP reduce-scatters after every micro-batch and keeps only
# 4Ψ/N (DeepSpeed's ZeRO-2/3 always do this; FSDP2 lets you choose with `set_requires_gradient_sync`).
#
# ## 6. Why sharding may not shrink memory
#
# A question asked again and again, e.g. deepspeedai/DeepSpeed#4093: GPT-J-6B under ZeRO-3 used about 13 GB per GPU
# on 2 GPUs where DeepSpeed's estimator said 0.77 GB of model states, and the *same* on 4 GPUs at the same per-GPU
# batch. The model states did shrink; they were never most of the memory. A rank also holds the **activations** of
# its micro-batch (they do not shrink with N: each rank still runs whole samples), the **gathered units** (one or two
# blocks, whole), communication buffers, and on a GPU the CUDA context and the caching allocator's reserve. Count it
# for the DiT of `configs/bench.yaml` (patch 2: 196 tokens, depth 12) at several widths, 8 images per rank, fp32:
# the activations measured as the tensors autograd saves in one forward on the CPU (each storage once, the weights
# excluded; CPU attention is a fused kernel that keeps O(T) per head, as flash attention on a GPU does).

# %%
def saved_bytes(model, batch):
    """Bytes of the storages autograd saves in one forward, each counted once, the weights' excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}
    def pack(t):
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t
    x, tt, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, tt, y)
    return sum(seen.values())

def dit(hidden):
    torch.manual_seed(0)
    return DiT(load_config("configs/bench.yaml", {"model.hidden_size": hidden, "model.num_heads": hidden // 64}).model)

WIDTHS = (128, 256) if SMOKE else (128, 256, 384, 768, 1152)
B, RANKS = 8, (1, 2, 4, 8)
ledger = {}
for h in WIDTHS:
    m = dit(h)
    psi = sum(p.numel() for p in m.parameters())
    block = sum(p.numel() for p in m.blocks[0].parameters())
    root = psi - len(m.blocks) * block
    one, two_ = saved_bytes(m, 1), saved_bytes(m, 2)
    ledger[h] = {"psi": psi, "per_image": two_ - one, "linear": abs(two_ / one - 2) < 0.02,
                 **{N: {"states": 16 * psi / N, "gathered": 4 * (root + 2 * block) if N > 1 else 0,
                        "activations": B * (two_ - one)} for N in RANKS}}
    del m
print(f"{'width':>5} {'Ψ':>6} | per-rank MiB at N = " + " | ".join(f"{N:>5}" for N in RANKS) + " | model states' share at N = 2")
for h, L in ledger.items():
    tot = {N: sum(L[N].values()) / MB for N in RANKS}
    print(f"{h:5d} {L['psi'] / 1e6:5.1f}M | " + " " * 20 + " | ".join(f"{tot[N]:5.0f}" for N in RANKS)
          + f" | {L[2]['states'] / sum(L[2].values()):.0%}")
# Activations per image grow like the width (fixed tokens), model states like its square: where they cross.
(h0, L0), (h1, L1) = list(ledger.items())[-2:]
slope = (L1["per_image"] - L0["per_image"]) / (h1 - h0)
psi_at = lambda h: L1["psi"] * (h / h1) ** 2          # Ψ grows like the width squared
cross = next(h for h in range(64, 20000, 64) if 16 * psi_at(h) / 2 >= B * (L1["per_image"] + slope * (h - h1)))
print(f"at {B} images per rank, the sharded model states (N = 2) outweigh the activations from width ~{cross} "
      f"(Ψ ~{psi_at(cross) / 1e6:.0f}M), on the line through the last two widths")

# %%
fig, ax = plt.subplots(figsize=(8, 3.6))
for h, L in ledger.items():
    ax.plot(RANKS, [sum(L[N].values()) / sum(L[1].values()) for N in RANKS], "o-", label=f"width {h} (Ψ {L['psi'] / 1e6:.0f}M)")
ax.plot(RANKS, [1 / N for N in RANKS], "k:", label="1/N (model states only)")
ax.set_xscale("log", base=2); ax.set_xticks(RANKS, [str(N) for N in RANKS])
ax.set_xlabel(f"ranks N ({B} images per rank)"); ax.set_ylabel("per-rank memory / one rank's")
ax.set_title("FSDP per-rank memory: states 16Ψ/N + gathered units + activations"); ax.legend(fontsize=7); plt.tight_layout()

# %%
# NBVAL_CHECK_OUTPUT
ratio = {h: sum(L[4].values()) / sum(L[2].values()) for h, L in ledger.items()}
print(f"activations are linear in the batch at every width: {all(L['linear'] for L in ledger.values())}")
print(f"width 128: 2 -> 4 ranks saves under 10% of a rank's memory (activations dominate): {ratio[128] > 0.9}")
print(f"the saving grows with the width: {all(ratio[a] > ratio[b] for a, b in zip(WIDTHS, WIDTHS[1:]))}")

# %% [markdown]
# **What to notice.** At width 128 (Ψ about 4M) the activations of 8 images are many times the model states, and going
# from 2 to 4 ranks changes a rank's memory by a few percent: the "same memory on 2 and 4 GPUs" of the question, with
# nothing broken. Activations grow like B·T·h per block, model states like h² per block, so the curves fall toward 1/N
# only as the model widens, and the printed crossover says where: sharding starts to pay once the model states are a
# large part of a rank's memory, at a width that grows with the images (and tokens) per rank. The remedies for the
# activations are other chapters' tools: a smaller micro-batch with accumulation (chapter 04), activation
# checkpointing, sequence parallelism (chapter 09). On a GPU, add the CUDA context (several hundred MiB per process)
# and the allocator's cached blocks, which `torch.cuda.memory_reserved` shows and `max_memory_allocated` does not.
#
# ## 7. Checkpoints that reshard: 2 ranks write, 4 ranks and one process read
#
# Each rank saves with `torch.distributed.checkpoint` (DCP): every weight and Adam moment under its single-process
# name, the rank writing the dim-0 chunk that FSDP2 would own (a DTensor sharded on dim 0), into one file per rank plus
# a `.metadata` file that records which rank wrote which chunk of which tensor. Loading is planned from that metadata:
# each reader asks for the pieces *it* needs, whatever the number of writers. So the hand-written FSDP (which
# re-cuts the chunks into its flat shards on load), FSDP2 on any N, DDP and `launchers/single.py` all resume the
# same folder. The EMA is written whole (`ema.pt`), so `python -m dit_core.evaluate` reads any FSDP checkpoint as it
# is; `python -m dit_core.parallel.fsdp convert A B` writes plain `model.pt` weights.
#
# The 2-rank run of section 3 saved at step 15; resume it on 4 ranks (FSDP2), on 1 rank, and as one plain process:

# %%
print(sorted(os.listdir(f"{ck}/dcp")), sorted(os.listdir(ck)))
# the resumes on 4, 1 and 2 ranks ran in section 1's jobs; one plain process resumes here
resumed = {"FSDP2 x4": logs[("resume", "FSDP2 x4")], "hand x1": logs[("resume", "hand x1")],
           "single.py": run_here("launchers/single.py", [SMALL + ["--resume", ck, "--results-dir", "/tmp/ch13/re-single"]])[0],
           "hand x2": logs[("resume", "hand x2")]}
ref = two[("hand", 1)]

# %%
# NBVAL_CHECK_OUTPUT
for name, log in resumed.items():
    same = [r["loss"] for r in log] == [r["loss"] for r in ref[half:]]
    print(f"written by 2 ranks, resumed by {name:9s}: starts at the checkpoint's step: {log[0]['step'] == half}, "
          f"continues the curve within 1e-5: {max_rel(compare(ref[half:], log)) <= 1e-5}"
          + (f", bit for bit: {same}" if name == "hand x2" else ""))

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot([r["step"] for r in ref], [r["loss"] for r in ref], lw=3, alpha=0.4, label="FSDP hand x2, uninterrupted")
for name, log in resumed.items():
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], "--", label=f"resumed: {name}")
ax.axvline(half, color="k", ls=":"); ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(fontsize=8)
ax.set_title("one DCP checkpoint, four readers"); plt.tight_layout()

# %% [markdown]
# **What to notice.** The same launcher on 2 ranks continues bit for bit: the same arithmetic, from exactly the
# restored state. FSDP2 on 4 ranks, the hand-written FSDP on 1 and one plain process continue within float32
# rounding: they add the gradient's pieces in another order, and FSDP2 also sums the norm's squares over differently
# cut shards (a chunk of every parameter, not a slice of a flat unit), which moves the clipping factor in its last
# bits. All stay on the sum-order rung. Weights, Adam's moments and step count, the EMA and the position in the batch stream
# (`training_state.json`: the step, so the determinism contract hands out the very batch the run would have seen) all
# come back. A launcher that cannot read such a folder says so in one sentence, e.g. `launchers/tp.py`: *Checkpoint
# '…' was written by an FSDP run, which launchers/tp.py cannot resume; resume it with torchrun --nproc_per_node N
# launchers/fsdp.py (any N), python launchers/single.py or torchrun launchers/ddp.py; python -m
# dit_core.parallel.fsdp convert … writes plain weights.*
#
# ## 8. Hand-written, FSDP2, DeepSpeed ZeRO-3: one table
#
# The same model (the tiny DiT, 2 ranks, fp32), measured by the same counters: DeepSpeed's numbers come from
# `launchers/zero.py --stage 3 --report` (chapter 07, `--persistence-threshold 0` so that it shards every tensor as
# FSDP does). Lines of user code: what a training script adds to wrap the model.

# %%
KiB = lambda b: f"{b / 2**10:7.1f} KiB"
rows = {"hand (dit_core.parallel.fsdp)": rep["hand"], "FSDP2 (fully_shard)": rep["torch"]}
if not SMOKE:   # DeepSpeed's start-up (~15 s) is paid in the full run only; CI checks the two FSDP rows above
    run_launchers("launchers/zero.py", [TINY + ["--stage", "3", "--grad-accum", "2", "--persistence-threshold", "0",
                  "--results-dir", "/tmp/ch13/z3", "--report", "/tmp/ch13/z3.json"]], nproc=2)
    rows["DeepSpeed ZeRO-3"] = json.load(open("/tmp/ch13/z3.json"))
user_lines = {"hand (dit_core.parallel.fsdp)": "1: FullyShardedDiT(model)", "FSDP2 (fully_shard)": "2: fully_shard(block) per block, fully_shard(model)",
              "DeepSpeed ZeRO-3": "a JSON config + deepspeed.initialize; its engine runs backward and step"}
print(f"{'':30s} | {'weights':>11} | {'gradients':>11} | {'optimizer':>11} | {'sent per step':>11} | user code")
for name, r in rows.items():
    m = r["ranks"][0]["memory"]
    print(f"{name:30s} | " + " | ".join(KiB(m[c]) for c in ("parameters", "gradients", "optimizer"))
          + f" | {KiB(r['ranks'][0]['comm_ring_bytes'])} | {user_lines[name]}")

# %% [markdown]
# **What to notice.** The hand-written and FSDP2 columns agree to the padding: the same partitioning. DeepSpeed
# (measured with accumulation 2, at its first micro-batch, so its gradient column is its reduced partition) keeps an
# extra fp32 master copy of its slice even in fp32 (chapter 07) and communication buckets outside these columns; its
# bytes per step count both micro-steps. What differs is the API: DeepSpeed owns the step (its engine runs backward,
# clipping, the optimizer); FSDP2 changes only the module, and the training loop stays the plain PyTorch loop every
# other chapter uses. That is why torchtitan builds on it.
#
# **Exercises.** (Answers in `docs/solutions.md`.)
#
# 1. Of the three hand-written settings of section 4 (a unit per block with prefetch, without it, one unit for the
#    whole model), which has the lowest gathered peak, and which sends the fewest bytes per step? Why is the one that
#    sends the fewest the same traffic as DDP?
# 2. With gradient accumulation 4, how many bytes does one rank keep for gradients under `no_sync`, and how many if it
#    reduce-scattered after every micro-batch instead? What does the second choice cost on the wire?
# 3. **Break it.** Drop the `.div_(self.world)` at the end of `FullyShardedDiT.reduce_grad` (each shard then gets the
#    *sum* of the ranks' gradients, not their mean). Predict the parity verdict of section 3 with clipping at 0.05
#    (active at every step) and with clipping off (`--set train.grad_clip=0`), and what the logged gradient norm
#    shows. Then run both against `launchers/single.py`.
#
# ## 中文要点
#
# 全分片数据并行（FSDP）与 ZeRO-3 是同一种切分：每个 rank 只保存权重、梯度和 Adam 状态的 1/N，用到某一块时才把它聚合完整。
#
# 模型被切成若干单元（每个 DiT block 一个，其余部分是根单元），单元内的参数拼成一个扁平向量；前向前 all-gather、用完即释放，反向时再 all-gather，梯度用 reduce-scatter 求和后除以 N。
#
# 预取：当前单元计算时，下一个单元的 all-gather 已在传输；代价是多占一个单元的显存。单元越大，峰值越高。
#
# 手写实现与 PyTorch 的 FSDP2（`fully_shard`）都与单进程损失一致（误差约 1e-7，仅求和顺序不同）；模型状态显存实测等于 16Ψ/N，通信约 3Ψ(N-1)/N。
#
# 小模型时激活值占大头，增加卡数几乎不省显存（DeepSpeed#4093 的现象）；DCP 分布式检查点可以在 2 卡保存、4 卡或单进程恢复。
