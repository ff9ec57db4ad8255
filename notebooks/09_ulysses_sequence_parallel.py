# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Sequence parallelism: Ulysses (序列并行)
#
# **The idea.** Data parallelism splits the *batch*; sequence parallelism splits *each sample*. A DiT cuts an image
# into tokens, and the activations a training step keeps grow with the token count: a 256x256 latent at patch 2 is
# 1024 tokens, a short video tens of thousands. Past some length one sample's activations no longer fit one GPU,
# and adding GPUs to the batch does not help.
#
# Split the tokens instead: with P ranks in a sequence-parallel group, rank r holds tokens [r·N/P, (r+1)·N/P) of every
# image. Almost everything in a DiT block acts on each token by itself (LayerNorm, the MLP, adaLN's shift, scale and
# gate), so it runs on the local tokens unchanged. The one exception is attention, where every token looks at every
# other. DeepSpeed-Ulysses (Jacobs et al., 2023) fixes attention with one **all-to-all**: it trades the sequence split
# for a *head* split, runs ordinary attention on H/P heads over all N tokens (heads never talk to each other), and
# trades back.
#
# The course calls this chapter "Odysseus". The code: `dit_core/parallel/ulysses.py` (~200 lines) and
# `launchers/ulysses.py`:
#
#     torchrun --nproc_per_node 2 launchers/ulysses.py --sp-degree 2 --config configs/tiny.yaml --device cpu   # 2 CPU processes
#     torchrun --nproc_per_node 2 launchers/ulysses.py --sp-degree 2 --config configs/ulysses.yaml            # 2 GPUs (NCCL)
#     torchrun --nproc_per_node 4 launchers/ulysses.py --sp-degree 2 --config configs/ulysses.yaml            # DP 2 x SP 2

# %%
import os, json, inspect, subprocess, sys
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.model import DiT
from dit_core.parity import run_launcher, run_launchers, run_here, compare, parity, format_table, SUM_ORDER
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
# 16 tokens (patch 7) and 4 heads: both divide by P = 2 (and 4). Gradient clipping at 0.05, below every step's
# gradient norm (0.08 and up): clipping acts at every step, the case in which section 5's first bug hides best.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.05",
         "--overwrite"]   # the /tmp/ch09 folders are scratch: a re-run replaces them
os.chdir("..")  # launchers are run from the repository root


# %% [markdown]
# ## 1. Why: activations grow with the tokens
#
# Count the bytes autograd keeps for backward (`saved_tensors_hooks` sees every tensor it saves) in one forward of
# the tiny DiT, for one image, at four patch sizes. The weights themselves are not counted.

# %%
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

# %%
# NBVAL_CHECK_OUTPUT
per_token = [b / n for n, b in sizes]
print("activation memory grows with the token count:", all(b2 > b1 for (_, b1), (_, b2) in zip(sizes, sizes[1:])))
print("per token it stays within 2x:", max(per_token) / min(per_token) < 2)

# %% [markdown]
# **What to notice.** Memory per token is about constant, so memory grows linearly with the token count: at patch 1
# (784 tokens) one image keeps ~50x what it keeps at patch 7. (PyTorch's fused attention keeps no N x N score matrix;
# a naive attention would add a term that grows with N².) Sequence parallelism divides every one of these tensors
# by P: the token-wise ones because each rank has N/P tokens, the attention ones because each rank has H/P heads.
#
# ## 2. The all-to-all: sequence-sharded ↔ head-sharded
#
# Each square is one token's q (or k, v) for one head. Before: rank 0 holds tokens 0-3 of all heads. After one
# all-to-all: rank 0 holds all tokens of heads 0-1. Each rank keeps the block it already had and sends the other
# (P-1)/P of its data, one chunk to each other rank. The inverse all-to-all brings the attention output back.

# %%
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

# %% [markdown]
# ## 3. The code
#
# `all_to_all` cuts one dimension into P chunks and sends chunk j to rank j (`dist.all_to_all_single`); the chunk
# received from rank j lands at position j of another dimension. As an autograd function, its backward is the same
# exchange with the two dimensions swapped: every gradient goes back to the rank its input came from. q, k and v are
# stacked so the forward sends one message, not three.

# %%
from dit_core.parallel import ulysses
print(inspect.getsource(ulysses.all_to_all))
print(inspect.getsource(ulysses.ulysses_attention))

# %% [markdown]
# The DiT is not copied. `SequenceParallelDiT` calls the model's own `forward_tokens` on a token slice (each rank adds
# its slice of the position embedding), and swaps Ulysses into every block through the model's attention hook
# `set_attention`. The loss is the one subtle line: each rank sees only its tokens, so it sums its squared errors and
# divides by the element count of the **whole** micro-batch. The P partial losses of a group then add up to the
# group's mean loss, and their gradients add up to its gradient, which is why the group **sums** gradients (data
# parallelism, across groups, averages them; one all-reduce over all ranks divided by the number of groups does both).

# %%
print(inspect.getsource(ulysses.SequenceParallelDiT.forward))
print(inspect.getsource(ulysses.UlyssesStrategy.loss))

# %% [markdown]
# ## 4. The proof
#
# First the primitive, with the same two-process check the test suite runs: every rank builds the same full q, k, v,
# keeps its slice, and compares Ulysses attention (output and the gradients of q, k and v) with full attention computed
# locally; then DeepSpeed's `DistributedAttention` on the same call; then the bytes of one training step's all-to-alls.

# %%
os.makedirs("/tmp/ch09", exist_ok=True)
r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "tests/ulysses_checks.py", "/tmp/ch09/checks.json"], capture_output=True, text=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd()))
assert r.returncode == 0, r.stderr[-2000:]
checks = json.load(open("/tmp/ch09/checks.json"))
for impl in ("ours", "deepspeed"):
    print(f"{impl:9s}: max relative difference to full attention (output, dq, dk, dv; both ranks) = {checks[impl]['worst']:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
for impl in ("ours", "deepspeed"):
    print(f"{impl:9s} Ulysses attention == full attention (<= 1e-5):", checks[impl]["worst"] <= 1e-5)

# %% [markdown]
# They agree exactly (0.0): attention is computed per head, and each head meets the same numbers in the same order as
# in one process. Now training: the single-process run against two ranks sharing every image (SP 2), with gradient
# accumulation (梯度累积) 2 as well, and four processes as DP 2 x SP 2.

# %%
# run_launchers: one job per table of runs (the launcher's main once per row, one start-up).
single = run_here("launchers/single.py", [SMALL + ["--grad-accum", str(acc), "--results-dir", f"/tmp/ch09/s{acc}"]
                                               for acc in (1, 2)])
# Section 5's broken runs go into the same job: one torchrun start-up for every 2-process run of the chapter.
breaks = ("loss-norm", "grad-group")
sp = run_launchers("launchers/ulysses.py", [SMALL + ["--grad-accum", str(acc), "--sp-degree", "2", "--results-dir", f"/tmp/ch09/u{acc}"]
                                            for acc in (1, 2)]
                   + [SMALL + ["--sp-degree", "2", "--break", b, "--results-dir", f"/tmp/ch09/{b}"] for b in breaks], nproc=2)
broken = dict(zip(breaks, sp[2:]))
runs = {}
for acc in (1, 2):
    runs[("single", acc)], runs[("SP 2", acc)] = single[acc - 1], sp[acc - 1]
runs[("DP 2 x SP 2", 1)] = run_launcher("launchers/ulysses.py", SMALL + ["--sp-degree", "2", "--results-dir", "/tmp/ch09/dp2sp2"], nproc=4)
print(format_table(runs[("single", 1)], runs[("SP 2", 1)], "single", "SP 2", limit=6))

# %%
# NBVAL_CHECK_OUTPUT
verdict = {(name, acc): parity(runs[("single", acc)], log, SUM_ORDER) for (name, acc), log in runs.items() if name != "single"}
for (name, acc), v in verdict.items():
    print(f"{name:12s} accumulation {acc}: {v.steps == STEPS and 'every step compared'}, loss and gradient norm "
          f"within {SUM_ORDER:.0e}: {'PASS' if v.ok else 'FAIL'}")

# %%
for (name, acc), v in verdict.items():      # the measured maxima (this 2-core CPU, gloo)
    print(f"{name:12s} accumulation {acc}: {v}")
parity_curves(runs[("single", 1)], runs[("SP 2", 1)], names=("single process", "Ulysses, 2 ranks share each image"));

# %% [markdown]
# **What to notice.** The loss and the gradient norm before clipping both agree with one process to float rounding
# (~1e-7): each rank sums its half of the squared errors and the all-reduce adds the halves, a different order than
# one process summing all of them: the sum-order rung (1e-5) of the tolerance ladder (`dit_core.parity.LADDER`,
# chapter 06).
#
# ## 5. Break it: two bugs that shipped
#
# Sequence parallelism is easy to get *almost* right. Two switches reproduce real bugs:
#
# * `--break loss-norm`: each rank takes the **mean** over its own tokens (the natural thing to write) and the log
#   averages the ranks. The logged loss looks right, but every gradient is P times too large. (Reported for DeepSpeed's
#   Ulysses, deepspeedai/DeepSpeed#5248; a related loss-scaling fix is ByteDance-Seed/VeOmni#338. Gradient accumulation
#   under Ulysses changing the loss was verl-project/verl#2855; this chapter's accumulation-2 parity above is the guard
#   against that class of bug.)
# * `--break grad-group`: gradients are all-reduced over the **data-parallel group only**. With DP 1 that group has
#   one rank, the all-reduce does nothing, and each rank keeps only its own tokens' share (the bug fixed in
#   ByteDance-Seed/VeOmni#1115).

# %%
# NBVAL_CHECK_OUTPUT
# (`broken`: these two runs ran in section 4's job)
ref = runs[("single", 1)]
checked = {name: parity(ref, log, SUM_ORDER) for name, log in broken.items()}
for name, v in checked.items():
    print(f"--break {name:10s}: the loss alone {'PASS' if v.loss <= SUM_ORDER else 'FAIL'} | parity (loss and gradient "
          f"norm) {'PASS' if v.ok else 'FAIL'}")
lo, hi = checked["loss-norm"].norm_ratio
print("loss-norm: clipping acted at every step of both runs (gradient norm above 0.05):",
      min(r["grad_norm"] for r in ref + broken["loss-norm"]) > 0.05)
print("loss-norm: gradient norm / the single process's is P = 2 at every step (within 1e-4):",
      abs(lo / 2 - 1) < 1e-4 and abs(hi / 2 - 1) < 1e-4)

# %%
for name, v in checked.items():                   # measured on this 2-core CPU
    print(f"--break {name:10s}: {v}")
print("grad-group: the loss first leaves the sum-order rung at step",
      next(r["step"] for r in compare(ref, broken["grad-group"]) if r["rel"] > SUM_ORDER))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name, log in broken.items():
    rows = compare(ref, log)
    axes[0].semilogy([r["step"] for r in rows], [max(r["rel"], 1e-12) for r in rows], ".-", label=name)
    norms = compare(ref, log, "grad_norm")
    axes[1].plot([r["step"] for r in norms], [r["b"] / r["a"] for r in norms], ".-", label=name)
axes[0].axhline(SUM_ORDER, color="k", ls=":", label="tolerance"); axes[0].set_title("relative loss difference vs single")
axes[1].set_title("logged grad norm / single's"); axes[0].set_xlabel("step"); axes[1].set_xlabel("step")
axes[0].legend(fontsize=8); axes[1].legend(fontsize=8); plt.tight_layout()

# %% [markdown]
# **What to notice: the loss alone cannot see `loss-norm`.** The per-rank mean makes every gradient P = 2 times too
# large: the logged gradient norm is 2 x the single process's at every step (right). Yet the loss stays within the
# sum-order rung at every step (5.6e-7 at most, printed above), so a check of the loss alone would PASS this broken
# run. Two reasons: clipping acts at every step of both runs, and it rescales a gradient to the same length (0.05) in
# the same direction whatever factor the gradient carried; and AdamW divides each gradient by the root of its own
# running square, which cancels a constant factor anyway (up to ε). The gradient norm before clipping shows the factor
# at once, and `parity`, which compares it at every step, FAILs the run.
#
# `grad-group` is not a constant factor. Each rank keeps only its own tokens' share of the gradient, so the norm
# rank 0 logs is its share's: 0.5 x the single process's at step 0, then between 0.40 and 0.76 x as the two ranks,
# each stepping with half the information, stop holding the same model. The loss first leaves the single process's
# at step 1 (then up to 7.9e-2; printed above): both numbers FAIL, and the loss alone would have caught this one.
#
# ## 6. Communication: Ulysses, Megatron-SP, ring attention
#
# Measured above, one training step of a 3-layer DiT (batch 4, 16 tokens, hidden 32) on 2 ranks:

# %%
# NBVAL_CHECK_OUTPUT
print(f"all-to-all calls per step: {checks['a2a_calls']} (3 layers x 2 in forward x 2 with backward)")
print("bytes sent per rank in forward == 4·b·N/P·h·(P-1)/P per layer:", checks["a2a_sent_forward"] == checks["formula_forward"])
print("backward sends the same again:", checks["a2a_sent_step"] == 2 * checks["formula_forward"])

# %% [markdown]
# Per rank and per layer, forward only, in elements (h = hidden size, b = micro-batch, N = tokens), for the three
# ways to split a sequence:
#
# * **Ulysses**: q, k, v out and the output back, each b·N/P·h of which (P-1)/P leaves: 4·b·N·h·(P-1)/P². It
#   *shrinks* as P grows (the paper's "4Nh/P per link").
# * **Megatron-SP** (Korthikanti et al., 2022; used with tensor parallelism): all-gather before and reduce-scatter
#   after attention and the MLP: 4·b·N·h·(P-1)/P, flat in P.
# * **Ring attention** (Liu et al., 2023): K and V blocks travel P-1 steps round the ring: 2·b·N·h·(P-1)/P, flat in P,
#   but its transfers overlap the blockwise attention compute, and it has no heads limit.
#
# The same shapes as `configs/ulysses.yaml` (196 tokens, hidden 256, 32 images per group):

# %%
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

# %% [markdown]
# ## 7. Where Ulysses stops
#
# * **Heads limit.** Each rank needs whole heads, so P ≤ H (8 heads: at most 8 ranks), and H must divide by P. The
#   launcher says so in one sentence before any step (the cell below calls its check with `configs/ulysses.yaml`'s
#   8 heads and `--sp-degree 3`). Ring attention splits the *sequence* inside attention and has no such limit;
#   USP-style hybrids (Fang & Zhao, 2024) run Ulysses inside a node and a ring across nodes.
# * **Tokens must divide by P.** The tiny config's patch 7 gives 16 tokens; `configs/ulysses.yaml` uses patch 2:
#   196 = 4 x 49 tokens, divisible by 2 and 4 (patch 4's 49 tokens divide by none of the degrees the 8 heads allow:
#   2, 4, 8). Padding the sequence would also work but then the padded tokens must be masked out of attention and
#   the loss.
# * **All-to-all needs a fast network.** Every layer waits for two all-to-alls in forward and two in backward, so the
#   group belongs inside one node (NVLink); `dit_core.parallel.dist.build_mesh` gives sequence-parallel groups
#   consecutive ranks for that reason, and data parallelism runs across groups.

# %%
from dit_core.config import ConfigError
from dit_core.parallel.ulysses import check_sequence_parallel
try:            # what launchers/ulysses.py checks before any step, here for 3 ranks with --sp-degree 3
    check_sequence_parallel(load_config("configs/ulysses.yaml").model, degree=3, world_size=3)
except ConfigError as e:
    print(e)

# %% [markdown]
# ## On two GPUs
#
# Measured once with the project's own tool on 2 x H200 of one host (NVLink), at commit 406e6c2, 2026-11-24
# (`docs/measurements/2xh200-2026-11-24/`; a shared machine, so read the times as ratios inside one log).
# `NPROC=2 bash tools/gpu_ulysses.sh OUT WHEELS`: NCCL parity, SP 2 against one GPU at `configs/ulysses.yaml`, fp32,
# 30 steps: 1.26e-7 (that tool compared the loss only; the gradient norm was not compared on the GPUs).
# `tools/bench_ulysses.py` (hidden 384, depth 6, 8 heads, batch 16, bf16):
#
# | tokens | one GPU ms/step | SP 2 ms/step | SP 2 vs one GPU | peak GiB, one GPU / per SP rank | attention ms: ours / DeepSpeed |
# |---|---|---|---|---|---|
# | 196 | 14.1 | 26.9 | 0.52x | 0.65 / 0.48 | 1.86 / 2.21 |
# | 784 | 11.5 | 19.2 | 0.60x | 1.69 / 1.04 | 1.49 / 1.82 |
# | 3136 | 42.3 | 29.9 | 1.42x | 5.99 / 3.27 | 2.30 / 2.38 |
#
# Notice that two GPUs are *slower* than one until the sequence is long: four all-to-alls per block cost more than
# the halved work at 196 and 784 tokens; at 3136 tokens SP 2 is 1.42x faster and each rank holds 55% of one GPU's
# peak memory. The stacked all-to-all beats DeepSpeed's three exchanges at every length.

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** `torchrun --nproc_per_node 2 launchers/ulysses.py --sp-degree 2 --config configs/ulysses.yaml --device cpu --set model.patch_size=4`: 49 tokens over 2 ranks. What happens?
# 2. **Predict.** From the two-GPU table: at how many tokens does SP 2 stop being slower than one GPU? Estimate between which measured lengths the crossover lies.
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-09).

# %% [markdown]
# ## 中文要点
#
# 序列并行（sequence parallelism）：激活占用的内存（GPU 上即显存）随 token 数增长，Ulysses 把每张图的 token 分给多个进程。
#
# 注意力之前用 all-to-all 从“按序列切分”换成“按注意力头切分”，算完再换回来；因此头数和 token 数都要能被并行度整除。
#
# 损失必须按全局元素数归一化，否则会出现真实项目里出现过的 bug（本章复现了两个）。
#
# 证明：SP 2、累积 2、DP 2 x SP 2 与单进程相比，每一步的损失和裁剪前的梯度范数都在 1e-5 之内（CPU 上实测约 1e-7 到 2e-7）。
#
# 负对照 loss-norm（每个进程按自己的 token 取平均）：每个梯度变成 P = 2 倍；每一步都在裁剪，AdamW 也会消去常数倍，所以只看损失发现不了（仍在 1e-5 之内），裁剪前的梯度范数每一步都正好是两倍，parity 判为 FAIL。grad-group 不是常数倍：每个进程只保留自己那部分梯度，损失在第 1 步首次偏离（之后最大 7.9e-2），损失和梯度范数都 FAIL。
#
# 两张 H200 上：196 和 784 个 token 时两卡反而比单卡慢，3136 个 token 时快 1.42 倍：只有长序列才值得。
