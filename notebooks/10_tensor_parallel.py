# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · Tensor parallelism, Megatron-style (张量并行)
#
# **The idea.** Data parallelism (chapter 06), ZeRO (07) and Ulysses (09) all keep every *layer* whole on every GPU
# while it computes. When one layer's weights (or its matmul) are too big for one GPU, split the layer itself. Megatron-LM
# (Shoeybi et al., 2019) splits each transformer block over P GPUs so that it needs only **one all-reduce in forward and
# one in backward** per sub-layer: the first linear layer of the MLP by *columns*, the second by *rows*; in attention,
# the q, k, v projection by columns (so each rank has whole heads) and the output projection by rows.
#
# The code: `dit_core/parallel/tensor.py` and `launchers/tp.py`:
#
#     torchrun --nproc_per_node 2 launchers/tp.py --tp-degree 2 --config configs/tiny.yaml --device cpu   # 2 CPU processes
#     torchrun --nproc_per_node 2 launchers/tp.py --tp-degree 2 --config configs/mnist.yaml               # 2 GPUs (NCCL)
#     torchrun --nproc_per_node 4 launchers/tp.py --tp-degree 2 --config configs/mnist.yaml               # DP 2 x TP 2

# %%
import os, json, inspect, subprocess, sys
import torch
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle
from dit_core.parity import run_launcher, run_launchers, run_here, compare, parity, format_table, SUM_ORDER
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
# 4 heads and an MLP of width 128: both split over 2 ranks. Clipping at 0.03 acts at every step (this model's
# gradient norm is 0.08 and up; section 3b's broken run's half of it), so the gradient norm of the *whole* model
# (section 3) is tested too.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.03",
         "--overwrite"]   # the /tmp/ch10 folders are scratch: a re-run replaces them
os.chdir("..")

# %% [markdown]
# ## 1. Splitting a matmul by columns and by rows
#
# Y = X W with X of shape (tokens, h) and W of shape (h, 4h). **By columns**: rank i holds W[:, block i] and computes
# Y[:, block i] from the whole X; nothing to add up. **By rows**: rank i holds X[:, block i] and W[block i, :] and computes
# a *partial* Y of full shape; the true Y is the sum of the partials (an all-reduce). Column then row: the column split's
# output *is* the row split's input, sliced the right way, so the pair needs one all-reduce at the end.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
def box(ax, x, y, w, h, c, t):
    ax.add_patch(Rectangle((x, y), w, h, fc=c, ec="k")); ax.text(x + w / 2, y + h / 2, t, ha="center", va="center", fontsize=8)
for ax, title in zip(axes, ("column split: Y[:, i] = X · W[:, i]", "row split: Y = Σ_i X[:, i] · W[i, :]")):
    ax.set_xlim(0, 10); ax.set_ylim(0, 4); ax.axis("off"); ax.set_title(title, fontsize=9)
box(axes[0], 0, 1, 2, 2, "#ddd", "X\n(t, h)"); box(axes[0], 2.5, 1, 2, 2, "#7fb3d5", "W[:, 0]"); box(axes[0], 4.5, 1, 2, 2, "#f5b041", "W[:, 1]")
box(axes[0], 7, 1, 1.4, 2, "#7fb3d5", "Y[:, 0]"); box(axes[0], 8.4, 1, 1.4, 2, "#f5b041", "Y[:, 1]")
box(axes[1], 0, 1, 1, 2, "#7fb3d5", "X[:, 0]"); box(axes[1], 1, 1, 1, 2, "#f5b041", "X[:, 1]")
box(axes[1], 2.5, 2, 3, 1, "#7fb3d5", "W[0, :]"); box(axes[1], 2.5, 1, 3, 1, "#f5b041", "W[1, :]")
box(axes[1], 6.5, 1, 1.5, 2, "#7fb3d5", "partial 0"); axes[1].text(8.2, 2, "+", fontsize=14); box(axes[1], 8.5, 1, 1.5, 2, "#f5b041", "partial 1")

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
X, W1, W2 = torch.randn(16, 32), torch.randn(32, 128), torch.randn(128, 32)
Y = torch.nn.functional.gelu(X @ W1) @ W2                         # the whole MLP, one process
cols = W1.chunk(2, dim=1)                                          # rank i: W1[:, i] ...
rows = W2.chunk(2, dim=0)                                          # ... and W2[i, :]
partials = [torch.nn.functional.gelu(X @ c) @ r for c, r in zip(cols, rows)]
print("column split of fc1 = slices of X·W1:", torch.allclose(torch.cat([X @ c for c in cols], 1), X @ W1, atol=1e-5))
print("GELU on each slice, then the row split: the partials sum to the MLP:", torch.allclose(sum(partials), Y, atol=1e-4))

# %% [markdown]
# The GELU between them is the reason for the order: it acts elementwise, so it can run on each rank's slice of
# columns. (The other order, rows first, would need an all-reduce *before* the GELU.)
#
# ## 2. The two conjugate operators, f and g
#
# Where a replicated activation enters a column-parallel layer, **f** is the identity in forward; in backward every rank
# holds only part of the gradient with respect to that activation (its columns' contribution), so f all-reduces it.
# Where the row-parallel partials leave, **g** all-reduces in forward and is the identity in backward.

# %%
from dit_core.parallel import tensor
print(inspect.getsource(tensor.CopyToTensorParallel))
print(inspect.getsource(tensor.RowParallelLinear.forward))
print(inspect.getsource(tensor.parallelize))

# %% [markdown]
# In attention the column split must keep **whole heads** together: the fused qkv weight is laid out as
# (3, heads, head_dim) outputs, so rank r takes heads r·H/P ... of q, of k and of v (`head_rows`); attention then runs
# on its heads alone, and the output projection reads exactly those heads' columns. The model is not copied:
# `parallelize` swaps the four linear layers of every block in place, and the model's `Attention` infers its number of
# heads from the width of `qkv`. Embeddings, adaLN and the final layer stay whole on every rank.
#
# The proof, two processes, the same check the tests run: each layer's output and every gradient against the full
# layer, the f and g operators alone, the gathered weights, and the all-reduce bytes of one forward + backward.

# %%
os.makedirs("/tmp/ch10", exist_ok=True)
r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "tests/tp_checks.py", "/tmp/ch10/checks.json"], capture_output=True, text=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd()))
assert r.returncode == 0, r.stderr[-2000:]
checks = json.load(open("/tmp/ch10/checks.json"))
print(f"MLP (column, row): max relative difference to the full layer {checks['mlp_worst']:.1e}")
print(f"attention (heads by column, projection by row): {checks['attention_worst']:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print("f: identity forward, sum backward:", checks["f_forward_is_identity"] and checks["f_backward_sums"])
print("g: sum forward, identity backward:", checks["g_forward_sums"] and checks["g_backward_is_identity"])
print("layers equal the full layers (output, input and weight gradients, <= 1e-5):", max(checks["mlp_worst"], checks["attention_worst"]) <= 1e-5)
print("each rank holds", checks["block_weight_share"], "of every block matrix; the slices gather to the single-process weights:", checks["gathered_equals_single"])
print("all-reduces per block and step:", checks["all_reduce_calls"] // 2, "| bytes equal 4·b·N·h per block:", checks["all_reduce_bytes"] == checks["formula_bytes"])

# %% [markdown]
# "1/P of every block *matrix*" is not 1/P of a block. Each block also has its adaLN modulation, a Linear(h, 6h) that
# turns the condition c into the six shift, scale and gate vectors, and it stays whole on every rank. The same run
# counted what rank 0 holds after `parallelize`:

# %%
full, mine = checks["params_full"], checks["params_mine"]
for k in ("blocks", "modulation", "model"):
    print(f"{k:>10}: {full[k]:>7,} parameters in the single-process model, {mine[k]:>7,} on one rank of two ({mine[k] / full[k]:.1%})")
print(f"the modulation is {full['modulation'] / full['blocks']:.1%} of a block's parameters")

# %%
# NBVAL_CHECK_OUTPUT
share = mine["blocks"] / full["blocks"]
print(f"at TP = 2 a rank keeps {share:.0%} of each block (not 50%): {0.6 < share < 0.7}")

# %% [markdown]
# **Why the modulation stays whole.** Its input is c, one vector per image, not one per token; its outputs shift and
# scale the *whole* hidden vector that the column-parallel qkv and fc1 read. Sharding it by columns would save half
# the modulation, a sixth of each block's weights (a rank's share would drop from 67% to 50%), and their gradients and
# Adam state, but every block's forward would then need an all-gather of the b x 6h outputs before the first layer
# norm, and a matching reduce-scatter in backward: two more collectives per block on the critical path. The cell below
# counts both options in elements each rank sends per step (ring collectives at P = 2), at this chapter's tiny model
# and the GPU bench model. The traffic is small next to the 4·b·N·h of the f and g all-reduces; what it adds is two
# latencies per block (chapter 05: a small message's cost is its latency), for memory that at these sizes is from
# about 49 KiB (tiny: 12,480 weights) to 1.7 MiB (bench: 443,520) of fp32 weights per block and rank, four times that
# with the gradient and Adam's two moments. A model whose blocks no longer fit one GPU should shard it; here
# simplicity wins, and the chapter says so instead of claiming 1/P.

# %%
from dit_core.config import load_config
for name, over in {"tiny": {}, "bench": {"model.patch_size": 2, "model.hidden_size": 384, "model.depth": 12, "model.num_heads": 6}}.items():
    c = load_config("configs/tiny.yaml", over).model
    b, n, h = 64, (28 // c.patch_size) ** 2, c.hidden_size
    fg = 4 * b * n * h * 2 * (2 - 1) / 2                 # four all-reduces of b·N·h: each rank sends 2(P-1)/P of each
    mod = 2 * b * 6 * h * (2 - 1) / 2                    # an all-gather forward and a reduce-scatter backward of b·6h
    saved = 6 * h * h + 6 * h                            # the modulation's weights per block: half of them per rank
    print(f"{name:>6}: per block and step, f/g send {fg:,.0f} elements; sharding the modulation adds {mod:,.0f} "
          f"(+{mod / fg:.1%}) and 2 collectives, and saves {saved // 2:,} weights per rank")

# %% [markdown]
# ## 3. Training: the same loss
#
# Two things besides the layers need care. **Gradient clipping** must use the norm of the *whole* gradient: a rank's
# local norm misses the other slices, so each rank would clip by a different factor and the slices would drift apart.
# `TensorParallelStrategy.clip_grad_norm_` sums the squares of sliced gradients over the group and counts replicated
# ones once. **Checkpoints** gather the slices, so `model.pt` and `ema.pt` are plain single-process weights that
# `python -m dit_core.evaluate` reads; each rank also writes its own optimizer slice for an exact resume.

# %%
# run_launchers: one job per table of runs (the launcher's main once per row, one start-up). The last row of the
# 2-process job is section 3b's broken run.
single = run_here("launchers/single.py", [SMALL + ["--grad-accum", str(acc), "--results-dir", f"/tmp/ch10/s{acc}"]
                                               for acc in (1, 2)])
tp = run_launchers("launchers/tp.py", [SMALL + ["--grad-accum", str(acc), "--tp-degree", "2", "--results-dir", f"/tmp/ch10/t{acc}"]
                                       for acc in (1, 2)]
                   + [SMALL + ["--tp-degree", "2", "--break", "world-average", "--results-dir", "/tmp/ch10/broken"]], nproc=2)
world_average = tp[2]
runs = {}
for acc in (1, 2):
    runs[("single", acc)], runs[("TP 2", acc)] = single[acc - 1], tp[acc - 1]
runs[("DP 2 x TP 2", 1)] = run_launcher("launchers/tp.py", SMALL + ["--tp-degree", "2", "--results-dir", "/tmp/ch10/dp2tp2"], nproc=4)
print(format_table(runs[("single", 1)], runs[("TP 2", 1)], "single", "TP 2", limit=6))

# %%
# NBVAL_CHECK_OUTPUT
verdict = {(name, acc): parity(runs[("single", acc)], log, SUM_ORDER) for (name, acc), log in runs.items() if name != "single"}
for (name, acc), v in verdict.items():
    print(f"{name:12s} accumulation {acc}: loss and gradient norm within {SUM_ORDER:.0e} at every step: {'PASS' if v.ok else 'FAIL'}")

# %%
for (name, acc), v in verdict.items():      # the measured maxima (this 2-core CPU, gloo)
    print(f"{name:12s} accumulation {acc}: {v}")
parity_curves(runs[("single", 1)], runs[("TP 2", 1)], names=("single process", "tensor parallel, 2 ranks share every layer"));

# %% [markdown]
# **What to notice.** The loss and the gradient norm (left and right in the plot) agree with one process at every
# step to float32 rounding (at most 1.4e-7 and 2.3e-7, printed above) or exactly: where a plotted difference sits at
# the bottom (1e-12), the two runs logged the same bits. The partial sums of the row-parallel layers and the summed squares of the sliced gradients are added in
# another order than one process adds them; that is the sum-order rung (1e-5) of the tolerance ladder.
#
# ## 3b. Break it: the data-parallel average over the wrong group
#
# With DP × TP the gradients are averaged over the data-parallel group: the ranks that hold the *same* slices of the
# model. The slip is to divide the all-reduced sum by `dist.get_world_size()`, which without a group is every rank,
# dp × tp, instead of dp. `launchers/tp.py --break world-average` makes it. Run here at TP 2 on 2 ranks (dp = 1,
# it ran in the job above), it divides by 2 where it should divide by 1: the prediction is every gradient, and the
# gradient norm, 1/tp = 0.5 x the single process's, at every step.

# %%
# NBVAL_CHECK_OUTPUT
ref = runs[("single", 1)]
v = parity(ref, world_average, SUM_ORDER)
lo, hi = v.norm_ratio
print("clipping acted at every step of both runs (gradient norm above 0.03):",
      min(r["grad_norm"] for r in ref + world_average) > 0.03)
print(f"the loss alone, within {SUM_ORDER:.0e} at every step:", "PASS" if v.loss <= SUM_ORDER else "FAIL")
print("parity (loss and gradient norm):", "PASS" if v.ok else "FAIL", "| what failed:", v.failed)
print("gradient norm / the single process's is 1/tp = 0.5 at every step (within 1e-4):",
      abs(lo / 0.5 - 1) < 1e-4 and abs(hi / 0.5 - 1) < 1e-4)

# %%
print(v)                                          # measured on this 2-core CPU
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, key in ((a, "loss"), (b, "grad_norm")):
    rows = compare(ref, world_average, key)
    ax.plot([r["step"] for r in rows], [r["b"] / r["a"] for r in rows], ".-", color="C3")
    ax.axhline(1, color="k", ls=":"); ax.set_xlabel("step"); ax.set_ylim(0.4, 1.1)
a.set_title("logged loss / single's"); b.set_title("logged gradient norm / single's (world-average)")
plt.tight_layout()

# %% [markdown]
# **What to notice: the loss alone cannot see it.** The broken run's loss stays within the sum-order rung of one
# process's at every step (1.0e-6 at most, printed above), so a check of the loss alone would PASS it, while the
# logged gradient norm is half of the single process's at every step and `parity` FAILs it. Clipping acts at every step of both runs, and a clipped gradient has the same direction
# and length (0.03) whatever factor it carried; AdamW divides a constant factor out of its update anyway (up to ε).
# The norm before clipping is the number that shows it, and the parity check compares it. (Arithmetic, not run here:
# at DP 2 x TP 2 the same slip divides by 4 instead of 2, the same factor 1/tp.)

# %% [markdown]
# ## 4. Memory and communication, and when tensor parallelism pays
#
# Per block and micro-batch, tensor parallelism all-reduces the activation (b·N·h elements) four times: after
# attention and after the MLP in forward (g), before them in backward (f). Data parallelism all-reduces the
# *gradients* once per step, whatever the batch. So tensor parallelism trades memory (each rank holds 1/P of every
# block matrix, its gradient and its Adam state: about two thirds of each block at P = 2, above) for traffic that grows with the batch
# and the sequence and sits on the critical path of every layer: it needs NVLink-class links inside a node, and pays
# only when a layer's matmuls are large enough to hide it.
#
# One unit for both: **bytes each rank sends per step**, fp32, ring collectives at P = 2. A ring all-reduce of n
# elements sends 2n(P-1)/P per rank: for data parallelism n = Ψ, the gradients, once per step; for tensor parallelism
# n = b·N·h, four times per block per micro-batch.

# %%
from dit_core.parallel.tensor import tp_allreduce_elements
from dit_core.config import load_config
from dit_core.model import DiT, count_parameters
rows = []
for name, path, over in (("tiny", "configs/tiny.yaml", {}), ("mnist", "configs/mnist.yaml", {}),
                         ("bench", "configs/tiny.yaml", {"model.patch_size": 2, "model.hidden_size": 384,
                                                         "model.depth": 12, "model.num_heads": 6})):
    c = load_config(path, over).model
    psi = count_parameters(DiT(c)); tokens = (28 // c.patch_size) ** 2
    ring = 2 * (2 - 1) / 2                                                      # a ring all-reduce sends 2(P-1)/P of n per rank
    tp = c.depth * tp_allreduce_elements(64, tokens, c.hidden_size) * ring * 4  # bytes per step, 64 images per rank
    rows.append((name, psi, tokens, tp / 2**20, psi * ring * 4 / 2**20))
print(f"{'model':>6} {'params':>11} {'tokens':>6} | {'TP sends, MiB':>19} | {'DDP sends, MiB':>19}   (per rank and step, P = 2, batch 64 per rank, fp32)")
for r_ in rows:
    print(f"{r_[0]:>6} {r_[1]:>11,} {r_[2]:>6} | {r_[3]:>19.1f} | {r_[4]:>19.1f}")

# %% [markdown]
# **What to notice.** For these small DiTs tensor parallelism moves far *more* bytes than data parallelism: the
# activations of 64 images are bigger than the weights. It is the tool for the opposite regime, models whose
# weights and optimizer state do not fit one GPU (or whose layers are so wide that one GPU's matmul is slow), with
# batches kept small per GPU. TP 2 against one GPU and against DDP on two H200s is at the end of this chapter.
#
# ## 5. Every strategy in this workbook
#
# | strategy | what each rank holds | what is communicated (per step) | parity here (CPU, max rel diff: loss / gradient norm) | use it when |
# |---|---|---|---|---|
# | DDP by hand / torch DDP (06) | everything | all-reduce of the Ψ gradient elements: 2Ψ(N-1)/N per step | 1.7e-7 / 4.7e-7 | the model fits; the default |
# | ZeRO-1 / 2 (07) | optimizer state (1) and gradients (2) sliced | reduce-scatter + all-gather: the same 2Ψ(N-1)/N | 1.9e-7 / 2.4e-7 (both stages) | Adam's state does not fit; measured 496 (ZeRO-0) → 434 (ZeRO-1) → 374 (ZeRO-2) MiB of model states per rank at Ψ = 32.5M (fp32, 2 ranks) |
# | ZeRO-3 (07) | weights sliced too | 3Ψ(N-1)/N per micro-batch (gather twice, reduce-scatter) | 1.9e-7 / 2.1e-7 | the weights do not fit; 310 MiB per rank at the same Ψ |
# | Accelerate (08) | as the backend it runs (DDP or DeepSpeed) | the same as that backend | 1.7e-7 / 1.6e-7 (DDP), 8.3e-8 / 2.0e-7 (ZeRO-2) | one script for every machine |
# | Ulysses (09) | everything, 1/P of each sample's tokens | all-to-all: 4·b·N·h/P·(P-1)/P per layer forward, the same backward | 1.8e-7 / 2.1e-7 (SP 2 and DP 2 x SP 2) | sequences too long for one GPU's activations; P ≤ heads |
# | Tensor parallel (10) | 1/P of every block matrix (about 2/3 of a block at P = 2: the modulation stays whole) | four all-reduces of b·N·h per block and micro-batch: 8·b·N·h(P-1)/P | 1.2e-7 / 2.3e-7 (TP 2), 1.4e-7 / 1.3e-7 (DP 2 x TP 2) | layers too big for one GPU; inside a node |
#
# Every entry of the third column counts **elements each rank sends** (multiply by 4 for fp32 bytes, 2 for bf16), N
# the number of ranks. The parity numbers are the largest that chapters 06-10 print (this 2-core CPU, gloo, every
# run of the chapter with that strategy, accumulation 1 and 2; each chapter shows its commands); every strategy is
# also a test that launches real processes and compares with the single process, all on one tolerance ladder
# (`dit_core.parity.LADDER`, chapter 06): these are fp32 runs where only the order of sums changes, so the rung is 1e-5.

# %% [markdown]
# ## On two GPUs
#
# Measured once with the project's own tool on 2 x H200 of one host (NVLink), at commit 406e6c2, 2026-11-24
# (`docs/measurements/2xh200-2026-11-24/`; a shared machine, so read the times as ratios inside one log).
# `NPROC=2 bash tools/gpu_tp.sh OUT` (its second round was cut off by a time limit): NCCL parity, TP 2 against one
# GPU at `configs/mnist.yaml`, fp32, 30 steps: bitwise equal losses (that tool compared the loss only; the gradient
# norm was not compared on the GPUs). 100 bf16 steps at `configs/bench.yaml`
# (hidden 384): one GPU 7.3 s (second round, on the one-GPU fast path; the first round's 40.6 s is left out), torch
# DDP on two GPUs 5.6 s and 6.4 s (first and second round), TP 2 8.6 s (first round only: the time limit cut the
# second round off before it). Notice that TP 2 was slower than one GPU; with one TP run and one-GPU rounds this far
# apart, the ordering is indicative, not a measurement of the gap. A likely reason: at hidden 384 the halved matmuls
# are small and each block waits for two all-reduces of its activations in the forward and two in the backward. For
# a model that fits on one GPU, DDP is the better use of the second one; tensor parallelism is for layers that do not
# fit.

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** `torchrun --nproc_per_node 2 launchers/tp.py --tp-degree 2 --config configs/tiny.yaml --device cpu --set model.num_heads=1`. What happens, and why must the heads divide by the degree?
# 2. **Predict.** Section 3 measured about two thirds of a block per rank at TP = 2. How much at TP = 4, with the adaLN modulation still whole? Count it from `DiT(cfg).blocks[0]`.
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-10).

# %% [markdown]
# ## 中文要点
#
# 张量并行（tensor parallelism）：把矩阵乘法按列切或按行切；列并行接行并行，中间不需要通信。
#
# f 与 g 是一对共轭算子：f 前向恒等、反向全归约；g 前向全归约、反向恒等。注意力按整头分给各进程。
#
# 与单进程相比，每一步的损失和裁剪前的梯度范数都一致（CPU 上相对误差约 1e-7 到 2e-7；两张 H200 上损失逐位相同，那次只比较了损失）。张量并行每一层都要通信，应放在节点内最快的互联上。
#
# 负对照（--break world-average）：数据并行的梯度和除以了全部进程数 dp x tp，而不是 dp，每个梯度只剩 1/tp = 0.5 倍。每一步都在裁剪，AdamW 也会消去常数倍，所以只看损失发现不了（仍在 1e-5 之内）；裁剪前的梯度范数每一步都正好是 0.5 倍，parity 判为 FAIL。
#
# 两张 H200 上：hidden 384 的小模型用张量并行比单卡还慢（张量并行只测了一轮，这个先后只是参考）；模型能放进一张卡时，数据并行更划算。
