# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · PyTorch internals: the foundations of distributed training
#
# Every distributed strategy in this workbook moves, splits or rebuilds one of four things: **tensors** (and the
# memory behind them), **gradients** (built by autograd), **modules** (their parameters and buffers) and **optimizer
# state**. This chapter opens each one and proves, cell by cell, the facts the later chapters rely on: why an
# all-to-all needs `.contiguous()`, why DDP hooks fire when they do, why Adam's state is what ZeRO partitions first,
# why bf16 needs no loss scaling and fp16 does, and what activation checkpointing trades.

# %%
import os, time
import torch, torch.nn as nn
import matplotlib.pyplot as plt
SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
torch.manual_seed(0)
os.chdir("..")  # configs/ are read from the repository root

# %% [markdown]
# ## 1. Storage, strides and contiguity
#
# A tensor is a view onto a flat block of memory (its *storage*) with a shape and a **stride** per dimension: how
# many elements to step to move one index. `view` only changes shape and strides, so it needs memory laid out in the
# right order; `transpose`/`permute` swap strides without moving data, which leaves the tensor **non-contiguous**.
# `reshape` views when it can and copies when it must; `contiguous()` copies into the natural order. Collectives
# (`all_to_all_single`, `all_reduce`) send flat memory, so the Ulysses chapter calls `.contiguous()` before sending.

# %%
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

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 2.4))
for ax, x, title in ((axes[0], t, "t (3x4), strides (4, 1)"), (axes[1], tt, "t.t() (4x3), strides (1, 4): same memory")):
    ax.imshow(x, cmap="viridis"); ax.set_title(title, fontsize=9); ax.set_xticks([]); ax.set_yticks([])
    for (i, j), v in __import__("numpy").ndenumerate(x.numpy()):
        ax.text(j, i, v, ha="center", va="center", color="w")
plt.tight_layout()

# %% [markdown]
# **What to notice:** the numbers are the *storage offsets*. In the transposed tensor, walking along a row jumps 4
# places in memory: nothing was copied, only the strides changed.
#
# ## 2. Autograd: leaves, `grad_fn`, and gradients that add up
#
# Tensors you create with `requires_grad=True` are **leaves**; every result of an operation records the function that
# made it (`grad_fn`), forming the graph `backward()` walks. `backward()` **adds** into `.grad`: call it twice and the
# gradient doubles. That is exactly what gradient accumulation (梯度累积) uses, and why every training step must zero
# the gradients. `zero_grad(set_to_none=True)` (the default) frees the gradient memory instead of filling it with
# zeros, and DDP's hooks (chapter 06) fire when a leaf's gradient has been accumulated.

# %%
# NBVAL_CHECK_OUTPUT
w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
y = (w * w).sum()
print("w is a leaf:", w.is_leaf, "| y is a leaf:", y.is_leaf, "| y.grad_fn:", type(y.grad_fn).__name__,
      "<-", type(y.grad_fn.next_functions[0][0]).__name__)
y.backward()
print("after one backward: ", w.grad.tolist())
(w * w).sum().backward()
print("after a second one:  ", w.grad.tolist(), "(added, not replaced)")

# %%
# NBVAL_CHECK_OUTPUT
lin = nn.Linear(1024, 1024)
opt = torch.optim.SGD(lin.parameters(), lr=0.1)
lin(torch.randn(8, 1024)).sum().backward()
grad_bytes = lambda: sum(p.grad.numel() * p.grad.element_size() for p in lin.parameters() if p.grad is not None)
opt.zero_grad(set_to_none=False)
print(f"zero_grad(set_to_none=False): gradients still hold {grad_bytes() / 2**20:.2f} MiB of zeros")
opt.zero_grad(set_to_none=True)
print(f"zero_grad(set_to_none=True):  gradients hold {grad_bytes() / 2**20:.2f} MiB (p.grad is None)")

# %% [markdown]
# ## 3. In-place operations on saved tensors break backward
#
# To differentiate `sigmoid`, autograd keeps its *output*. Overwrite that output in place and the saved value is gone.
# Autograd notices through a **version counter** on every tensor and refuses, rather than returning a wrong gradient.

# %%
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


# %% [markdown]
# ## 4. Inside `nn.Module`: parameters, buffers, submodules
#
# A module keeps three dictionaries: `_parameters` (trained, in `parameters()`, moved and saved), `_buffers` (moved
# and saved, not trained; `persistent=False` ones are not saved) and `_modules` (children). `.to()` moves exactly the
# parameters and buffers; a tensor stored as a plain attribute is invisible to it, a classic source of "tensor on the
# wrong device" errors. The DiT's position embedding is a non-persistent buffer: it moves with the model but is
# recomputed, not saved.

# %%
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

# %% [markdown]
# ## 5. Optimizer state: where ZeRO starts
#
# SGD keeps nothing per parameter (or one momentum buffer); Adam keeps **two** fp32 tensors the size of every
# parameter (the running mean and the running mean square of the gradient). Count them on the DiT after one step:

# %%
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

# %% [markdown]
# Sixteen bytes per parameter, and half of it is optimizer state that only the optimizer step reads: ZeRO-1
# (chapter 07) gives each of N ranks 1/N of it. In mixed precision the master copy of the weights joins the optimizer
# state (2 + 2 + 12 bytes), which makes that share even larger.
#
# ## 6. Learning-rate schedules
#
# A scheduler changes `param_group["lr"]` each time `step()` is called. The project uses linear warmup then cosine
# decay (`dit_core.train.lr_factor`) through `LambdaLR`; Accelerate (chapter 08) shows what happens when a scheduler
# is stepped N times per step by mistake.

# %%
from dit_core.train import lr_factor
opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup=100, max_steps=1000, min_ratio=0.05))
lrs = []
for _ in range(1000):
    lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
plt.figure(figsize=(5.5, 2.6)); plt.plot(lrs); plt.xlabel("step"); plt.ylabel("learning rate")
plt.title("warmup 100 steps, cosine to 5% at 1000"); plt.grid(alpha=0.3)

# %%
# NBVAL_CHECK_OUTPUT
print(f"lr at step 0: {lrs[0]:.1e}, peak at step 99: {lrs[99]:.1e}, last: {lrs[-1]:.2e}")

# %% [markdown]
# ## 7. `state_dict` and checkpoints
#
# A checkpoint is a `state_dict`: an ordered mapping from names to tensors, for the model and for the optimizer (its
# state is keyed by parameter *index*, so it only fits the same parameters in the same order). Save, load into a
# fresh model, compare.

# %%
# NBVAL_CHECK_OUTPUT
from dit_core.scratch import scratch_dir           # a folder removed when the kernel exits
path = os.path.join(scratch_dir("ch01-"), "ckpt.pt")
torch.save({"model": dit.state_dict(), "optimizer": adam.state_dict()}, path)
fresh = DiT(load_config("configs/tiny.yaml").model)
ck = torch.load(path, weights_only=True)           # weights_only: tensors and plain containers, no code
fresh.load_state_dict(ck["model"])
print("all weights equal after the round trip:", all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), fresh.state_dict().values())))
print("optimizer state keyed by index:", list(ck["optimizer"]["state"])[:5], "...")

# %% [markdown]
# ## 8. Mixed precision (混合精度): fp16 underflows, bf16 does not
#
# fp16 has 5 exponent bits: numbers below about 6e-8 become 0. Small gradients do exactly that, so fp16 training
# multiplies the loss by a large **loss scale** before backward and divides the gradients by it afterwards
# (`torch.amp.GradScaler`). bf16 keeps fp32's 8 exponent bits (same range) and pays in precision: only 8 significant
# bits, so 1 + 1/512 rounds to 1.

# %%
# NBVAL_CHECK_OUTPUT
g = torch.tensor([1e-3, 1e-6, 1e-8])
print("fp32:", g.tolist())
print("fp16:", g.half().float().tolist(), "<- 1e-8 underflowed to 0")
print("fp16, scaled by 2**16 first:", (g * 2**16).half().float().div(2**16).tolist())
print("bf16:", g.bfloat16().float().tolist(), "<- same range as fp32")
print("1 + 1/512 in bf16:", torch.tensor(1 + 1 / 512).bfloat16().item(), "| in fp16:", torch.tensor(1 + 1 / 512).half().item())

# %%
import numpy as np
xs = np.logspace(-10, 0, 200)
fig, ax = plt.subplots(figsize=(6, 2.8))
for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
    back = torch.tensor(xs, dtype=torch.float32).to(dtype).float().numpy()
    ax.loglog(xs, np.maximum(np.abs(back - xs) / xs, 1e-6), label=name)
ax.axvline(6e-8, color="k", ls=":", label="fp16's smallest subnormal")
ax.set_xlabel("value"); ax.set_ylabel("relative rounding error"); ax.legend(); ax.set_title("where each format loses a value")

# %% [markdown]
# **What to notice:** fp16's error reaches 100% (the value is gone) below 6e-8 and grows well before that (subnormals
# keep fewer bits); bf16's error is flat, about 0.4%, down to 1e-38.
#
# ## 9. Memory: activations, checkpointing, offload
#
# Backward needs tensors saved in forward: the **activations**. Count them exactly with `saved_tensors_hooks`, for an
# MLP stack, with and without **activation checkpointing** (`torch.utils.checkpoint`: keep only each block's input and
# recompute the inside during backward). **CPU offload** (卸载) is the third option, measured at the end of this
# section.

# %%
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

# %%
# NBVAL_CHECK_OUTPUT
print("saved activations grow linearly with the batch:", all(abs(p / plain[0] - b / batches[0]) < 1e-9 for p, b in zip(plain, batches)))
print("checkpointing keeps", f"{plain[-1] / ck[-1]:.1f}x less")

# %%
plain_t, ck_t = step_time(512, False), step_time(512, True)
print(f"forward + backward at batch 512: {plain_t * 1e3:.1f} ms plain, {ck_t * 1e3:.1f} ms with checkpointing "
      f"({ck_t / plain_t:.2f}x: each block's forward runs twice)")

# %% [markdown]
# **What to notice:** checkpointing keeps only each block's input (9x less here), paid for by a second forward
# pass of every block during backward (the time ratio above; forward is about a third of a step, so expect 1.2-1.4x). Sequence parallelism (chapter 09) and ZeRO-3 (chapter 07) attack the same memory
# from other directions: fewer tokens per GPU, fewer parameters per GPU.

# %% [markdown]
# ### CPU offload, measured
#
# `torch.autograd.graph.save_on_cpu` is a pair of `saved_tensors_hooks`: its *pack* hook runs when autograd saves a
# tensor in forward and returns `tensor.cpu()`; its *unpack* hook runs in backward and moves the tensor back to the
# device it came from. On a GPU that frees device memory (a copy over PCIe each way). On a CPU-only machine
# `tensor.cpu()` returns the tensor itself, so it moves nothing; with `pin_memory=True` it makes a fresh host copy
# of every saved tensor (pinned only when CUDA exists), which here only costs a copy.
#
# The cell below wraps each hook's pack in a recorder, runs one DiT block (the tiny config's, after section 5's
# Adam step, so its gates are open) forward and backward, and measures: how many tensors autograd saved and their
# bytes, where the hook kept them, how many bytes it copied, which of the saved tensors' memory (their storages) is
# still allocated after forward beyond what the weights and the inputs hold anyway, and, on a GPU, the device memory
# the forward left allocated. A fourth hook packs each saved tensor into a file, an offload this machine can show:
# after its forward, autograd keeps no saved tensor in memory.

# %%
import copy, shutil, weakref
from torch.autograd.graph import saved_tensors_hooks, save_on_cpu
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
blk = copy.deepcopy(dit.blocks[0]).to(dev)
with torch.no_grad():                             # the block's inputs: 64 noisy images as 16 tokens, their conditioning
    tok = dit.patchify(torch.randn(64, 1, 28, 28)).to(dev)
    cond = dit.condition(torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))).to(dev)

class save_on_disk(saved_tensors_hooks):
    """Offload to files: pack writes a saved tensor's bytes to disk, unpack reads them back for backward."""
    def __init__(self, folder):
        self.written = 0
        def pack(t):
            path = os.path.join(folder, f"{self.written}.bin")
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
            raw.tofile(path)
            self.written += raw.nbytes
            return path, t.dtype, t.shape, t.device
        def unpack(packed):
            path, dtype, shape, device = packed
            return torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(dtype).view(shape).to(device)
        super().__init__(pack, unpack)

def offload_probe(hooks=None):
    """One forward and backward of `blk`, each saved tensor recorded as its pack hook (None: autograd's own) sees it."""
    pack_with, unpack_with = (hooks.pack_hook, hooks.unpack_hook) if hooks else (lambda t: t, lambda t: t)
    r = dict(tensors=0, bytes=0, off_cpu=0, copied=0, on_cpu=0, copies_held=0, kept_on=set())
    storages = []
    def pack(t):
        packed = pack_with(t)
        kept = next((p for p in (packed if isinstance(packed, tuple) else (packed,)) if isinstance(p, torch.Tensor)), None)
        size = t.numel() * t.element_size()
        r["tensors"] += 1; r["bytes"] += size; r["off_cpu"] += size * (t.device.type != "cpu")
        r["kept_on"].add(kept.device.type if kept is not None else "disk")
        r["on_cpu"] += size * (kept is not None and kept.device.type == "cpu")
        if kept is None or kept.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            r["copied"] += size                   # the hook made new memory (or a file) for it
            r["copies_held"] += size * (kept is not None)
        storages.append(weakref.ref(t.untyped_storage()))   # dies when nothing holds that memory any more
        return packed
    x, c = tok.clone().requires_grad_(), cond.clone().requires_grad_()
    held = {t.untyped_storage().data_ptr() for t in (x, c, *blk.parameters())}   # held anyway, by module and caller
    cuda = dev.type == "cuda"
    if cuda: torch.cuda.synchronize(); before = torch.cuda.memory_allocated()
    with saved_tensors_hooks(pack, unpack_with):
        out = blk(x, c)
    if cuda: torch.cuda.synchronize(); r["device_after_forward"] = torch.cuda.memory_allocated() - before
    alive = {st.data_ptr(): st for st in (w() for w in storages) if st is not None and st.data_ptr() not in held}
    r["originals_held"] = sum(st.nbytes() for st in alive.values())          # saved memory forward left allocated
    r["originals_held_off_cpu"] = sum(st.nbytes() for st in alive.values() if st.device.type != "cpu")
    out.square().mean().backward()
    r["grads"] = [x.grad, c.grad, *(p.grad.clone() for p in blk.parameters())]
    blk.zero_grad(set_to_none=True)
    return r

offload_probe()                                   # warm-up: a GPU's first matmul also allocates cuBLAS's workspace
folder = str(scratch_dir("ch01-offload-"))
disk = save_on_disk(folder)
probes = {"autograd's own": offload_probe(), "save_on_cpu(pin_memory=False)": offload_probe(save_on_cpu(False)),
          "save_on_cpu(pin_memory=True)": offload_probe(save_on_cpu(True)), "save_on_disk": offload_probe(disk)}
shutil.rmtree(folder)
MiB = lambda n: f"{n / 2**20:.2f}"
print(f"device: {dev.type}; one DiT block, batch 64, forward + backward. After forward, MiB held for backward:")
print(f"{'saving with':30s} {'tensors':>7s} {'MiB saved':>9s}  {'kept on':7s} {'MiB copied':>10s} "
      f"{'originals':>9s} {'copies':>6s}" + ("  device MiB allocated by forward" if dev.type == "cuda" else ""))
for name, r in probes.items():
    print(f"{name:30s} {r['tensors']:7d} {MiB(r['bytes']):>9s}  {'+'.join(sorted(r['kept_on'])):7s} "
          f"{MiB(r['copied']):>10s} {MiB(r['originals_held']):>9s} {MiB(r['copies_held']):>6s}"
          + (f"  {MiB(r['device_after_forward']):>31s}" if dev.type == "cuda" else ""))

# %%
# NBVAL_CHECK_OUTPUT
own, cpu, pinned, ondisk = probes.values()
print("every hook saw the same tensors as autograd's own saving:",
      all((r["tensors"], r["bytes"]) == (own["tensors"], own["bytes"]) for r in probes.values()))
print("save_on_cpu: bytes kept on the CPU == the saved bytes:", cpu["on_cpu"] == cpu["bytes"],
      "| saved memory left on the device after forward:", cpu["originals_held_off_cpu"])
print("           bytes it copied == saved bytes that were not on the CPU:", cpu["copied"] == cpu["off_cpu"],
      f"({cpu['copied']} here)")
print("save_on_cpu(pin_memory=True) copies every saved byte:", pinned["copied"] == pinned["bytes"])
print("save_on_disk: saved memory held after forward:", ondisk["originals_held"] + ondisk["copies_held"],
      "| bytes in its files == the saved bytes:", disk.written == own["bytes"])
print("gradients bitwise equal to autograd's own saving, under every hook:",
      all(all(torch.equal(a, b) for a, b in zip(r["grads"], own["grads"])) for r in probes.values()))

# %% [markdown]
# **What to notice:** on this CPU-only machine `save_on_cpu` copied 0 bytes and forward left exactly as much saved
# memory allocated as without it: the tensors were already on the CPU, so it moves nothing. `pin_memory=True` copies
# every saved tensor and holds the copies (a little more than the originals, since views are copied one by one), a
# cost with no gain here. Only the hook that writes to disk leaves nothing held, and backward still gives bitwise
# the same gradients, because unpack returns the same numbers. Run on a GPU, the cell adds the device memory the
# forward left allocated: with `save_on_cpu` it falls to about the block's output, and the saved bytes sit in host
# memory (the "copies" column).

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** `x = torch.arange(12).view(3, 4).t()`: is `x` contiguous, and what are its strides?
# 2. **Predict, then run.** `w = torch.ones(3, requires_grad=True)`; call `(w * 2).sum().backward()` twice without zeroing. What is `w.grad`, and which later chapter depends on this behaviour?
# 3. **Predict, then run.** What do `torch.tensor(1e-8, dtype=torch.float16)` and the same in `torch.bfloat16` hold? And `torch.tensor(7e4, dtype=torch.float16)`?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-01).

# %% [markdown]
# ## 中文要点
#
# 张量 = 存储 + 步长：view 共享同一块存储，不连续的张量要先 `contiguous()`。
#
# 梯度是累加的：两次 backward 的梯度相加，这正是梯度累积（gradient accumulation）和数据并行求平均的基础。
#
# Adam 为每个参数保存两个 fp32 状态，优化器状态是参数本身的两倍，这就是 ZeRO 的出发点。
#
# 混合精度（mixed precision）：fp16 的指数位少，小梯度会下溢；bf16 与 fp32 指数位相同，不会下溢。
#
# 激活显存随批次和层数增长；重计算（激活检查点）和卸载用时间换显存。
#
# `save_on_cpu` 只把 GPU 上的保存张量搬到主机内存；在只有 CPU 的机器上它什么也不搬（实测复制 0 字节），梯度逐位相同。
