# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Data parallelism by hand (数据并行)
#
# **The idea.** Every process (*rank*) holds a full copy of the model. Each optimizer step, the global batch is cut
# into N contiguous slices, rank r trains on slice r, and before the optimizer step the gradients are **averaged over
# the ranks** with an all-reduce. The loss is a mean over samples, so the mean of the N slice-gradients *is* the
# gradient of the global batch: every rank takes the same step and the N copies stay identical. Two things make this
# exact, and this chapter breaks each on purpose: the **average** (not the sum) and the **broadcast** of rank 0's
# weights when training starts.
#
# The code is `dit_core/parallel/ddp.py` (`DataParallel`, ~150 lines) and `launchers/ddp.py`, a small diff of
# `launchers/single.py`:
#
#     torchrun --nproc_per_node 2 launchers/ddp.py --impl hand --config configs/tiny.yaml --device cpu   # 2 CPU processes
#     torchrun --nproc_per_node 2 launchers/ddp.py --impl hand --config configs/mnist.yaml               # 2 GPUs (NCCL)

# %%
import os, json, inspect, time
import torch, torch.nn as nn, torch.distributed as dist
import matplotlib.pyplot as plt
from dit_core.parity import run_launchers, run_here, compare, parity, format_table, LADDER, SUM_ORDER
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 40
# A small DiT so that two CPU processes train it in seconds; same code as configs/tiny.yaml otherwise.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.05",     # below every step's gradient norm (0.08 and up): clipping acts at every step
         "--overwrite"]   # the /tmp/ch06 folders are scratch: a re-run replaces them
os.chdir("..")  # launchers are run from the repository root

# %% [markdown]
# ## 1. Why averaging gives the single-process gradient
#
# One process, no communication yet: the gradient of the mean loss over 16 samples equals the mean of the gradients
# over two slices of 8. This is the whole mathematical content of data parallelism.

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
x, y = torch.randn(16, 10), torch.randn(16, 1)
full = torch.autograd.grad(nn.functional.mse_loss(net(x), y), net.parameters())
halves = [torch.autograd.grad(nn.functional.mse_loss(net(x[i:i + 8]), y[i:i + 8]), net.parameters()) for i in (0, 8)]
mean = [(a + b) / 2 for a, b in zip(*halves)]
summed = [a + b for a, b in zip(*halves)]
print("mean of slice gradients == full-batch gradient:", all(torch.allclose(f, m, atol=1e-7) for f, m in zip(full, mean)))
print("sum of slice gradients  == full-batch gradient:", all(torch.allclose(f, s, atol=1e-7) for f, s in zip(full, summed)))

# %% [markdown]
# ## 2. The code: buckets, hooks, overlap
#
# The naive version waits for backward to finish, then all-reduces every parameter's gradient, one blocking call each:
# hundreds of small messages, and the network idles during backward. `DataParallel` instead packs gradients into
# **buckets** in *reverse* registration order (backward produces the last layer's gradients first) and launches a
# bucket's all-reduce asynchronously the moment its last gradient is ready, so communication overlaps the rest of
# backward. Like torch DDP, the first bucket is small (1 MiB) so the first message leaves early.

# %%
from dit_core.parallel.ddp import DataParallel
print(inspect.getsource(DataParallel._make_hook))
print(inspect.getsource(DataParallel.finish_gradient_synchronization))

# %% [markdown]
# **A trap worth a cell.** `register_post_accumulate_grad_hook` calls the hook with the **parameter**, whose `.grad`
# now holds the accumulated gradient, not with the gradient itself. A well-known educational framework all-reduced the
# hook's argument, i.e. averaged the *weights*. Look at what the hook receives:

# %%
# NBVAL_CHECK_OUTPUT
w = nn.Parameter(torch.ones(3))
seen = []
w.register_post_accumulate_grad_hook(lambda arg: seen.append(arg))
(w * torch.tensor([1., 2., 3.])).sum().backward()
print("hook argument is the parameter itself:", seen[0] is w, "| its .grad:", w.grad.tolist())

# %% [markdown]
# The buckets of the tiny DiT. A process group of one is enough to build the wrapper here; the real runs below use two
# processes.

# %%
from dit_core.config import load_config
from dit_core.model import DiT
if not dist.is_initialized():
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
cfg = load_config("configs/tiny.yaml")
dp = DataParallel(DiT(cfg.model), bucket_cap_mb=0.25, first_bucket_mb=0.05)
sizes = [sum(p.numel() for p in b) * 4 / 2**20 for b in dp.buckets]
names = {id(p): n for n, p in dp.module.named_parameters()}
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.bar(range(len(sizes)), sizes, color="C0")
ax.set_xlabel("bucket (launch order)"); ax.set_ylabel("MiB")
ax.set_title(f"{len(sizes)} buckets of the tiny DiT (cap 0.25 MiB, first 0.05 MiB)")
for i, b in enumerate(dp.buckets):
    ax.text(i, sizes[i], names[id(b[0])].split(".weight")[0].split(".bias")[0], rotation=90, fontsize=6, va="bottom")
plt.tight_layout()
print("first bucket starts with:", names[id(dp.buckets[0][0])], "| last bucket ends with:", names[id(dp.buckets[-1][-1])])

# %% [markdown]
# Notice the first bucket starts with the *final layer*, the first to get its gradients in backward, so its
# all-reduce can start while the blocks are still differentiating. The patch embedding comes last.
#
# **When does each bucket leave?** `DataParallel.timeline` records the moment each bucket's all-reduce is launched.
# One backward of the wrapped tiny DiT (batch 64) in this process, the moments drawn against the backward's span.
# Independently of the wrapper, a gradient hook on every parameter (`register_hook`, called when autograd has
# computed that parameter's gradient) records the order in which backward produces the gradients, and how many
# buckets had left by then.

# %%
dp.timeline = []
ready = []                                              # (parameter, buckets launched so far), in backward's order
hooks = [p.register_hook(lambda g, n=n: ready.append((n, len(dp.timeline)))) for n, p in dp.module.named_parameters()]
x, t, y = torch.randn(64, 1, 28, 28), torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))
with torch.no_grad():                                   # leave adaLN-Zero's zeros, so gradients reach every layer
    for p in dp.module.parameters():
        p.add_(torch.randn_like(p), alpha=0.02)
start = time.perf_counter(); loss = dp(x, t, y).square().mean(); t_fwd = time.perf_counter()
loss.backward(); t_bwd = time.perf_counter()
dp.finish_gradient_synchronization()
for h in hooks:
    h.remove()
launch = [(at - t_fwd) / (t_bwd - t_fwd) for at, _, _ in dp.timeline]
mib = [nbytes / 2**20 for _, _, nbytes in dp.timeline]
fig, ax = plt.subplots(figsize=(7, 1.8))
ax.barh(0, 1, color="0.85", label="backward")
ax.scatter(launch, [0] * len(launch), s=[60 * m / max(mib) + 10 for m in mib], color="C3", zorder=3, label="bucket launched (size ~ MiB)")
ax.set_yticks([]); ax.set_xlabel("fraction of the backward pass"); ax.legend(fontsize=7, loc="upper left"); plt.tight_layout()
print("buckets launched at these fractions of the backward:", [f"{f:.2f}" for f in launch])

# %%
# NBVAL_CHECK_OUTPUT
launched_by = dict(ready)
to_come = [sum(k > b for _, k in ready) for b in range(len(dp.buckets))]
print(f"{len(ready)} gradients; still to be produced by backward when bucket 0, 1, ... launched: {to_come}")
print(f"each of the {len(dp.buckets)} buckets launched only after all its own gradients were ready:",
      all(launched_by[names[id(p)]] <= b for b, bucket in enumerate(dp.buckets) for p in bucket))
print("every bucket but the last launched while backward still had gradients to produce (overlap):",
      all(c > 0 for c in to_come[:-1]))
first = {names[id(p)] for p in dp.buckets[0]}
print(f"bucket 0 ({len(first)} tensors) holds the first {len(first)} gradients backward produced:",
      first == {n for n, _ in ready[:len(first)]})

# %% [markdown]
# **Notice:** the buckets leave one after another *during* backward, each while backward still has gradients to
# produce; only what is still in flight when backward returns has to be waited for. That is the whole mechanism of
# overlap. The last line is False, and it is worth reading: bucket 0 was filled in reverse *registration* order, so
# besides the final layer it holds the last block's adaLN modulation, and backward produces that gradient last in
# the block (the modulation is computed first in the forward). So bucket 0 leaves once 14 of the 51 gradients exist
# (51 - 37, the first count printed), not after the first 6, and buckets 1 to 3 likewise each wait for the next
# block's modulation. Registration order is not quite backward order; torch DDP rebuilds its buckets after the first
# iteration in the order the gradients really arrived (section 5), `DataParallel` keeps registration order.
#
# Whether overlap *saves time* depends on how long the communication is against the backward. On the two H200s at the
# end of this chapter it is not visible: the naive mode (one blocking all-reduce per parameter, after backward) ran as
# fast as the bucketed one (26,786 vs 26,730 images/s at `configs/mnist.yaml`, 8,779 vs 8,785 at
# `configs/bench.yaml`), because all the gradients cross NVLink in about 0.44 ms of a 55.6 ms step: there is almost
# nothing to hide. On this CPU it was not measured (gloo's transfers would use the same two cores that compute the
# backward). Overlap pays where the link is slow against the compute: across machines on Ethernet, or with a gradient
# as large as the step is short.
#
# ## 3. The proof: two processes train exactly like one
#
# `run_launchers` starts the real launcher, `torchrun --nproc_per_node 2 launchers/ddp.py --impl ...` (gloo, CPU),
# and reads its JSONL logs. A table of runs goes into one job that calls the launcher's `main` once per row, so
# the start-up (importing torch and its compiler stack: ~8 s on a 2-core CPU) is paid once. The single-process
# reference runs in this kernel (`run_here`: the config `launchers/single.py` parses, the same `train` call, one
# thread: bitwise what `python launchers/single.py` logs, which `tests/test_ddp.py` checks). Same seed, same global
# batch of 16 (8 per rank), gradient clipping on; then again with gradient accumulation (梯度累积) 2. Each run is
# compared with the single process by `parity` (`dit_core.parity`): at every step, the loss **and** the gradient norm
# before clipping, each within the tolerance. Section 4 shows why the norm is there.

# %%
cases = [(impl, acc) for acc in (1, 2) for impl in ("single", "hand", "torch", "naive")]
DUMP = ["--set", "run.dump_grads_step=3"]      # every run also writes its step-3 gradients (section 4 compares them)
single = run_here("launchers/single.py", [SMALL + DUMP + ["--grad-accum", str(acc), "--results-dir", f"/tmp/ch06/single{acc}",
                                                          "--dump-grads", f"/tmp/ch06/single{acc}.pt"] for acc in (1, 2)])
# Section 4's broken runs go into the same job (one torchrun start-up for every 2-process run of the chapter).
breaks = {"sum, not mean": ["--break", "average"],
          "seeded by rank, broadcast on": ["--seed-by-rank"],
          "seeded by rank, no broadcast": ["--break", "broadcast"]}
ddp = run_launchers("launchers/ddp.py", [SMALL + DUMP + ["--grad-accum", str(acc), "--impl", impl, "--results-dir", f"/tmp/ch06/{impl}{acc}",
                                                         "--dump-grads", f"/tmp/ch06/{impl}{acc}.pt"]
                                         for impl, acc in cases if impl != "single"]
                    + [SMALL + DUMP + ["--impl", "hand", "--results-dir", f"/tmp/ch06/b{i}", "--dump-grads", f"/tmp/ch06/b{i}.pt"] + flags
                       for i, flags in enumerate(breaks.values())], nproc=2)
broken = dict(zip(breaks, ddp[-len(breaks):]))
logs = iter(ddp)
runs = {(impl, acc): single[acc - 1] if impl == "single" else next(logs) for impl, acc in cases}
print(format_table(runs[("single", 1)], runs[("hand", 1)], "single", "hand x2", limit=6))

# %%
# NBVAL_CHECK_OUTPUT
verdict = {(impl, acc): parity(runs[("single", acc)], log, SUM_ORDER) for (impl, acc), log in runs.items() if impl != "single"}
for (impl, acc), v in verdict.items():
    print(f"{impl:6s} x2, accumulation {acc}: {v.steps == STEPS and 'every step compared'}, loss and gradient norm "
          f"within {SUM_ORDER:.0e}: {'PASS' if v.ok else 'FAIL'}")

# %%
for (impl, acc), v in verdict.items():      # the measured maxima (this 2-core CPU, gloo)
    print(f"{impl:6s} accumulation {acc}: {v}")
parity_curves(runs[("single", 1)], runs[("hand", 1)], names=("single process", "hand-written DDP, 2 processes"));

# %% [markdown]
# **What to notice:** the dashed curves lie on the solid ones, for the loss (left) and the gradient norm (right); the
# differences below are float rounding (the two ranks sum their halves in a different order than one process sums
# the whole), 1e-7 to 5e-7 (printed above; a point at the bottom, 1e-12, is a step where both logged the same
# bits). Parity is checked over many steps on purpose: the DiT's adaLN-Zero initialisation makes
# most first-step gradients exactly zero, so a one-step check would pass even for a wrong implementation.
#
# ### One tolerance ladder for the whole workbook
#
# Every parity check in chapters 04-12, and in the tests, uses one of three rungs (`dit_core.parity.LADDER`), chosen by
# what the strategy changes in the arithmetic, never loosened to make a run pass:
#
# | rung | max relative difference (loss and gradient norm) | when | examples |
# |---|---|---|---|
# | bitwise | 0 | the same operations on the same numbers in the same order | resume from a checkpoint; the in-process reference vs `python launchers/single.py`; tensor parallelism on two H200s (loss only) |
# | sum order | 1e-5 | fp32, only the order of a sum changes; one step rounds about 1e-7 differently and Adam carries it on | DDP (two half-sums added by the all-reduce), accumulation (partial sums of micro-batches), ZeRO (reduce-scatter instead of all-reduce), Ulysses and TP on CPU (sums over split tokens or split hidden units), the pipeline (micro-batch sums) |
# | curve | 5e-2 | bf16/fp16 against fp32: every matmul rounds to 8 or 11 mantissa bits | chapter 04's mixed precision |
#
# Observed in this chapter's correct runs: loss 1.1e-7 to 1.7e-7, gradient norm 1.1e-7 to 4.7e-7, a factor 20 below
# the rung. A real bug lands far outside it: the next section's broken runs miss it by 6.5e-2 (the loss, without the
# broadcast) to 1.0 (the gradient norm, without the average).
#
# A difference past its rung has a first place: section 4 ends with the tool that finds it.
#
# ## 4. Break it: no averaging, no broadcast
#
# `--break average` sums the gradients instead of averaging them: with N = 2 ranks every gradient is twice the right
# one, so the prediction is a gradient norm of 2 x the single process's at every step. `--seed-by-rank` initialises
# every rank differently (as code that seeds by rank would); with the broadcast on, rank 0's weights win and parity
# holds; `--break broadcast` also skips the broadcast. Each is judged twice: by the loss alone, and by `parity`
# (the loss and the gradient norm).

# %%
# (`broken`: these three runs ran in section 3's job)
ref = runs[("single", 1)]
checked = {name: parity(ref, log, SUM_ORDER) for name, log in broken.items()}

# %%
# NBVAL_CHECK_OUTPUT
for name, v in checked.items():
    print(f"{name:30s}: the loss alone {'PASS' if v.loss <= SUM_ORDER else 'FAIL'} | parity (loss and gradient norm) "
          f"{'PASS' if v.ok else 'FAIL'}")
lo, hi = checked["sum, not mean"].norm_ratio
print("sum, not mean: clipping acted at every step of both runs (gradient norm above 0.05):",
      min(r["grad_norm"] for r in ref + broken["sum, not mean"]) > 0.05)
print("sum, not mean: gradient norm / the single process's is N = 2 at every step (within 1e-4):",
      abs(lo / 2 - 1) < 1e-4 and abs(hi / 2 - 1) < 1e-4)

# %%
for name, v in checked.items():                   # measured on this 2-core CPU
    print(f"{name:30s}: {v}")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name, log in broken.items():
    rows = compare(ref, log)
    axes[0].semilogy([r["step"] for r in rows], [max(r["rel"], 1e-12) for r in rows], ".-", label=name)
    norms = compare(ref, log, "grad_norm")
    axes[1].plot([r["step"] for r in norms], [r["b"] / r["a"] for r in norms], ".-", label=name)
axes[0].axhline(SUM_ORDER, color="k", ls=":", label="tolerance"); axes[0].set_title("relative loss difference vs single")
axes[1].set_title("logged grad norm / single's"); axes[1].set_xlabel("step"); axes[0].set_xlabel("step")
axes[0].legend(fontsize=7); plt.tight_layout()

# %% [markdown]
# **What to notice: the loss alone cannot see it.** Summing instead of averaging doubles every gradient: the logged
# gradient norm is 2 x the single process's at every step (right). Yet the broken run's loss agrees with one process
# to float rounding at every step, and a check of the loss alone would PASS it. Two reasons. Clipping acts at every
# step of both runs, and it rescales a gradient to the same length (0.05) in the same direction whatever factor the
# gradient carried. And AdamW divides each gradient by the root of its own running square, which cancels a constant
# factor anyway (up to ε). (With plain SGD and no clipping the step itself would double: arithmetic, not run here.)
# The gradient norm before clipping shows the factor at once, exactly N, which is why `parity` compares it at every
# step and FAILs this run. Without the broadcast the ranks start from different weights: the logged loss is mixed
# from two different models, the averaged gradient belongs to neither, and both numbers leave the single process.
# (All three agree at step 0: adaLN-Zero makes every untrained DiT predict exactly zero, whatever its other
# weights, one more reason to compare many steps.)
#
# **Where does a difference come from?** A loss curve says *that* two runs part; the gradients say *where*. Every
# launcher writes one step's gradients with `--dump-grads PATH` (synchronised across ranks, unscaled, before clipping;
# the step with `--set run.dump_grads_step=N`), and `python -m dit_core.parity grads A B` compares two dumps parameter
# by parameter, in the model's order, and names the first one past the rung. Every run above dumped step 3: at step 0
# adaLN-Zero leaves every gradient exactly zero except the final linear layer's (2 of the 31 parameter tensors of this
# chapter's depth-2 model), so a step-0 comparison would pass for almost any bug; three steps later gradients reach
# every layer.

# %%
from dit_core.parity import compare_grads, read_grads, format_grads
mine = read_grads("/tmp/ch06/single1.pt")
for name, path in {"hand-written DDP": "/tmp/ch06/hand1.pt", "torch DDP": "/tmp/ch06/torch1.pt",
                   "sum, not mean": "/tmp/ch06/b0.pt", "seeded by rank, no broadcast": "/tmp/ch06/b2.pt"}.items():
    rows = compare_grads(mine, read_grads(path))
    bad = [r for r in rows if r["rel"] > SUM_ORDER]
    print(f"== single vs {name}: {len(bad)} of {len(rows)} parameters past {SUM_ORDER:.0e}"
          + (f", the first: {bad[0]['name']}" if bad else ""))
    print(format_grads(rows, SUM_ORDER, limit=3))

# %%
# NBVAL_CHECK_OUTPUT
worst = {n: max(r["rel"] for r in compare_grads(mine, read_grads(p))) for n, p in
         {"hand": "/tmp/ch06/hand1.pt", "sum": "/tmp/ch06/b0.pt"}.items()}
print("hand-written DDP: every parameter's gradient within the sum-order rung:", worst["hand"] <= SUM_ORDER)
print("sum instead of mean: gradients about twice too large (relative difference near 1):", 0.5 < worst["sum"] < 2)

# %% [markdown]
# **Notice:** the correct runs differ from one process by about 1e-7 in every layer; without the averaging every
# parameter's gradient is off by 100% (twice the size, 1.0e+00 in the table: the clipped updates of the first three
# steps were the same up to rounding, so both runs reached step 3 with the same weights up to rounding), and the
# first line of the report names the first layer; without the broadcast the ranks trained different models, and again every layer
# differs. A bug confined to one layer (a wrong split in tensor parallelism, a missed all-reduce of one bucket) shows
# up as that layer alone. `tests/test_grads.py` runs the same comparison for DDP and ZeRO-2/3.
#
# ## 5. What torch DDP adds
#
# `--impl torch` matched too. Beyond what `DataParallel` does, `torch.nn.parallel.DistributedDataParallel` can keep
# gradients *as views into* the bucket memory (no copy in and out; only with `gradient_as_bucket_view=True`,
# default False), runs the reducer in C++, rebuilds buckets after the
# first iteration in the order gradients really arrived, finds unused parameters on request
# (`find_unused_parameters=True`; ours zero-fills them at the end), lets a communication hook compress buckets (fp16,
# PowerSGD), and `join()` handles ranks with uneven numbers of batches. The speed of each version on two GPUs is below.
#
# The views are worth a cell, because the default does not give them. In the process group of one built above, torch
# DDP wraps the tiny DiT twice, with the default and with `gradient_as_bucket_view=True`; after two backward passes we
# count how many separate storages the 51 gradients live in.

# %%
# NBVAL_CHECK_OUTPUT
from torch.nn.parallel import DistributedDataParallel as DDP
def grad_storages(as_view):
    torch.manual_seed(0)
    m = DDP(DiT(cfg.model), gradient_as_bucket_view=as_view, bucket_cap_mb=0.25)
    x, t, y = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    for _ in range(2):                       # the second pass reuses the first pass's .grad tensors
        m.zero_grad(set_to_none=False)
        m(x, t, y).square().mean().backward()
    grads = [p.grad for p in m.parameters()]
    return len({g.untyped_storage().data_ptr() for g in grads}), len(grads)
default, views = grad_storages(False), grad_storages(True)
print(f"default (gradient_as_bucket_view=False): {default[0]} storages for {default[1]} gradients: one each, "
      f"copied into the buckets and back: {default[0] == default[1]}")
print(f"gradient_as_bucket_view=True: {views[0]} storages for {views[1]} gradients: the buckets themselves: "
      f"{views[0] < views[1]}")

# %% [markdown]
# **Notice:** with the default, every gradient has its own tensor *and* the reducer holds bucket buffers beside them,
# so gradients take twice their size and every step copies them in and out; with views the `.grad` tensors *are*
# slices of the buckets. (One catch: a view cannot be replaced, so code that assigns `p.grad = ...` breaks; set the
# gradients to zero in place or let DDP do it.)
#
# **Global or per-GPU batch?** A question asked of the DiT repository itself (facebookresearch/DiT#85: is the paper's
# batch 256 on eight A100s per GPU or in total?). In DiT's `train.py`, as here, the flag is the *global* batch and each
# rank takes its share. Every launcher of this workbook reads `--global-batch-size`, the learning rate belongs to that
# global batch, and the contract (chapter 04) gives rank r a contiguous slice of it:

# %%
# NBVAL_CHECK_OUTPUT
from dit_core.batch import global_batch, shard
gb = global_batch(0, 3, 16, 60000, 1000, 0.1, (1, 28, 28))
for n in (1, 2, 4):
    parts = [shard(gb, r, n) for r in range(n)]
    print(f"--global-batch-size 16 on {n} rank(s): {[len(p) for p in parts]} images per rank, together the same "
          f"16: {torch.equal(torch.cat([p.indices for p in parts]), gb.indices)}")

# %% [markdown]
# ## On two GPUs
#
# Measured once with the project's own tool on 2 x H200 of one host (NVLink), at commit 406e6c2, 2026-11-24
# (`docs/measurements/2xh200-2026-11-24/`; a shared machine, so read the times as ratios inside one log).
# `bash tools/gpu_ddp.sh OUT`: NCCL parity against one GPU, fp32, 30 steps: hand-written 1.22e-7, torch DDP 1.20e-7,
# naive 1.22e-7 (max relative loss difference; that tool compared the loss only, the gradient norm was not compared
# on the GPUs). Throughput in bf16 with 256 images per GPU (scaling efficiency = 2-GPU images/s over twice one
# GPU's):
#
# | config | one GPU img/s | hand-written | torch DDP | naive |
# |---|---|---|---|---|
# | `configs/mnist.yaml` (1.3M parameters, 15.6 ms per step) | 16,422 | 26,730 (81%) | 32,450 (99%) | 26,786 (82%) |
# | `configs/bench.yaml` (32.5M parameters, 55.6 ms per step) | 4,603 | 8,785 (95%) | 8,989 (98%) | 8,779 (95%) |
#
# A 256 MB all-reduce took 0.905 ms: 297 GB/s of bus bandwidth. Notice where the hand-written loop loses: both
# hand-written variants (bucketed 81%, naive 82%) lose about a fifth on a short step (15.6 ms). The naive one has no
# hooks and no buckets, so the loss is not the buckets: per-step Python overhead common to both is the likely cause
# (not measured separately); torch's C++ reducer keeps 99%. On a long step (55.6 ms) the 130 MB of gradients take
# about 0.44 ms on this link and every version scales at 95-98%.

# %%
dist.destroy_process_group()

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** Two processes with accumulation 4 against one process with accumulation 4: max relative loss difference? `torchrun --nproc_per_node 2 launchers/ddp.py --impl hand --config configs/tiny.yaml --device cpu --max-steps 20 --global-batch-size 16 --grad-accum 4` against `python launchers/single.py` with the same flags.
# 2. **Break it.** Section 4 removes the averaging. Predict the ratio of the logged gradient norm to the single-process one with 2 processes, and why the loss curve moves much less than a factor of 2 would suggest.
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-06).

# %% [markdown]
# ## 中文要点
#
# 数据并行（data parallelism）：每个进程算自己那一份数据的梯度，再求平均；只要损失按全局批次平均，平均后的梯度就等于单进程大批次的梯度。
#
# 手写的 DDP 用梯度分桶和反向传播钩子，让通信与计算重叠。
#
# 证明：两个进程与单进程相比，每一步的损失和裁剪前的梯度范数都一致（相对误差 ≤ 1e-5，CPU 上实测约 1e-7 到 5e-7）。
#
# 负对照：去掉求平均（只求和），每个梯度变成 N = 2 倍。每一步都在裁剪，裁剪后的更新方向和长度都不变，AdamW 也会消去常数倍，所以只看损失发现不了（仍在 1e-5 之内）；裁剪前的梯度范数每一步都正好是两倍，parity 判为 FAIL。去掉初始广播（各进程初始权重不同），损失和梯度范数都会偏离。
#
# 两张 H200 上：小模型时手写版本只有 81% 的扩展效率，torch DDP 有 99%；大模型时都在 95% 以上。
