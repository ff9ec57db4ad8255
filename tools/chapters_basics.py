"""Sources of chapters 01-04 (single process: PyTorch, the DiT, diffusion, the training recipe).
Built and executed by tools/make_notebooks.py like the others."""
from nbcells import code, md

CH01 = [
    md("""
# 01 · PyTorch internals: the foundations of distributed training

Every distributed strategy in this workbook moves, splits or rebuilds one of four things: **tensors** (and the
memory behind them), **gradients** (built by autograd), **modules** (their parameters and buffers) and **optimizer
state**. This chapter opens each one and proves, cell by cell, the facts the later chapters rely on: why an
all-to-all needs `.contiguous()`, why DDP hooks fire when they do, why Adam's state is what ZeRO partitions first,
why bf16 needs no loss scaling and fp16 does, and what activation checkpointing trades.
"""),
    code("""
import os, time
import torch, torch.nn as nn
import matplotlib.pyplot as plt
SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
torch.manual_seed(0)
os.chdir("..")  # configs/ are read from the repository root
"""),
    md("""
## 1. Storage, strides and contiguity

A tensor is a view onto a flat block of memory (its *storage*) with a shape and a **stride** per dimension: how
many elements to step to move one index. `view` only changes shape and strides, so it needs memory laid out in the
right order; `transpose`/`permute` swap strides without moving data, which leaves the tensor **non-contiguous**.
`reshape` views when it can and copies when it must; `contiguous()` copies into the natural order. Collectives
(`all_to_all_single`, `all_reduce`) send flat memory, so the Ulysses chapter calls `.contiguous()` before sending.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
t = torch.arange(12).view(3, 4)
tt = t.t()                                   # transpose: same storage, strides swapped
print("shape", tuple(t.shape), "strides", t.stride(), "| transposed strides", tt.stride())
print("view shares storage:", t.view(4, 3).untyped_storage().data_ptr() == t.untyped_storage().data_ptr())
print("transpose is contiguous:", tt.is_contiguous())
try:
    tt.view(12)
except RuntimeError as e:
    print("view of the transpose fails:", str(e).split(".")[0])
print("reshape of the transpose copies:", tt.reshape(12).data_ptr() != t.data_ptr(), "->", tt.reshape(12).tolist())
print("contiguous() copies into row order:", tt.contiguous().stride())
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(8, 2.4))
for ax, x, title in ((axes[0], t, "t (3x4), strides (4, 1)"), (axes[1], tt, "t.t() (4x3), strides (1, 4): same memory")):
    ax.imshow(x, cmap="viridis"); ax.set_title(title, fontsize=9); ax.set_xticks([]); ax.set_yticks([])
    for (i, j), v in __import__("numpy").ndenumerate(x.numpy()):
        ax.text(j, i, v, ha="center", va="center", color="w")
plt.tight_layout()
"""),
    md("""
**What to notice:** the numbers are the *storage offsets*. In the transposed tensor, walking along a row jumps 4
places in memory: nothing was copied, only the strides changed.

## 2. Autograd: leaves, `grad_fn`, and gradients that add up

Tensors you create with `requires_grad=True` are **leaves**; every result of an operation records the function that
made it (`grad_fn`), forming the graph `backward()` walks. `backward()` **adds** into `.grad`: call it twice and the
gradient doubles. That is exactly what gradient accumulation (梯度累积) uses, and why every training step must zero
the gradients. `zero_grad(set_to_none=True)` (the default) frees the gradient memory instead of filling it with
zeros, and DDP's hooks (chapter 06) fire when a leaf's gradient has been accumulated.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
y = (w * w).sum()
print("w is a leaf:", w.is_leaf, "| y is a leaf:", y.is_leaf, "| y.grad_fn:", type(y.grad_fn).__name__,
      "<-", type(y.grad_fn.next_functions[0][0]).__name__)
y.backward()
print("after one backward: ", w.grad.tolist())
(w * w).sum().backward()
print("after a second one:  ", w.grad.tolist(), "(added, not replaced)")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
lin = nn.Linear(1024, 1024)
opt = torch.optim.SGD(lin.parameters(), lr=0.1)
lin(torch.randn(8, 1024)).sum().backward()
grad_bytes = lambda: sum(p.grad.numel() * p.grad.element_size() for p in lin.parameters() if p.grad is not None)
opt.zero_grad(set_to_none=False)
print(f"zero_grad(set_to_none=False): gradients still hold {grad_bytes() / 2**20:.2f} MiB of zeros")
opt.zero_grad(set_to_none=True)
print(f"zero_grad(set_to_none=True):  gradients hold {grad_bytes() / 2**20:.2f} MiB (p.grad is None)")
"""),
    md("""
## 3. In-place operations on saved tensors break backward

To differentiate `sigmoid`, autograd keeps its *output*. Overwrite that output in place and the saved value is gone.
Autograd notices through a **version counter** on every tensor and refuses, rather than returning a wrong gradient.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
x = torch.randn(4, requires_grad=True)
s = torch.sigmoid(x)
print("version before:", s._version)
s.mul_(2)                                       # in place on a tensor sigmoid's backward needs
print("version after: ", s._version)
try:
    s.sum().backward()
except RuntimeError as e:
    print("backward refuses:", str(e).split(":")[0])
"""),
    md("""
## 4. Inside `nn.Module`: parameters, buffers, submodules

A module keeps three dictionaries: `_parameters` (trained, in `parameters()`, moved and saved), `_buffers` (moved
and saved, not trained; `persistent=False` ones are not saved) and `_modules` (children). `.to()` moves exactly the
parameters and buffers; a tensor stored as a plain attribute is invisible to it, a classic source of "tensor on the
wrong device" errors. The DiT's position embedding is a non-persistent buffer: it moves with the model but is
recomputed, not saved.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("table", torch.zeros(2), persistent=False)
        self.plain = torch.zeros(2)                   # just an attribute
m = Tiny().to(torch.float64)
print("_parameters:", list(m._parameters), "| _modules:", list(m._modules), "| _buffers:", list(m._buffers))
print("dtypes after .to(float64): lin.weight", m.lin.weight.dtype, "| scale", m.scale.dtype, "| plain", m.plain.dtype)
print("state_dict keys:", list(m.state_dict()))
"""),
    md("""
## 5. Optimizer state: where ZeRO starts

SGD keeps nothing per parameter (or one momentum buffer); Adam keeps **two** fp32 tensors the size of every
parameter (the running mean and the running mean square of the gradient). Count them on the DiT after one step:
"""),
    code("""
# NBVAL_CHECK_OUTPUT
from dit_core.config import load_config
from dit_core.model import DiT, count_parameters
dit = DiT(load_config("configs/tiny.yaml").model)
psi = count_parameters(dit)
adam = torch.optim.AdamW(dit.parameters(), lr=1e-3)
dit(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), torch.tensor([3, 4])).square().mean().backward()
adam.step()
state_bytes = sum(v.numel() * v.element_size() for st in adam.state.values() for k, v in st.items() if k != "step")
print("parameters Ψ:", psi)
print("Adam state per parameter:", sorted(k for k in next(iter(adam.state.values())) if k != "step"),
      "=", state_bytes / psi, "bytes")
print("fp32 training per parameter: weights 4 + gradients 4 + Adam 8 =", 4 + 4 + state_bytes // psi, "bytes")
"""),
    md("""
Sixteen bytes per parameter, and half of it is optimizer state that only the optimizer step reads: ZeRO-1
(chapter 07) gives each of N ranks 1/N of it. In mixed precision the master copy of the weights joins the optimizer
state (2 + 2 + 12 bytes), which makes that share even larger.

## 6. Learning-rate schedules

A scheduler changes `param_group["lr"]` each time `step()` is called. The project uses linear warmup then cosine
decay (`dit_core.train.lr_factor`) through `LambdaLR`; Accelerate (chapter 08) shows what happens when a scheduler
is stepped N times per step by mistake.
"""),
    code("""
from dit_core.train import lr_factor
opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup=100, max_steps=1000, min_ratio=0.05))
lrs = []
for _ in range(1000):
    lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
plt.figure(figsize=(5.5, 2.6)); plt.plot(lrs); plt.xlabel("step"); plt.ylabel("learning rate")
plt.title("warmup 100 steps, cosine to 5% at 1000"); plt.grid(alpha=0.3)
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print(f"lr at step 0: {lrs[0]:.1e}, peak at step 99: {lrs[99]:.1e}, last: {lrs[-1]:.2e}")
"""),
    md("""
## 7. `state_dict` and checkpoints

A checkpoint is a `state_dict`: an ordered mapping from names to tensors, for the model and for the optimizer (its
state is keyed by parameter *index*, so it only fits the same parameters in the same order). Save, load into a
fresh model, compare.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
import tempfile
path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
torch.save({"model": dit.state_dict(), "optimizer": adam.state_dict()}, path)
fresh = DiT(load_config("configs/tiny.yaml").model)
ck = torch.load(path, weights_only=True)           # weights_only: tensors and plain containers, no code
fresh.load_state_dict(ck["model"])
print("all weights equal after the round trip:", all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), fresh.state_dict().values())))
print("optimizer state keyed by index:", list(ck["optimizer"]["state"])[:5], "...")
"""),
    md("""
## 8. Mixed precision (混合精度): fp16 underflows, bf16 does not

fp16 has 5 exponent bits: numbers below about 6e-8 become 0. Small gradients do exactly that, so fp16 training
multiplies the loss by a large **loss scale** before backward and divides the gradients by it afterwards
(`torch.amp.GradScaler`). bf16 keeps fp32's 8 exponent bits (same range) and pays in precision: only 8 significant
bits, so 1 + 1/512 rounds to 1.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
g = torch.tensor([1e-3, 1e-6, 1e-8])
print("fp32:", g.tolist())
print("fp16:", g.half().float().tolist(), "<- 1e-8 underflowed to 0")
print("fp16, scaled by 2**16 first:", (g * 2**16).half().float().div(2**16).tolist())
print("bf16:", g.bfloat16().float().tolist(), "<- same range as fp32")
print("1 + 1/512 in bf16:", torch.tensor(1 + 1 / 512).bfloat16().item(), "| in fp16:", torch.tensor(1 + 1 / 512).half().item())
"""),
    code("""
import numpy as np
xs = np.logspace(-10, 0, 200)
fig, ax = plt.subplots(figsize=(6, 2.8))
for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
    back = torch.tensor(xs, dtype=torch.float32).to(dtype).float().numpy()
    ax.loglog(xs, np.maximum(np.abs(back - xs) / xs, 1e-6), label=name)
ax.axvline(6e-8, color="k", ls=":", label="fp16's smallest subnormal")
ax.set_xlabel("value"); ax.set_ylabel("relative rounding error"); ax.legend(); ax.set_title("where each format loses a value")
"""),
    md("""
**What to notice:** fp16's error reaches 100% (the value is gone) below 6e-8 and grows well before that (subnormals
keep fewer bits); bf16's error is flat, about 0.4%, down to 1e-38.

## 9. Memory: activations, checkpointing, offload

Backward needs tensors saved in forward: the **activations**. Count them exactly with `saved_tensors_hooks`, for an
MLP stack, with and without **activation checkpointing** (`torch.utils.checkpoint`: keep only each block's input and
recompute the inside during backward). **CPU offload** is the third option: `torch.autograd.graph.save_on_cpu`
moves saved tensors to host memory and brings them back for backward (a no-op here, where everything is on the CPU).
"""),
    code("""
from torch.utils.checkpoint import checkpoint
blocks = nn.ModuleList([nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)) for _ in range(6)])

def saved_bytes(batch, ckpt):
    params = {p.data_ptr() for p in blocks.parameters()}
    total = [0]
    def pack(x):
        if x.data_ptr() not in params:
            total[0] += x.numel() * x.element_size()
        return x
    h = torch.randn(batch, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        for b in blocks:
            h = h + (checkpoint(b, h, use_reentrant=False) if ckpt else b(h))
    return total[0], h

def step_time(batch, ckpt, reps=3 if SMOKE else 10):
    best = float("inf")
    for _ in range(reps + 1):                   # the first call warms up; the best of the rest is kept
        t0 = time.perf_counter()
        saved_bytes(batch, ckpt)[1].sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best

batches = [64, 128, 256, 512]
plain = [saved_bytes(b, False)[0] / 2**20 for b in batches]
ck = [saved_bytes(b, True)[0] / 2**20 for b in batches]
plt.figure(figsize=(5.5, 2.8))
plt.plot(batches, plain, "o-", label="keep all activations"); plt.plot(batches, ck, "o-", label="activation checkpointing")
plt.xlabel("batch"); plt.ylabel("MiB saved for backward"); plt.legend(); plt.grid(alpha=0.3)
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print("saved activations grow linearly with the batch:", all(abs(p / plain[0] - b / batches[0]) < 1e-9 for p, b in zip(plain, batches)))
print("checkpointing keeps", f"{plain[-1] / ck[-1]:.1f}x less")
"""),
    code("""
plain_t, ck_t = step_time(512, False), step_time(512, True)
print(f"forward + backward at batch 512: {plain_t * 1e3:.1f} ms plain, {ck_t * 1e3:.1f} ms with checkpointing "
      f"({ck_t / plain_t:.2f}x: each block's forward runs twice)")
with torch.autograd.graph.save_on_cpu(pin_memory=False):       # the offload API; on a GPU this moves saved tensors to the host
    out = saved_bytes(64, False)[1]
out.sum().backward()
print("save_on_cpu: backward ran with saved tensors kept on", "cpu")
"""),
    md("""
**What to notice:** checkpointing keeps only each block's input (9x less here), paid for by a second forward
pass of every block during backward (the time ratio above; forward is about a third of a step, so expect 1.2-1.4x). Sequence parallelism (chapter 09) and ZeRO-3 (chapter 07) attack the same memory
from other directions: fewer tokens per GPU, fewer parameters per GPU.
"""),
]

CH04 = [
    md("""
# 04 · The training recipe: accumulation, precision, clipping, schedule, EMA, resume

Chapter 03 trained the DiT; this chapter takes its training loop (`dit_core.train`, the loop every launcher
reuses) apart and proves each ingredient on its own: gradient accumulation (梯度累积) equals the large batch, what
mixed precision (混合精度) changes, what clipping does, the schedule, the EMA, an exact resume, the TensorBoard logs
and `torch.compile`. It ends with the recipe: the defaults and why.
"""),
    code("""
import os, time, tempfile, copy
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.parity import compare, max_rel, format_table
from dit_core.train import train, ema_decay

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 12 if SMOKE else 150
os.chdir("..")
SMALL = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "train.train_subset": 2048,
         "train.global_batch_size": 32, "train.max_steps": STEPS, "train.warmup_steps": max(2, STEPS // 10),
         "train.tensorboard": False, "run.device": "cpu"}

def run(**over):
    o = dict(SMALL, **{"run.results_dir": tempfile.mkdtemp(prefix="ch04-")})
    o.update({k.replace("__", "."): v for k, v in over.items()})
    cfg = load_config("configs/tiny.yaml", o)
    res = train(cfg, quiet=True)
    return [__import__("json").loads(l) for l in open(os.path.join(cfg.run.results_dir, "log.jsonl"))], res, cfg
"""),
    md("""
## 1. Gradient accumulation equals the large batch

With accumulation A the global batch of 32 is processed as A micro-batches of 32/A, each loss divided by A, the
gradients summed by autograd (chapter 01: `backward` adds), one optimizer step at the end. The gradient is the mean
over the same 32 samples, so the run is the same run, with less activation memory.
"""),
    code("""
acc = {a: run(train__grad_accum=a)[0] for a in (1, 2, 4)}
print(format_table(compare(acc[1], acc[4])[:5], "accum 1", "accum 4"))
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for a in (2, 4):
    r = max_rel(compare(acc[1], acc[a]))
    print(f"accumulation {a} vs one batch of 32: {'equal within 1e-5: PASS' if r <= 1e-5 else 'FAIL'}")
"""),
    md("""
## 2. fp32, bf16, fp16

`train.precision` runs the forward under `torch.autocast` (matmuls in 16 bits, weights and optimizer in fp32);
fp16 adds a `GradScaler` (chapter 01, section 8). The curves follow each other but are not equal: mixed precision is
compared with a looser, stated tolerance (here 5% of the loss), never with the 1e-5 of the fp32 proofs.
"""),
    code("""
prec = {p: run(train__precision=p)[0] for p in ("fp32", "bf16", "fp16")}
fig, ax = plt.subplots(figsize=(6, 3))
for p, log in prec.items():
    ax.plot([r["loss"] for r in log], label=p, lw=1.2)
ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(); ax.set_title("the same run in three precisions (CPU autocast)")
for p in ("bf16", "fp16"):
    print(f"{p}: max relative difference to fp32 {max_rel(compare(prec['fp32'], prec[p])):.1e}")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
for p in ("bf16", "fp16"):
    print(f"{p} follows fp32 within 5%:", max_rel(compare(prec["fp32"], prec[p])) <= 0.05,
          "| but is not bitwise fp32:", max_rel(compare(prec["fp32"], prec[p])) > 0)
"""),
    md("""
## 3. Gradient clipping

`clip_grad_norm_` rescales the whole gradient when its norm exceeds the threshold and returns the norm *before*
clipping, which is what the log's `grad_norm` holds. Early in training (and after a bad batch) the norm spikes;
clipping caps the step those spikes take.
"""),
    code("""
free, _, _ = run(train__grad_clip=0.0)
limit = sorted(r["grad_norm"] for r in free)[int(0.8 * len(free))]     # the unclipped run's 80th percentile
clipped, _, _ = run(train__grad_clip=limit)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([r["grad_norm"] for r in free], label="no clipping"); ax.plot([r["grad_norm"] for r in clipped], label=f"clip at {limit:.2f}")
ax.axhline(limit, color="k", ls=":"); ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("gradient norm (before clipping)"); ax.legend()
print(f"clipping at {limit:.3f} acted on {sum(r['grad_norm'] > limit for r in clipped)} of {len(clipped)} steps; "
      f"max relative loss difference to the unclipped run {max_rel(compare(free, clipped)):.1e}")
"""),
    md("""
## 4. Warmup and cosine, from the log

The learning rate each step used is in the log. Warmup matters for Adam: its second-moment estimate starts from
zero, so the first updates are large relative to the gradient; a ramp keeps them small while the estimate settles.
"""),
    code("""
log = acc[1]
plt.figure(figsize=(6, 2.6)); plt.plot([r["lr"] for r in log]); plt.xlabel("step"); plt.ylabel("lr")
plt.title(f"warmup {SMALL['train.warmup_steps']} steps, cosine to 5%"); plt.grid(alpha=0.3)
"""),
    md("""
## 5. EMA: an average of the weights along the way

After every step the EMA weights move a little toward the current ones: `ema = ema + (1 - d)(w - ema)`. The decay
d is warmed up (`min(decay, (1 + n) / (10 + n))`) so a short run still averages trained weights, not the
initialisation. Samples are drawn with the EMA weights (chapter 03 compares the two).
"""),
    code("""
# NBVAL_CHECK_OUTPUT
n = torch.arange(0, 5000)
plt.figure(figsize=(6, 2.6)); plt.semilogx(n + 1, [ema_decay(0.999, int(k)) for k in n]); plt.xlabel("update"); plt.ylabel("decay")
plt.title("EMA decay: warmed up, then 0.999"); plt.grid(alpha=0.3)
_, res, _ = run()
w = dict(res.model.named_parameters())
moved = max((w[k].detach() - v).abs().max().item() for k, v in res.ema.module.named_parameters())
print("EMA weights differ from the last weights:", moved > 0, "| decay after 0, 10, 1000 updates:",
      [round(ema_decay(0.999, k), 4) for k in (0, 10, 1000)])
"""),
    md("""
## 6. Checkpoint and resume, proved exact

Stop a run in the middle (as a job with a time limit would), resume from its checkpoint, and compare with the run
that never stopped. Weights, Adam's moments, the scheduler, the EMA and the step counter are restored; the batches
come from the step number (the determinism contract), so nothing else is needed.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
d = tempfile.mkdtemp(prefix="ch04-resume-")
cfg = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d}))
full = train(cfg, quiet=True)
cfg2 = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d + "/b"}))
train(cfg2, quiet=True, stop_at=STEPS // 2)
cfg3 = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d + "/b", "run.resume": f"{d}/b/checkpoint-{STEPS // 2}"}))
rest = train(cfg3, quiet=True)
print("losses after the resume == the uninterrupted run's, bitwise:", rest.losses == full.losses[STEPS // 2:])
print("final weights equal:", all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), rest.model.state_dict().values())))
"""),
    md("""
## 7. TensorBoard

With `train.tensorboard: true` (the default) rank 0 writes `results/<run>/tb`. Open it with
`tensorboard --logdir results`. The event file is readable from Python too:
"""),
    code("""
# NBVAL_CHECK_OUTPUT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = tempfile.mkdtemp(prefix="ch04-tb-")
train(load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d, "train.tensorboard": True, "train.log_every": 1})), quiet=True)
ev = EventAccumulator(os.path.join(d, "tb")); ev.Reload()
print("scalars:", sorted(ev.Tags()["scalars"]), "| points of train/loss:", len(ev.Scalars("train/loss")) == STEPS)
"""),
    md("""
## 8. `torch.compile`

`torch.compile` traces the model into a graph once and generates fused kernels (Inductor). It must not change the
numbers beyond float rounding. `train.compile: true` turns it on in the loop; here the model alone, forward and
backward. (In CI the check uses the `aot_eager` backend, which traces the graph but skips code generation, to stay
fast; the committed outputs use Inductor.)
"""),
    code("""
from dit_core.model import DiT
torch.manual_seed(0)
m = DiT(load_config("configs/tiny.yaml").model)
with torch.no_grad():
    for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.02)        # leave adaLN-Zero so the output is not all zeros
x, t, y = torch.randn(64, 1, 28, 28), torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))
backend = "aot_eager" if SMOKE else "inductor"
cm = torch.compile(m, backend=backend)
t0 = time.perf_counter(); out_c = cm(x, t, y); first = time.perf_counter() - t0
out_e = m(x, t, y)
def per_step(f, reps=3 if SMOKE else 20):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter(); f(x, t, y).square().mean().backward(); best = min(best, time.perf_counter() - t0)
    return best
print(f"backend {backend}: first call (tracing + compiling) {first:.1f} s; forward+backward {per_step(m) * 1e3:.1f} ms eager, "
      f"{per_step(cm) * 1e3:.1f} ms compiled")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print("compiled output equals eager within 1e-4:", torch.allclose(out_c, out_e, rtol=1e-4, atol=1e-5))
"""),
    md("""
On a GPU the win is larger (fewer kernel launches, fused elementwise work); chapter 11 measures it.

## 9. The recipe

| setting | default (`configs/mnist.yaml`) | why |
|---|---|---|
| optimizer | AdamW, betas (0.9, 0.999), weight decay 0 | as in the DiT paper (AdamW, no weight decay) |
| learning rate | 2e-3 with 300 warmup steps, cosine to 5% (tiny: 3e-3) | warmup protects Adam's first steps; the tiny rate came from the sweep in `docs/results.md` |
| global batch | 4096 (tiny: 32) | GPU throughput: a small model's step is host-bound at smaller batches (chapter 11); on a CPU the budget is images, and the sweep found more, smaller steps better |
| gradient clipping | 1.0 | caps early spikes; inactive once training settles |
| precision | bf16 on GPUs, fp32 for proofs | fp32's range, no loss scaler; proofs need exact fp32 |
| EMA | 0.999 (tiny: 0.995), warmed up | smoother samples; short runs need the warm-up |
| accumulation | 1 | only when the batch does not fit; section 1 proves it changes nothing else |
| checkpoints | every 2000 steps, atomic rename | section 6: resume is exact |
"""),
]

CH02 = [
    md("""
# 02 · A DiT from scratch, checked against `dit_core.model`

A Diffusion Transformer (Peebles & Xie, 2023) predicts the noise in a noisy image. It cuts the image into patches
(tokens), tells every block the timestep and the class through **adaLN** (the conditioning sets a shift, a scale
and a gate for each sub-layer), and turns the tokens back into an image. This chapter writes each piece in a few
lines, then checks that it equals the project's `dit_core.model` **on the same weights**. Then it counts parameters
and FLOPs per piece, and trains the design choices of the course's original block against the project's, to see what
each one costs.
"""),
    code("""
import os, math, time, tempfile
import torch, torch.nn as nn, torch.nn.functional as F
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.model import DiT, DiTBlock, TimestepEmbedder, sincos_pos_embed_2d, modulate

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # the training runs of section 5 use a GPU if there is one
os.chdir("..")
cfg = load_config("configs/tiny.yaml")
torch.manual_seed(0)
dit = DiT(cfg.model)
with torch.no_grad():                    # leave adaLN-Zero's zeros, so every piece below computes something
    for p in dit.parameters():
        p.add_(torch.randn_like(p) * 0.05)
B, p, h = 4, cfg.model.patch_size, cfg.model.hidden_size
x, t, y = torch.randn(B, 1, 28, 28), torch.tensor([0, 10, 500, 999]), torch.tensor([3, 1, 4, 1])
"""),
    md("""
## 1. Patchify and unpatchify: a reshape and a linear map (= a strided convolution)

28x28 pixels in 7x7 patches give a 4x4 grid: 16 tokens of 49 pixels each, each mapped to `hidden` numbers by the same
linear layer. A convolution with kernel = stride = patch size is exactly that. At the other end, the final layer
gives each token 49 numbers and `unpatchify` puts them back in their place in the image.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
def patchify(img, p, weight, bias):
    B, C, H, W = img.shape
    g = H // p
    patches = img.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    return patches @ weight.reshape(weight.shape[0], -1).T + bias

ours = patchify(x, p, dit.x_embedder.weight, dit.x_embedder.bias)
theirs = dit.x_embedder(x).flatten(2).transpose(1, 2)
print("tokens:", tuple(ours.shape), "| equal to the conv:", torch.allclose(ours, theirs, atol=1e-6))
# The way back: the final layer emits p*p numbers per token, and unpatchify lays them out as the image.
print("unpatchify puts every patch back where it came from:", torch.equal(dit.unpatchify(dit.patch_tokens(x)), x))
"""),
    md("""
## 2. Position, timestep and label

Tokens need to know where they are: a fixed 2-D sine-cosine embedding, half of the channels for the row and half for
the column. The timestep gets the same sinusoid treatment (then an MLP), and the label a learned table with one
extra row, the **null class**, used when the label is dropped (classifier-free guidance, chapter 03).
"""),
    code("""
# NBVAL_CHECK_OUTPUT
def sinusoid(pos, dim):                                   # one axis: sin and cos of pos at dim/2 frequencies
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos[:, None].double() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)

def pos_embed_2d(dim, grid):
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sinusoid(rows.reshape(-1), dim // 2), sinusoid(cols.reshape(-1), dim // 2)], dim=1).float()

def timestep_features(t, dim, max_period=10000.0):
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)

print("position embedding equal:", torch.allclose(pos_embed_2d(h, 4), dit.pos_embed[0], atol=1e-6))
print("timestep features equal: ", torch.allclose(timestep_features(t, 256), TimestepEmbedder.sinusoidal(t, 256)))
drop = torch.tensor([False, True, False, True])
labels = torch.where(drop, torch.tensor(cfg.model.num_classes), y)
print("label table rows:", dit.y_embedder.table.num_embeddings, "| dropped labels read the null row:",
      torch.equal(dit.y_embedder.table(labels), dit.y_embedder(y, drop)))
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
pe = pos_embed_2d(64, 14)
axes[0].imshow((pe @ pe.T)[7 * 14 + 7].reshape(14, 14)); axes[0].set_title("similarity of every position to the centre (14x14 grid)", fontsize=9)
axes[1].imshow(timestep_features(torch.arange(0, 1000, 5), 128).T, aspect="auto", cmap="RdBu")
axes[1].set_xlabel("timestep / 5"); axes[1].set_ylabel("channel"); axes[1].set_title("timestep features", fontsize=9)
plt.tight_layout()
"""),
    md("""
**What to notice:** the similarity peaks at the centre and falls off smoothly in both directions, so nearby
patches look alike to attention before any training; the timestep channels run from fast to slow oscillation, so
both small and large differences in t are visible.

## 3. Attention, and the adaLN-Zero block

Attention: softmax(q kᵀ / √d) v per head, with d the **head** dimension. The block: LayerNorm without its own
scale and shift, then `modulate` with the shift and scale computed from the conditioning c, the sub-layer, and a
**gate** (also from c) on the residual branch. Six vectors per block, from one linear layer on c.
"""),
    code("""
def attention(x, qkv, proj, heads):
    B, S, D = x.shape
    q, k, v = (qkv(x).view(B, S, 3, heads, -1).permute(2, 0, 3, 1, 4))   # each (B, heads, S, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D))

def block(blk, x, c, heads):
    shift1, scale1, gate1, shift2, scale2, gate2 = blk.adaLN_modulation(c).chunk(6, dim=1)
    ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=1e-6)
    x = x + gate1[:, None] * attention(ln(x) * (1 + scale1[:, None]) + shift1[:, None], blk.attn.qkv, blk.attn.proj, heads)
    return x + gate2[:, None] * blk.mlp.fc2(F.gelu(blk.mlp.fc1(ln(x) * (1 + scale2[:, None]) + shift2[:, None]), approximate="tanh"))
"""),
    code("""
# NBVAL_CHECK_OUTPUT
tokens, c = dit.patchify(x), dit.condition(t, y)
blk = dit.blocks[0]
print("block equal to dit_core's DiTBlock:", torch.allclose(block(blk, tokens, c, cfg.model.num_heads), blk(tokens, c), atol=1e-5))

def my_dit(model, x, t, y):                      # the whole forward, from the pieces above
    h = patchify(x, p, model.x_embedder.weight, model.x_embedder.bias) + pos_embed_2d(model.cfg.hidden_size, model.grid)
    c = model.t_embedder.mlp(timestep_features(t, 256)) + model.y_embedder.table(y)
    for b in model.blocks:
        h = block(b, h, c, model.cfg.num_heads)
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    out = model.final_layer.linear(F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    return model.unpatchify(out)
print("whole DiT equal to dit_core.model.DiT:", torch.allclose(my_dit(dit, x, t, y), dit(x, t, y), atol=1e-5))
"""),
    md("""
**Why zero-init (the "Zero" in adaLN-Zero).** The modulation's last layer and the output layer start at zero: every
gate is 0, so every block starts as the identity and the untrained model predicts exactly zero noise. Training
opens the gates gradually, which makes deep DiTs train stably from the first step.
"""),
    code("""
# NBVAL_CHECK_OUTPUT
fresh = DiT(cfg.model)
tok, cc = fresh.patchify(x), fresh.condition(t, y)
print("untrained DiT predicts all zeros:", torch.count_nonzero(fresh(x, t, y)).item() == 0,
      "| every block is the identity:", all(torch.equal(b(tok, cc), tok) for b in fresh.blocks))
"""),
    md("""
## 4. Parameters and FLOPs per piece

`torch.utils.flop_counter.FlopCounterMode` counts the floating-point operations of each module in one forward
(a multiply-add counts 2). Batch 1.
"""),
    code("""
from torch.utils.flop_counter import FlopCounterMode
from dit_core.model import count_parameters

def flops_by_module(model, patch):
    m = DiT(load_config("configs/tiny.yaml", {"model.patch_size": patch}).model)
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 1, 28, 28), torch.tensor([1]), torch.tensor([1]))
    counts = fc.get_flop_counts()
    total = lambda name: sum(counts.get(name, {}).values())
    rows = {"patch embedding": "DiT.x_embedder", "timestep MLP": "DiT.t_embedder", "label table": "DiT.y_embedder",
            "attention (all blocks)": [f"DiT.blocks.{i}.attn" for i in range(len(m.blocks))],
            "MLP (all blocks)": [f"DiT.blocks.{i}.mlp" for i in range(len(m.blocks))],
            "adaLN modulation": [f"DiT.blocks.{i}.adaLN_modulation" for i in range(len(m.blocks))] + ["DiT.final_layer.adaLN_modulation"],
            "final linear": "DiT.final_layer.linear"}
    mods = dict(m.named_modules())
    out = {}
    for label, names in rows.items():
        names = [names] if isinstance(names, str) else names
        params = sum(count_parameters(mods[n.removeprefix("DiT.")]) for n in names)
        out[label] = (params, sum(total(n) for n in names))
    return out, total("DiT"), count_parameters(m)

for patch in (7, 4):
    table, tot, psi = flops_by_module(dit, patch)
    print(f"patch {patch} ({(28 // patch) ** 2} tokens): {psi:,} parameters, {tot / 1e6:.2f} MFLOPs per image")
    for k, (n, f) in table.items():
        print(f"   {k:24s} {n:>8,} params ({n / psi:5.1%})   {f / 1e6:7.3f} MFLOPs ({f / tot:5.1%})")
"""),
    md("""
**What to notice:** the adaLN modulation holds a large share of the *parameters* (six vectors of width `hidden` per
block) but almost none of the *FLOPs*: it runs once per image, not once per token. Attention and MLP FLOPs grow with
the tokens (patch 4: 49 tokens, three times the work of patch 7), the parameters do not.

## 5. The course's original block, measured

The course this workbook grew from wrote its DiT block differently in four places:

| | course's block | this project (and the DiT paper) |
|---|---|---|
| heads | every head as wide as the model (q, k, v each heads x hidden) | hidden split over the heads (head dim = hidden / heads) |
| adaLN | modulation initialised like any linear layer | zero-initialised (gates closed) |
| position embedding | `torch.rand` (uniform in [0, 1), learned) | fixed 2-D sine-cosine |
| attention scale | scores / √(sequence length) | scores / √(head dim) |

Each difference alone, then all four together, trained with the same batches (tiny config) for a short run:
"""),
    code("""
from dit_core.model import Attention
from dit_core.train import train

def full_width_heads(m):
    for b in m.blocks:
        H, D = m.cfg.num_heads, m.cfg.hidden_size
        b.attn.head_dim = D                                   # each head as wide as the model
        b.attn.qkv, b.attn.proj = nn.Linear(D, 3 * H * D), nn.Linear(H * D, D)
def plain_adaln(m):
    for lin in [b.adaLN_modulation[-1] for b in m.blocks] + [m.final_layer.adaLN_modulation[-1], m.final_layer.linear]:
        lin.reset_parameters()                                 # nn.Linear's default init: gates open at random
def rand_pos(m):
    del m.pos_embed
    m.pos_embed = nn.Parameter(torch.rand(1, m.num_tokens, m.cfg.hidden_size))
def seq_len_scale(m):
    def attn(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1 / math.sqrt(q.shape[1]))
        return out.transpose(1, 2)
    m.set_attention(attn)

VARIANTS = {"project (DiT paper)": [], "full-width heads": [full_width_heads], "adaLN not zero-init": [plain_adaln],
            "torch.rand position": [rand_pos], "scale by sqrt(seq len)": [seq_len_scale],
            "course's block (all four)": [full_width_heads, plain_adaln, rand_pos, seq_len_scale]}
STEPS = 30 if SMOKE else 600
logs, models = {}, {}
for name, changes in VARIANTS.items():
    def make(mc, changes=changes):
        torch.manual_seed(0)
        m = DiT(mc)
        for change in changes:
            change(m)
        return m
    d = tempfile.mkdtemp(prefix="ch02-")
    c = load_config("configs/tiny.yaml", {"train.max_steps": STEPS, "train.warmup_steps": min(200, STEPS // 3),
                                          "train.tensorboard": False, "run.device": DEVICE, "run.results_dir": d})
    t0 = time.perf_counter()
    res = train(c, quiet=True, model_fn=make)
    logs[name], models[name] = res.losses, res.ema.module
    print(f"{name:28s} {count_parameters(res.model):>9,} params  {time.perf_counter() - t0:5.1f} s  "
          f"mean loss of the last 100 steps {sum(res.losses[-100:]) / len(res.losses[-100:]):.4f}")
"""),
    code("""
import numpy as np
fig, ax = plt.subplots(figsize=(7, 3.5))
for name, l in logs.items():
    k = max(1, min(50, len(l) // 5))
    ax.plot(np.convolve(l, np.ones(k) / k, mode="valid"), label=name, lw=2.5 if name.startswith("project") else 1.2)
ax.set_xlabel("step"); ax.set_ylabel(f"loss (moving mean)"); ax.legend(fontsize=7); ax.grid(alpha=0.3)
ax.set_title("same batches, same steps: the four differences")
"""),
    code("""
from dit_core.diffusion import Diffusion
from dit_core.plots import grid_array
diffusion = Diffusion(cfg.diffusion, DEVICE)
fig, axes = plt.subplots(1, len(models), figsize=(2.2 * len(models), 2.6))
for ax, (name, m) in zip(axes, models.items()):
    imgs = diffusion.sample(m.eval(), torch.arange(10, device=DEVICE).repeat(2), cfg_scale=cfg.sample.cfg_scale, steps=25, seed=0)
    ax.imshow(grid_array(imgs, nrow=10), cmap="gray"); ax.set_title(name, fontsize=7); ax.axis("off")
plt.tight_layout()
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print("16 tokens and head dim 64/4 = 16: the two scales are the same number, and so is the run:",
      logs["scale by sqrt(seq len)"] == logs["project (DiT paper)"])
"""),
    md("""
**What to notice.** The runs are short (600 steps of 32 images on a CPU), so read the ordering, not the digits.
Here the zero-init matters most: without it every block starts as a random perturbation instead of the identity,
and the loss stays clearly higher. Full-width heads cost 60% more parameters (and attention FLOPs) for a loss no
better than the project's. A `torch.rand` position embedding is learned quickly enough at 16 tokens that the loss
barely moves. The √(sequence length) scale is a silent bug: at the tiny config it happens to equal √(head dim)
(16 tokens, head dim 16), so the run is *identical*; at patch 4 (49 tokens) the scores would be divided by 7
instead of 4, at patch 2 (196 tokens) by 14, flattening attention more the longer the sequence. In the course's
block the full-width heads make the head dim 64, so there the two scales differ (4 against 8).
"""),
]

CH03 = [
    md("""
# 03 · Diffusion: noising, the objective, sampling, guidance, evaluation

**The idea** (Ho et al., 2020). Destroy an image step by step with Gaussian noise until nothing is left; train a
network to predict the noise that was added at any step; then run the destruction backwards, from pure noise to an
image, with the network's prediction at each step. Forward: x_t = √ᾱ_t · x_0 + √(1-ᾱ_t) · ε, where ᾱ_t falls from 1
to almost 0 over T = 1000 steps. Objective: ‖ε - ε_θ(x_t, t, y)‖², at a random t for every image.
"""),
    code("""
import os, time, tempfile
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.data import load_mnist
from dit_core.diffusion import Diffusion, make_betas
from dit_core.plots import grid_array

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # training and sampling use a GPU if there is one
os.chdir("..")
cfg = load_config("configs/tiny.yaml")
diffusion = Diffusion(cfg.diffusion)
data = load_mnist("train")
"""),
    md("""
## 1. Forward noising of real digits
"""),
    code("""
x0, _ = data.gather(torch.arange(6))
ts = [0, 50, 100, 250, 500, 750, 999]
g = torch.Generator().manual_seed(0)
noise = torch.randn(x0.shape, generator=g)
rows = [diffusion.q_sample(x0, torch.full((6,), s), noise) for s in ts]
fig, axes = plt.subplots(1, len(ts), figsize=(1.6 * len(ts), 5))
for ax, s, r in zip(axes, ts, rows):
    ax.imshow(grid_array(r, nrow=1), cmap="gray"); ax.set_title(f"t = {s}", fontsize=9); ax.axis("off")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
t = torch.full((200000,), 500)
xt = diffusion.q_sample(torch.zeros(200000, 1, 1, 1), t, torch.randn(200000, 1, 1, 1))
ab = diffusion.alphas_cumprod[500].item()
print("q_sample(x0=0, t=500) has std sqrt(1 - abar_500):", abs(xt.std().item() - (1 - ab) ** 0.5) < 0.01)
print(f"abar at t = 0, 250, 500, 999: {[round(diffusion.alphas_cumprod[s].item(), 4) for s in (0, 250, 500, 999)]}")
"""),
    md("""
**What to notice:** by t = 500 the digit is hard to see, and well before t = 999 nothing of it is left. The linear
schedule spends many steps at high noise.

## 2. Schedules: linear and cosine

ᾱ_t and the signal-to-noise ratio SNR = ᾱ/(1-ᾱ) for the linear schedule (this project's default, as in DDPM) and
the cosine schedule (Nichol & Dhariwal, 2021), which destroys information more evenly.
"""),
    code("""
import numpy as np
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for name in ("linear", "cosine"):
    ab_ = np.cumprod(1 - make_betas(name, 1000))
    axes[0].plot(ab_, label=name); axes[1].semilogy(ab_ / (1 - ab_), label=name)
axes[0].set_title("ᾱ_t (signal kept)"); axes[1].set_title("SNR"); [a.set_xlabel("t") or a.legend() for a in axes]
plt.tight_layout()
"""),
    md("""
## 3. A short training run

The tiny config on this CPU. (The GPU config, `configs/mnist.yaml`, trains in about 1.5 minutes on one H100 and
passes 99% sample accuracy with a feature FID under 3x its floor after 60-75 s: chapter 11 and `docs/results.md`.)
"""),
    code("""
from dit_core.train import train
STEPS = 150 if SMOKE else 4000
d = tempfile.mkdtemp(prefix="ch03-")
run_cfg = load_config("configs/tiny.yaml", {"train.max_steps": STEPS, "train.warmup_steps": min(200, STEPS // 5),
                                            "train.tensorboard": False, "run.device": DEVICE, "run.results_dir": d})
t0 = time.perf_counter()
res = train(run_cfg, quiet=True)
print(f"{STEPS} steps of {run_cfg.train.global_batch_size} images in {time.perf_counter() - t0:.0f} s")
l = np.array(res.losses); k = max(1, min(100, len(l) // 10))
plt.figure(figsize=(6, 2.8)); plt.plot(np.convolve(l, np.ones(k) / k, mode="valid")); plt.xlabel("step"); plt.ylabel("loss (moving mean)"); plt.grid(alpha=0.3)
"""),
    md("""
## 4. DDPM and DDIM sampling

DDPM walks back through all 1000 steps, adding fresh noise each time. DDIM (Song et al., 2021) takes a
deterministic path through a subsequence of the steps: here 50, 20x fewer network calls.
"""),
    code("""
from dit_core.evaluate import score_samples, format_report
ema = res.ema.module.eval()
diffusion = Diffusion(cfg.diffusion, DEVICE)
N_PER = 3 if SMOKE else 30
labels = torch.arange(10, device=DEVICE).repeat_interleave(N_PER)
samples, timing = {}, {}
for sampler, steps in (("ddpm", 1000), ("ddim", 50)):
    t0 = time.perf_counter()
    samples[sampler] = diffusion.sample(ema, labels, cfg_scale=cfg.sample.cfg_scale, sampler=sampler, steps=steps, seed=0)
    if DEVICE == "cuda":
        torch.cuda.synchronize()                 # GPU work is asynchronous: wait for it before reading the clock
    timing[sampler] = time.perf_counter() - t0
scores = {s: score_samples(samples[s], labels, DEVICE) for s in samples}
for s in samples:
    print(f"{s}: {timing[s]:.1f} s for {len(labels)} images, sample accuracy {scores[s]['accuracy']:.0%}")
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for ax, s in zip(axes, samples):
    ax.imshow(grid_array(samples[s][::N_PER], nrow=10), cmap="gray"); ax.set_title(s); ax.axis("off")
"""),
    code("""
# NBVAL_CHECK_OUTPUT
print("DDIM ran 20x fewer network calls and was faster:", timing["ddim"] < timing["ddpm"])
print("both samplers return images in [-1, 1]:", all(s.min() >= -1 and s.max() <= 1 for s in samples.values()))
"""),
    md("""
## 5. Classifier-free guidance

During training 10% of the labels are replaced by the null class, so one network learns both ε(x, t, y) and
ε(x, t, ∅). At sampling time guidance extrapolates from the unconditional prediction toward the conditional one:
ε = ε(∅) + s · (ε(y) - ε(∅)). s = 0 ignores the label, s = 1 is the plain conditional model, larger s trades
variety for fidelity to the class.
"""),
    code("""
scales = [0.0, 1.0, 3.0, 5.0, 8.0]
fig, axes = plt.subplots(1, len(scales), figsize=(2.4 * len(scales), 2.8))
acc = {}
for ax, s in zip(axes, scales):
    imgs = diffusion.sample(ema, torch.arange(10, device=DEVICE).repeat(2), cfg_scale=s, steps=50, seed=1)
    ax.imshow(grid_array(imgs, nrow=10), cmap="gray"); ax.set_title(f"guidance {s}", fontsize=9); ax.axis("off")
    acc[s] = score_samples(imgs, torch.arange(10, device=DEVICE).repeat(2), DEVICE)["accuracy"]
plt.tight_layout()
print("sample accuracy by guidance scale:", {s: f"{a:.0%}" for s, a in acc.items()})
"""),
    md("""
## 6. EMA against the raw weights, and the evaluation numbers

`dit_core.evaluate` reads generated digits with a small CNN trained on MNIST (99% on the test set): the share read
as the class they were generated for (per class), and a Fréchet distance between the CNN's features of generated and
real digits (feature FID), next to its floor, the same distance between two sets of *real* digits.
"""),
    code("""
raw = res.model.eval()
for name, m in (("EMA weights", ema), ("raw weights", raw)):
    imgs = diffusion.sample(m, labels, cfg_scale=cfg.sample.cfg_scale, steps=50, seed=2)
    print(name + ":", format_report(score_samples(imgs, labels, DEVICE)))
"""),
    md("""
**What to notice.** A few minutes of CPU training give digits the classifier reads far better than chance (10%)
but far from the 99.7% of the GPU run: `docs/results.md` ("choosing the tiny config") explains why a DiT is slow to
lay out a whole digit with epsilon prediction at this budget. Guidance is what makes the short run's classes
readable at all: s = 0 (and here s = 1) read near chance, s = 3 best, and very strong guidance loses again. With 20
images per scale these are rough; with 300 samples the standard error of an accuracy near 28% is still about 2.6
points, which is why the EMA and the raw weights of this short run cannot be told apart by accuracy (the EMA's
feature FID is a little lower).
"""),
]
