# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Collectives: how processes talk
#
# Every distributed strategy in this workbook is built from a handful of **collective operations**: calls that every
# rank of a process group makes together. Data parallelism (数据并行) needs all-reduce; ZeRO needs reduce-scatter
# and all-gather; Ulysses sequence parallelism (序列并行) needs all-to-all; tensor parallelism (张量并行) needs
# all-reduce inside each layer. This chapter runs all five for real: four processes are spawned from the notebook,
# talk over **gloo** (the CPU backend; on GPUs the same calls go through NCCL), and report what they held before and
# after.
#
# Each rank starts with `[10r, 10r+1, 10r+2, 10r+3]`: the tens digit says which rank a number came from.

# %%
import os
import matplotlib.pyplot as plt
from dit_core.parallel.collectives import run_all, expected, bytes_sent_per_rank, COLLECTIVES
from dit_core.plots import collective_diagrams

WORLD = 4   # four processes, even on a 2-core machine: gloo does not need a core each
results = run_all(WORLD)
for r in range(WORLD):
    print(f"rank {r} before: {results[r]['before']}")

# %% [markdown]
# ## What each collective does
#
# | collective | after it, rank r holds | used by |
# |---|---|---|
# | broadcast | rank 0's tensor | DDP start: every replica begins from rank 0's weights |
# | all-reduce | the element-wise sum over ranks | DDP gradients; tensor-parallel layer outputs |
# | reduce-scatter | piece r of that sum | ZeRO-2/3 gradients: each rank keeps the part it updates |
# | all-gather | every rank's tensor, concatenated | ZeRO-3 weights before a layer runs |
# | all-to-all | piece r of every rank's tensor (a transpose of who-holds-what) | Ulysses: from a slice of the sequence to a slice of the heads |
#
# The proof: each rank's result equals what the definition gives, computed on one process.

# %%
# NBVAL_CHECK_OUTPUT
for name in COLLECTIVES:
    ok = all(results[r][name] == expected(name, WORLD)[r] for r in range(WORLD))
    print(f"{name:15s} {'matches its definition on every rank' if ok else 'WRONG'}")

# %%
collective_diagrams(results, COLLECTIVES);

# %% [markdown]
# **What to notice.** Colours are the ranks a number came from; grey cells are sums of all ranks. Broadcast copies
# rank 0's colour everywhere. All-reduce makes every row the same grey row. Reduce-scatter leaves each rank *one* grey
# cell: a quarter of the all-reduce's result. All-gather gives every rank every colour. All-to-all turns rows into
# columns: rank r ends with the r-th element of every rank.
#
# ## Communication volume
#
# With the bandwidth-optimal ring algorithm, for a tensor of S bytes on each of N ranks, each rank sends:
#
# | collective | bytes sent per rank |
# |---|---|
# | reduce-scatter | (N-1)/N · S |
# | all-gather | (N-1)/N · S (S = the gathered size) |
# | all-reduce | 2(N-1)/N · S (= reduce-scatter + all-gather) |
# | all-to-all | (N-1)/N · S |
#
# So an all-reduce costs about twice the data, *whatever the number of ranks*: this is why data parallelism scales.
# And reduce-scatter + all-gather is exactly an all-reduce, which is why ZeRO-2 communicates as much as DDP.
# `ring_all_reduce` in `dit_core/parallel/collectives.py` writes the ring with point-to-point messages and counts the
# bytes it sends; each rank ran it on a 16 KiB tensor above:

# %%
# NBVAL_CHECK_OUTPUT
ring = results[0]["ring"]
ratio = ring["bytes_sent"] / ring["tensor_bytes"]
print(f"hand-written ring all-reduce equals dist.all_reduce: {ring['max_abs_diff_vs_all_reduce'] < 1e-5}")
print(f"bytes sent / tensor bytes = {ratio:.3f}; formula 2(N-1)/N = {2 * (WORLD - 1) / WORLD:.3f}")

# %%
ns = range(2, 17)
fig, ax = plt.subplots(figsize=(6, 3))
for name in ("all_reduce", "reduce_scatter", "all_to_all"):
    ax.plot(ns, [bytes_sent_per_rank(name, 1.0, n) for n in ns], "o-", ms=3, label=name)
ax.axhline(2, color="k", ls=":", lw=0.8)
ax.set_xlabel("ranks N"); ax.set_ylabel("bytes sent per rank / S"); ax.set_title("ring algorithms: volume per rank")
ax.legend(); ax.grid(alpha=0.3); plt.tight_layout()

# %% [markdown]
# **What to notice:** the curves flatten. Doubling the GPUs does not double what each one must send; the cost that
# grows with N is latency (2(N-1) message steps in a ring), which is why real libraries switch to trees for small
# messages and why DDP packs gradients into buckets.

# %% [markdown]
# ## Exercises
#
# 1. **Predict.** In a ring all-reduce of a 1 MB tensor over 4 processes, how many bytes does each process send? Over 64 processes?
# 2. **Predict.** Why is all-reduce = reduce-scatter + all-gather, and which later strategy uses the two halves separately?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-05).

# %% [markdown]
# ## 中文要点
#
# 集合通信（collective communication）是分布式训练的基本动作：broadcast、all-reduce、reduce-scatter、all-gather、all-to-all，本章在四个真实进程之间逐一演示。
#
# all-reduce = reduce-scatter + all-gather；手写的环形全归约中，每个进程发送约 2(N−1)/N 倍的数据量，与进程数几乎无关。
#
# 后面每一章的通信量都用这里的公式来算。
