# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 14 · Context parallelism (上下文并行): ring attention, and Ulysses x Ring (USP)
#
# **The idea.** Chapter 09 split each image's tokens over P ranks and fixed attention with an all-to-all that trades
# the token split for a head split. That works until P reaches the number of heads: a rank cannot hold less than one
# head, so a DiT with 8 heads stops at 8 ranks, however long its sequence. **Ring attention** (Liu et al., 2023,
# "Ring Attention with Blockwise Transformers") never gives up the token split. Every rank keeps its own slice of
# the queries for the whole of attention; the key/value blocks travel instead, round a ring of P ranks, one hop per
# step. At each step a rank attends its queries to the block it holds and merges the partial result into a running
# one, while the next block is already on the wire. After P steps every query has met every key, exactly.
#
# The merge is the whole trick: softmax over a sequence that a rank never sees at once. It is the **online softmax**
# (在线 softmax; Milakov & Gimelshein, 2018), the same algebra FlashAttention uses inside one GPU. **USP** (Fang &
# Zhao, 2024, "USP: a unified sequence parallelism approach") combines the two: Ulysses inside a small group, the
# ring across groups, so the head limit applies only to the Ulysses part.
#
# The code: `dit_core/parallel/context.py` (~245 lines), and the launcher, which reuses chapter 09's sequence
# split, loss normalisation and gradient reduction (`ContextStrategy` is a subclass of `UlyssesStrategy` that swaps
# the attention):
#
#     torchrun --nproc_per_node 2 launchers/context.py --cp-degree 2 --config configs/ulysses.yaml --device cpu
#     torchrun --nproc_per_node 4 launchers/context.py --cp-degree 2 --ulysses-degree 2 --config configs/ulysses.yaml
#     torchrun --nproc_per_node 4 launchers/context.py --cp-degree 2 --config configs/ulysses.yaml   # DP 2 x CP 2
#
# **On GPUs** the same commands run without `--device cpu`: `--device auto` gives each process one GPU and NCCL,
# e.g. `torchrun --nproc_per_node 2 launchers/context.py --cp-degree 2 --config configs/ulysses.yaml` on a machine
# with 2 GPUs (with fewer GPUs than processes every rank stops with a sentence saying so). **`launchers/context.py`
# has never run on NCCL with 2 or more GPUs**, nor one rank through the CUDA code path: it has run only over gloo,
# on CPU processes. Every number this chapter computes comes from a 2-core CPU; the only GPU numbers quoted (section
# 8) are chapter 09's Ulysses runs on 2 x H200.

# %%
import os, json, inspect, math
import numpy as np
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from dit_core.parallel import context
from dit_core.parallel.ulysses import ulysses_elements, ring_attention_elements
from dit_core.parity import run_mixed, run_here, parity, format_table, compare, SUM_ORDER
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
# The parity DiT of chapters 09-13 (hidden 32, depth 2, 4 heads, 16 tokens at patch 7). Clipping at 0.02 is below
# half its smallest gradient norm over these steps (section 4b prints it): it acts at every step, also in the run
# whose gradient is half the right one (section 4b), so every strategy's global norm is exercised at every step.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.02",
         "--overwrite"]   # the /tmp/ch14 folders are scratch: a re-run replaces them
os.chdir("..")  # launchers are run from the repository root

# %% [markdown]
# ## 1. Online softmax: two partial attentions merged exactly
#
# One query row with scores s_i = q·k_i/√d over keys split into two blocks A and B. Attention is
# Σ_i e^{s_i} v_i / Σ_i e^{s_i}. For each block alone keep three numbers:
#
# * m = max_i s_i (for numerical safety: every exponent is taken relative to it),
# * l = Σ_i e^{s_i - m}, the block's softmax denominator,
# * o = Σ_i e^{s_i - m} v_i, its *unnormalised* output.
#
# Both blocks' sums are the whole sums once expressed relative to the same maximum m = max(m_A, m_B):
#
#     o = o_A·e^{m_A - m} + o_B·e^{m_B - m},   l = l_A·e^{m_A - m} + l_B·e^{m_B - m},   attention = o / l
#
# Nothing is approximated; the factor e^{m_A - m} only converts block A's sums to the shared reference. Backward
# needs one more number per row, the log-sum-exp lse = m + log l: from it any block's probabilities come back as
# e^{s_i - lse} without storing them. `context._merge` is that update, one block at a time:

# %%
print(inspect.getsource(context._merge))
torch.manual_seed(0)
B, H, S, K, D = 1, 2, 6, 10, 8                      # 6 queries, 10 keys in blocks of 4 and 6
q, k, v = torch.randn(B, H, S, D), torch.randn(B, H, K, D), torch.randn(B, H, K, D)
full = F.scaled_dot_product_attention(q, k, v)
blocks = [(k[:, :, :4], v[:, :, :4]), (k[:, :, 4:], v[:, :, 4:])]

def merged(order):
    o, m, l = torch.zeros(B, H, S, D), torch.full((B, H, S), -math.inf), torch.zeros(B, H, S)
    for kb, vb in order:
        o, m, l = context._merge(o, m, l, q @ kb.transpose(-1, -2) / math.sqrt(D), vb)
    return o / l.unsqueeze(-1)

# The tempting shortcut: each block's own softmax attention, averaged (or weighted by block size)
each = [F.scaled_dot_product_attention(q, kb, vb) for kb, vb in blocks]
naive = (4 * each[0] + 6 * each[1]) / 10
err = lambda a: ((a - full).abs().max() / full.abs().max()).item()
print(f"merged A then B: {err(merged(blocks)):.1e}   B then A: {err(merged(blocks[::-1])):.1e}   "
      f"blocks averaged by size: {err(naive):.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print("online softmax merge == full attention (<= 1e-6), in either order:",
      err(merged(blocks)) <= 1e-6 and err(merged(blocks[::-1])) <= 1e-6)
print("averaging the blocks' own softmax results is wrong (> 1e-2):", err(naive) > 1e-2)

# %%
s = (q @ k.transpose(-1, -2) / math.sqrt(D))[0, 0, 0]     # one query row's 10 scores
w_full = torch.softmax(s, -1)
w_local = torch.cat([torch.softmax(s[:4], -1), torch.softmax(s[4:], -1)])
m_all = s.max()
w_rescaled = torch.cat([torch.softmax(s[:4], -1) * torch.exp(torch.logsumexp(s[:4], -1) - torch.logsumexp(s, -1)),
                        torch.softmax(s[4:], -1) * torch.exp(torch.logsumexp(s[4:], -1) - torch.logsumexp(s, -1))])
fig, ax = plt.subplots(figsize=(9, 3))
x = np.arange(10)
ax.bar(x - 0.27, w_full, 0.27, label="full softmax")
ax.bar(x, w_local, 0.27, label="each block's own softmax (sums to 1 per block)")
ax.bar(x + 0.27, w_rescaled, 0.27, label="own softmax x l_block/l (the merge)")
ax.axvline(3.5, color="k", ls=":"); ax.text(1.5, ax.get_ylim()[1] * 0.9, "block A", ha="center")
ax.text(7, ax.get_ylim()[1] * 0.9, "block B", ha="center")
ax.set_xlabel("key"); ax.set_ylabel("attention weight")
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1)); plt.tight_layout()

# %% [markdown]
# **What to notice.** A block's own softmax weights sum to 1 inside the block: alone they overweight whichever block
# holds the smaller scores. Rescaled by the block's share of the total denominator (its l over the total l, both
# relative to one maximum) they *are* the full softmax weights, bar for bar. Weighting the blocks by their size, as a
# data-parallel average would, is wrong by a third here (3.2e-1): attention is not a mean over keys.
#
# ## 2. The ring, step by step
#
# P ranks, each holding slice r of the queries, keys and values. At step j rank r holds the K/V block that started on
# rank r - j (mod P): it sends that block to rank r + 1, receives the next one from rank r - 1, and while the transfer
# runs it computes with the block it has (double buffering: two buffers, one being computed on, one being received).

# %%
P = 4
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
holds = np.array([[(r - j) % P for j in range(P)] for r in range(P)])
cmap = plt.get_cmap("tab10")
for ax, title, arrive in ((axes[0], "forward: the K/V block rank r computes with at step j", False),
                          (axes[1], "backward: whose partial dK, dV rank r adds to at step j", True)):
    for r in range(P):
        for j in range(P):
            blk = holds[r, j]
            ax.add_patch(plt.Rectangle((j, r), 0.92, 0.92, color=cmap(blk), alpha=0.55))
            ax.text(j + 0.46, r + 0.46, f"K{blk}V{blk}" if not arrive else f"dK{blk}dV{blk}", ha="center",
                    va="center", fontsize=8)
            if j < P - 1:
                ax.annotate("", xy=(j + 1.02, (r + 1) % P + 0.46), xytext=(j + 0.9, r + 0.46),
                            arrowprops=dict(arrowstyle="->", color="gray", lw=0.7, alpha=0.6))
    ax.set_xlim(0, P + (0.9 if arrive else 0)); ax.set_ylim(P, 0)
    ax.set_xticks(np.arange(P) + 0.46, [f"step {j}" for j in range(P)])
    ax.set_yticks(np.arange(P) + 0.46, [f"rank {r}" for r in range(P)]); ax.set_title(title, fontsize=9)
    if arrive:
        for r in range(P):
            ax.text(P + 0.45, r + 0.46, f"last hop:\ndK{(r + 1) % P}dV{(r + 1) % P}\nto rank {(r + 1) % P}",
                    ha="center", va="center", fontsize=7)
plt.tight_layout()

# %% [markdown]
# Read a column: at every step each rank holds a different block, and every rank computes at once; read a row: over
# P steps rank r meets every block once. Backward runs the same ring again with the same blocks, and with each block
# travels its partial gradient dK_j, dV_j: every rank adds its queries' share, passes the sum on, and after one more
# hop (the P-th) the total arrives home on the block's owner (the right edge of the second panel: rank r ends with
# block r + 1's sum after P - 1 steps, and the last hop takes it to rank r + 1). Each rank recomputes the block's
# probabilities from the saved lse instead of keeping P blocks of them: memory stays one block, the price is the
# forward's matrix products done again (what FlashAttention's backward also does).
#
# What may travel while a rank computes, in the order the code makes its calls: in forward, the next K/V block; in
# backward, the next K/V block and the other ranks' partial dK, dV of the block in hand (sent during the step
# before; the rank computes its own share first and waits for theirs only to add it). The last hop, each block's
# finished dK, dV going home, has nothing left to compute beside it and is waited for. (Whether the transfers
# really run beside the compute is the runtime's business: it is not measured in this chapter.)
#
# ## 3. The code
#
# The forward is the loop of the picture: start the transfer of the next block, merge the current one, wait. The
# statistics m, l, o stay in float32 whatever the inputs' precision (section 5 says why).

# %%
print(inspect.getsource(context.RingAttention.forward))

# %% [markdown]
# The backward: the softmax gradient of a block is dS = P ∘ (dP - δ) with δ = rowsum(dO ∘ O) (one number per query,
# computed once from the forward's output), so a block's dQ, dK, dV need only that block, the saved lse and δ. Note
# where it waits: for the travelling partial dK, dV only after computing this rank's share (`mine`), and once more
# after the loop, for the last hop home.

# %%
print(inspect.getsource(context.RingAttention.backward))

# %% [markdown]
# USP: an all-to-all over the Ulysses group (U ranks trade their U token slices for H/U heads each: the group now
# holds one contiguous block U·N/P tokens long), the ring over the ring group on those heads, and the all-to-all back.
# The training side adds nothing: `ContextStrategy` builds the groups and hands this attention to chapter 09's
# `SequenceParallelDiT`; the loss is each rank's sum of squared errors over its tokens divided by the whole
# micro-batch's element count, and gradients are summed inside a context group and averaged across groups.

# %%
print(inspect.getsource(context.context_attention))
print(inspect.getsource(context.ContextStrategy.attention))

# %% [markdown]
# ## 4. The proof
#
# First the primitive, in four processes: every rank builds the same full q, k, v and output gradient, keeps its
# slice, and compares ring attention's output and q, k, v gradients with full attention computed locally; rings of
# P = 2, 3 and 4 (on subgroups of the four ranks), at 12 tokens (a multiple of 2, 3 and 4) and 13 (not: the first
# 13 mod P ranks take one token more; in non-causal attention a shorter block is still a whole block, so nothing is
# padded or masked); then USP with Ulysses 2 x Ring 2. Then training, against one process: a ring of 2 on 2
# processes (with gradient accumulation 1 and 2), and on 4 processes USP 2 x 2, data parallelism 2 x ring 2, and a
# ring of 4 on a DiT with only **2 heads**, where Ulysses could use at most 2 ranks. Each training run is compared
# with `parity` (chapter 06): the loss **and** the gradient norm before clipping, at every step, within the
# sum-order rung (1e-5). The 2-process job also runs the negative control of section 4b and two bad layouts.

# %%
four_rows = [("tests/context_checks.py", []),
             ("launchers/context.py", SMALL + ["--cp-degree", "2", "--ulysses-degree", "2", "--results-dir", "/tmp/ch14/usp"]),
             ("launchers/context.py", SMALL + ["--cp-degree", "2", "--results-dir", "/tmp/ch14/dp2ring2"]),
             ("launchers/context.py", SMALL + ["--cp-degree", "4", "--set", "model.num_heads=2",
                                               "--results-dir", "/tmp/ch14/ring4"])]
(checks,), usp, dp2, ring4 = run_mixed(four_rows, nproc=4)
# The 2-process job: ring 2 (accumulation 1 and 2), the broken ring of section 4b, and two bad layouts (each stops
# with its sentence, the job goes on).
two = run_mixed([("launchers/context.py", SMALL + ["--cp-degree", "2", "--grad-accum", str(a),
                                                   "--results-dir", f"/tmp/ch14/ring2-a{a}"]) for a in (1, 2)]
                + [("launchers/context.py", SMALL + ["--cp-degree", "2", "--break", "cp-average",
                                                     "--results-dir", "/tmp/ch14/broken"])]
                + [("launchers/context.py", SMALL + ["--cp-degree", "2", "--set", f"model.patch_size={p}",
                                                     "--results-dir", f"/tmp/ch14/bad{p}"]) for p in (28, 4)], nproc=2)
broken = two[2]
single = run_here("launchers/single.py", [SMALL + ["--grad-accum", str(a), "--results-dir", f"/tmp/ch14/single{a}"]
                                          for a in (1, 2)]
                  + [SMALL + ["--set", "model.num_heads=2", "--results-dir", "/tmp/ch14/single-h2"]])
for P_ in (2, 3, 4):
    print(f"ring P={P_}: max relative difference to full attention (output, dq, dk, dv; every rank): "
          f"12 tokens {checks[f'ring P={P_} n=12']:.1e}, 13 tokens {checks[f'ring P={P_} n=13']:.1e}")
print(f"USP Ulysses 2 x Ring 2, 16 tokens: {checks['usp 2x2 n=16']:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print("ring attention == full attention (<= 1e-6) for P = 2, 3, 4 at 12 and 13 tokens:",
      all(checks[f"ring P={P_} n={n}"] <= 1e-6 for P_ in (2, 3, 4) for n in (12, 13)))
print("USP 2 x 2 == full attention (<= 1e-6):", checks["usp 2x2 n=16"] <= 1e-6)

# %%
runs = {("ring 2", 1, 2): two[0], ("ring 2", 2, 2): two[1], ("USP 2 x 2", 1, 4): usp,
        ("DP 2 x ring 2", 1, 4): dp2, ("ring 4, 2 heads", 1, 4): ring4}
ref_of = {1: single[0], 2: single[1], "h2": single[2]}
ref = lambda name, acc: ref_of["h2"] if "2 heads" in name else ref_of[acc]
print(format_table(single[0], two[0], "single", "ring 2", limit=6))

# %%
# NBVAL_CHECK_OUTPUT
verdicts = {key: parity(ref(key[0], key[1]), log, SUM_ORDER) for key, log in runs.items()}
for (name, acc, n), v in verdicts.items():
    print(f"{name:16s} ({n} processes) accumulation {acc}: {v.steps == STEPS and 'every step compared'}, "
          f"loss and gradient norm vs single within 1e-5: {'PASS' if v.ok else 'FAIL'}")
print("a degree larger than the token count, and a token count P does not divide, each stop with one sentence:")
for bad in two[3:]:
    print("  error:", bad)

# %%
for (name, acc, n), v in verdicts.items():
    print(f"{name:16s} accumulation {acc}: {v}")
parity_curves(single[0], two[0], names=("single process", "ring attention, 2 ranks share each image"));

# %% [markdown]
# **What to notice.** Ring attention is exact up to float32 rounding (below 1e-6 in every check): the merge adds the
# blocks' sums in another order than one softmax over all keys does. Training stays within the sum-order rung (1e-5)
# of the tolerance ladder (`dit_core.parity.LADDER`, chapter 06) for every layout, on the loss and on the gradient
# norm before clipping, at every step (the lines above give both maxima). The ring of 4 on 2 heads is what chapter 09
# could not do.
#
# The primitive takes slices of unequal length (13 tokens); the DiT's launcher still asks for a token count the
# degree divides (16 tokens at patch 7; `configs/ulysses.yaml` has 196), because the token split, its position
# embedding slice and the loss normalisation are chapter 09's, which cut evenly. A ring larger than the token count
# would leave a rank with nothing: the sentences above name the value and the fix.
#
# ## 4b. The negative control: the loss alone cannot see it
#
# A check that cannot fail proves nothing, so here is one that must. A rank of a context-parallel group computes the
# loss of its own tokens only, so its gradient is its tokens' share of the gradient: the shares must be **summed**
# over the group, and only averaged across data-parallel groups (`grad_divisor()` is dp). `--break cp-average`
# makes the slip that is easy to make, because data parallelism does it: divide by the world size (dp x cp). Every
# gradient is then 1/cp of the right one, here 1/2. It ran in the 2-process job above; parity against the same
# single process as ring 2:

# %%
vb = parity(single[0], broken, SUM_ORDER)
print(vb)
print(format_table(single[0], broken, "single", "cp-average", limit=4))
clip = 0.02
print(f"smallest gradient norm before clipping: one process {min(r['grad_norm'] for r in single[0]):.3f}, "
      f"cp-average {min(r['grad_norm'] for r in broken):.3f}; clipping at {clip}")
rows_l, rows_n = compare(single[0], broken, "loss"), compare(single[0], broken, "grad_norm")
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
axes[0].semilogy([r["step"] for r in rows_l], [max(r["rel"], 1e-12) for r in rows_l], ".-", color="C3")
axes[0].axhline(SUM_ORDER, color="k", ls=":", label="tolerance 1e-5")
axes[0].set_title("loss: relative difference to one process", fontsize=9); axes[0].legend(fontsize=8)
axes[1].plot([r["step"] for r in rows_n], [r["b"] / r["a"] for r in rows_n], ".-", color="C0")
axes[1].axhline(1, color="k", ls=":"); axes[1].set_ylim(0, 1.2)
axes[1].set_title("gradient norm before clipping: cp-average / one process", fontsize=9)
for ax in axes:
    ax.set_xlabel("optimizer step")
plt.tight_layout()

# %%
# NBVAL_CHECK_OUTPUT
print("clipping acted at every step of both runs (gradient norm above it):",
      all(r["grad_norm"] > clip for r in single[0] + broken))
print("cp-average, the loss alone within 1e-5 (a loss-only check would PASS):", vb.loss <= SUM_ORDER)
print("cp-average, parity on loss and gradient norm:", "PASS" if vb.ok else "FAIL", "- what failed:", vb.failed)
print("gradient norm B/A = 1/cp = 0.5 at every step (within 1e-4):",
      all(abs(x / 0.5 - 1) <= 1e-4 for x in vb.norm_ratio))

# %% [markdown]
# **What to notice.** The loss cannot see this bug: it stays within the tolerance of the one-process loss at every
# step (the left plot; its largest difference is in the first line above), while the gradient norm logged before
# clipping is half the right one at every step (the right plot). Clipping at 0.02 acts at every step of both runs
# (their smallest norms are printed above), so the clipped gradient has the same direction and the same length
# whatever the factor, and every update is the one-process update. Without clipping AdamW would hide it as well: its update m/√v does not
# change when every gradient is multiplied by one constant (up to its ε; arithmetic, not run here). Only the norm
# shows the factor, which is why every verdict in this workbook compares both. `tests/test_negative_controls.py`
# runs such a control for every strategy.
#
# ## 5. Why the merge is kept in float32
#
# With bf16 inputs it is tempting to keep the running o, m and l in bf16 too (fewer bytes in a fused kernel). Each of
# the P steps then rounds the accumulated result again, and the errors add up (reported in ring-flash-attention#22).
# The checks above ran rings of P = 2, 3 and 4 over the same 64 tokens three ways against float64 attention:
# merging in float32, merging with the statistics rounded to bf16 after every step (`merge_dtype=torch.bfloat16`, a
# teaching switch), and the float32 result rounded to bf16 once, at the end (what storing the output in bf16 costs
# anyway).

# %%
names = {"merge fp32 error": "merge in fp32", "merge bf16 error": "merge in bf16 (rounded at each of P steps)",
         "bf16 output once error": "fp32 merge, output rounded to bf16 once"}
at = lambda key, P_: checks[key if P_ == 4 else f"{key} P={P_}"]
print(f"{'relative error vs float64':44s} " + "  ".join(f"{f'P = {P_}':>7s}" for P_ in (2, 3, 4)))
for key, label in names.items():
    print(f"{label:44s} " + "  ".join(f"{at(key, P_):.1e}" for P_ in (2, 3, 4)))
print(f"{'bf16 merge / bf16 once':44s} " + "  ".join(f"{at('merge bf16 error', P_) / at('bf16 output once error', P_):7.1f}"
                                                     for P_ in (2, 3, 4)))
fig, ax = plt.subplots(figsize=(6, 2.8))
for (key, label), c in zip(names.items(), ("C2", "C3", "C0")):
    ax.semilogy((2, 3, 4), [at(key, P_) for P_ in (2, 3, 4)], "o-", color=c, label=label)
ax.set_xticks((2, 3, 4)); ax.set_xlabel("ring size P (64 tokens)"); ax.set_ylabel("max relative error")
ax.legend(fontsize=7); plt.tight_layout()

# %%
# NBVAL_CHECK_OUTPUT
print("fp32 merge exact to float rounding (<= 1e-6), P = 2, 3, 4:", all(at("merge fp32 error", P_) <= 1e-6 for P_ in (2, 3, 4)))
print("bf16 merge costs more than twice what one bf16 rounding of the result costs, P = 2, 3, 4:",
      all(at("merge bf16 error", P_) > 2 * at("bf16 output once error", P_) for P_ in (2, 3, 4)))
print("bf16 merge error larger at P = 3 than at 2, and at 4 than at 3:",
      at("merge bf16 error", 2) < at("merge bf16 error", 3) < at("merge bf16 error", 4))

# %% [markdown]
# **What to notice.** Rounding once costs what bf16 costs, whatever P. Rounding at every step costs more than twice
# that already at P = 2, and the error grew with every step added here: measured at P = 2, 3 and 4 on one set of
# inputs (the lines above), not a law for every P and every input. The statistics are a few numbers per query row,
# so keeping them in float32 is nearly free; `RingAttention` does so for any input dtype.
#
# ## 6. What travels and what is kept: Ulysses, Ring, USP
#
# The ring sends, per rank and per layer, the K and V blocks P - 1 times in forward (2·b·(N/P)·h elements each
# time); backward sends them P - 1 times again, plus the partial dK, dV P times. Counted in the checks above (ring of
# 4, one call) against that formula:

# %%
# NBVAL_CHECK_OUTPUT
print("ring elements sent, forward == formula:", checks["ring sent forward"] == checks["ring formula forward"])
print("ring elements sent, backward == formula:", checks["ring sent backward"] == checks["ring formula backward"])

# %% [markdown]
# Counted with `torchrun --nproc_per_node 4 tools/bench_context.py --out docs/bench_context_cpu.json` (CPU, gloo;
# rings and Ulysses groups of P = 2 and of P = 4; DiT hidden 64, depth 2, 4 heads, 2 images). Everything in it is
# counted, nothing timed: the elements each layout sends per layer (the ring's by its counter, Ulysses' at its
# all-to-all calls) beside their formulas, and the bytes of the activations autograd keeps for backward on one rank.
# The committed file is read here; it is not re-run by CI.

# %%
bench = json.load(open("docs/bench_context_cpu.json"))
print(f"{'P':>2} {'tokens':>6} | {'ring fwd / bwd sent':>21} | {'formula':>21} | {'Ulysses fwd / bwd sent':>21} | "
      f"{'fwd formula':>11} | activations MiB: one process / Ulysses / ring (Ulysses, ring / one process)")
for P_, d in bench["degrees"].items():
    for r in d["rows"]:
        print(f"{P_:>2} {r['tokens']:>6} | {r['ring_fwd_elements_per_layer']:>9,.0f} / {r['ring_bwd_elements_per_layer']:>9,.0f} | "
              f"{r['ring_fwd_formula']:>9,} / {r['ring_bwd_formula']:>9,} | {r['ulysses_fwd_elements_per_layer']:>9,.0f} / "
              f"{r['ulysses_bwd_elements_per_layer']:>9,.0f} | {r['ulysses_fwd_formula']:>11,.0f} | "
              f"{r['single_bytes'] / 2**20:6.2f} / {r['ulysses_bytes'] / 2**20:6.2f} / {r['ring_bytes'] / 2**20:6.2f} "
              f"({r['ulysses_bytes'] / r['single_bytes']:.2f}x, {r['ring_bytes'] / r['single_bytes']:.2f}x)")
for P_, d in bench["degrees"].items():
    print(f"P = {P_}: longest sequence whose activations fit {bench['args']['budget_gib']:g} GiB per rank (on the line "
          f"through the last two lengths): " + ", ".join(f"{k} {v:,} tokens" for k, v in d["longest_tokens_in_budget"].items()))
fig, axes = plt.subplots(1, 2, figsize=(12.5, 3.2))
for P_, d in bench["degrees"].items():
    tok = [r["tokens"] for r in d["rows"]]
    if P_ == "2":
        axes[0].loglog(tok, [r["single_bytes"] / 2**20 for r in d["rows"]], "o-", color="k", label="one process")
    for name, st, c in (("ulysses", "s--", "C0"), ("ring", "x:", "C1")):
        axes[0].loglog(tok, [r[f"{name}_bytes"] / 2**20 for r in d["rows"]], st, color=c, alpha=1 if P_ == "2" else 0.5,
                       label=f"{name}, P = {P_}")
axes[0].set_xlabel("tokens per image"); axes[0].set_ylabel("MiB kept for backward, per rank"); axes[0].legend(fontsize=7)
axes[0].set_title("activations (counted, bench_context_cpu.json)", fontsize=9)
b_, n_, h_ = bench["args"]["batch"], bench["degrees"]["2"]["rows"][-1]["tokens"], bench["args"]["hidden"]
Ps = [2, 4, 8, 16]
usp = lambda P_, U: 4 * b_ * n_ / P_ * h_ * (U - 1) / U + 2 * b_ * n_ * h_ * (P_ // U - 1) / P_
for (label, f, key), c in zip((("Ulysses (P <= heads)", lambda P_: ulysses_elements(b_, n_, h_, P_), "ulysses"),
                               ("ring", lambda P_: ring_attention_elements(b_, n_, h_, P_), "ring"),
                               ("USP, Ulysses 2 x ring P/2", lambda P_: usp(P_, 2), None)), ("C0", "C1", "C2")):
    axes[1].plot(Ps, [f(P_) for P_ in Ps], "-", color=c, label=f"{label}: formula")
    if key:
        counted = [(int(P_), r[f"{key}_fwd_elements_per_layer"]) for P_, d in bench["degrees"].items()
                   for r in d["rows"] if r["tokens"] == n_]
        axes[1].plot(*zip(*counted), "o", color=c, ms=8, mfc="none", label=f"{key}: counted")
axes[1].set_xlabel("ranks sharing one image, P"); axes[1].set_ylabel("elements sent per rank per layer (fwd)")
axes[1].set_xticks(Ps); axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
axes[1].set_title(f"formula (lines) and counted (circles): {n_} tokens, {b_} images, hidden {h_}", fontsize=9)
plt.tight_layout()

# %% [markdown]
# **What to notice.** Every counted number equals its formula. Activations per rank fall to about half at P = 2 and
# about a quarter at P = 4, for both layouts (0.52x and 0.26x of one process's at 3136 tokens, 0.55x and 0.30x at
# 16; their lines lie on each other): each rank keeps about N/P tokens' worth, Ulysses because after its all-to-all
# it holds H/P heads of all N tokens, the ring because it keeps its own queries and one block of keys at a time. So
# within a memory budget both reach about P times the sequence one process reaches (at this width: 741k tokens at P
# = 2 and 1.48M at P = 4 against 388k, on a straight line through the two longest lengths counted). They differ in
# what they send and when:
#
# | | Ulysses (chapter 09) | Ring (this chapter) | USP (Ulysses U x Ring R) |
# |---|---|---|---|
# | limit on P | P ≤ heads, heads divisible by P | P ≤ tokens; no head limit | U ≤ heads (divisible); R free |
# | sent per rank per layer, forward (formula) | 4·b·N·h·(P-1)/P² | 2·b·N·h·(P-1)/P | 4·b·N·h·(U-1)/(P·U) + 2·b·N·h·(R-1)/P |
# | counted, 3136 tokens, P = 2 | 401,408 forward, as many backward | 401,408 forward, 1,204,224 backward | — |
# | counted, 3136 tokens, P = 4 | 301,056 forward, as many backward | 602,112 forward, 1,404,928 backward | — |
# | may travel while computing (order of calls; not measured) | nothing: attention waits for the all-to-all | forward: the next K/V block; backward: the next K/V block and the partial dK, dV of the block in hand; the last dK, dV hop home waits | the all-to-alls wait; the ring as in the column before |
# | message pattern | all-to-all (every pair): wants NVLink, one node | one neighbour, point to point: fine across nodes | all-to-all inside a node, ring across nodes |
#
# Counted: at P = 2 both send the same forward; from P = 2 to 4 Ulysses' traffic falls by a quarter and the ring's
# rises by half, so at P = 4 the ring sends twice what Ulysses sends; by the formula (right plot) 4x at P = 8 and
# 8x at P = 16. The ring's order of calls lets it hide its transfers behind compute where the runtime overlaps them
# (not measured here), and it keeps going past the head count. USP puts the all-to-all where bandwidth is high
# (inside a node) and the ring where it is low.
#
# ## 7. Causal attention and the zig-zag split
#
# A DiT's attention is not causal: every token sees every token, so at every ring step each rank computes one full
# block and the work is the same on every rank. A causal LLM's token i sees only tokens ≤ i. With contiguous slices
# rank 0's queries need only block 0 (half of it), the last rank's need all P blocks: the ring moves at the pace of
# the busiest rank. The **zig-zag** split cuts the sequence into 2P chunks and gives rank r chunks r and 2P - 1 - r,
# one early and one late, so every rank gets the same amount of unmasked work (used by ring-flash-attention's
# zigzag variant and Megatron's context parallelism). Counting the unmasked query-key pairs of a causal mask:

# %%
def causal_work(P_, zigzag, n_per_chunk=64):
    chunks = [range(c * n_per_chunk, (c + 1) * n_per_chunk) for c in range(2 * P_)]
    owned = [(chunks[r], chunks[2 * P_ - 1 - r]) if zigzag else (chunks[2 * r], chunks[2 * r + 1]) for r in range(P_)]
    return [sum(i + 1 for part in parts for i in part) for parts in owned]   # query i attends keys 0..i

P = 4
work = {split: causal_work(P, split == "zig-zag") for split in ("contiguous", "zig-zag")}
fig, ax = plt.subplots(figsize=(6, 2.8))
for i, (split, w) in enumerate(work.items()):
    ax.bar(np.arange(P) + (i - 0.5) * 0.38, np.array(w) / np.mean(w), 0.38, label=split)
ax.axhline(1, color="k", ls=":"); ax.set_xticks(range(P), [f"rank {r}" for r in range(P)])
ax.set_ylabel("causal work / mean"); ax.legend(); plt.tight_layout()
for split, w in work.items():
    print(f"{split:10s}: busiest rank / least busy = {max(w) / min(w):.2f}, "
          f"time the ranks wait for the busiest = {1 - np.mean(w) / max(w):.0%}")

# %%
# arithmetic, not a verdict: counts of the unmasked query-key pairs each split gives a rank (no code of context.py runs;
# zig-zag's chunks r and 2P - 1 - r always hold the same number of pairs together)
print("causal, contiguous (arithmetic): the last rank does several times the first's work:",
      work["contiguous"][-1] > 4 * work["contiguous"][0])
print("causal, zig-zag (arithmetic): every rank the same work:", len(set(work["zig-zag"])) == 1)

# %% [markdown]
# **What to notice.** With contiguous slices the busiest of 4 ranks does about 7x the least busy's work, and since
# every step waits for the slowest rank, 43% of the ranks' time goes to waiting; zig-zag makes it exactly even. Nothing of this applies to the DiT
# (its work is even by construction), which is why `context.py` has no zig-zag code. For an LLM the change would be
# in the split (each rank takes two chunks, the position embedding slice follows) and in the mask: a block entirely
# above the diagonal is skipped, the diagonal block is masked, the rest are full.
#
# ## 8. When to pick which
#
# * **Ulysses** while P ≤ heads and the group sits inside one node: its traffic per rank falls as P grows (counted
#   at P = 2 and 4 in section 6). On 2 x H200 (NVLink, commit 406e6c2, 2026-11-24,
#   `docs/measurements/2xh200-2026-11-24/`, chapter 09) SP 2 was 0.52x one GPU at 196 tokens and 1.42x at 3136: only
#   long sequences pay for the all-to-alls.
# * **Ring** past the head count, across nodes, or when compute can hide the transfers (long blocks: by arithmetic,
#   a step's work grows with (N/P)², its bytes with N/P).
# * **USP** for both at once: Ulysses inside the node, the ring between nodes.
# * Data parallelism across all of them, as the DP 2 x ring 2 run above.
#
# The ring's GPU numbers (throughput against Ulysses, whether NCCL overlaps its transfers with the compute) are not
# measured: `launchers/context.py` has never run on NCCL with 2 or more GPUs. On the CPU gloo runs the transfers on
# its own threads; the order of calls is the one a GPU run would make, but no overlap is measured here.
#
# ## Exercises
#
# 1. **Predict.** A DiT with 8 heads, 16 ranks per image (N divisible by 16). Which of Ulysses 16, Ring 16, USP
#    8 x 2, USP 4 x 4 can run? Which sends the fewest elements per rank per layer in forward?
# 2. **Compute.** At P = 8, how many times the Ulysses forward traffic does the ring send? At which P are they equal?
# 3. **Break it.** In `context._merge`, drop the rescaling (use `o + p @ v` and `l + p.sum(-1)`, keep `m_new`).
#    Predict what the ring-attention checks of section 4 say for P = 2, 3 and 4, and what a ring of one
#    (`torchrun --nproc_per_node 1`, P = 1) would say: could a test on one process ever catch this bug? Then run
#    `torchrun --standalone --nproc_per_node 4 tests/context_checks.py /tmp/cc.json`.
# 4. **Predict the factor.** Section 4b's `--break cp-average` divides by the world size instead of by the number
#    of data-parallel groups. Predict the gradient-norm ratio B/A against one process, and which parity verdicts
#    fail, for USP 2 x 2 (`--cp-degree 2 --ulysses-degree 2`) and for DP 2 x ring 2 (`--cp-degree 2`), both on 4
#    processes. Then run them (section 4's flags, `--log-jsonl`) and compare with
#    `python -m dit_core.parity compare single.jsonl broken.jsonl --rtol sum-order`.
# 5. **Where the lesson ends.** Run section 4b's pair (one process, and ring 2 with `--break cp-average`, 30 steps)
#    with `--set train.grad_clip=0.05` instead of 0.02: late in the 30 steps the one-process gradient norm falls to
#    about 0.08 (section 4b prints its smallest). Predict the loss verdict, and say why.
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-14).

# %% [markdown]
# ## 中文要点
#
# 上下文并行（context parallelism）：环形注意力（ring attention）让每个 rank 始终保留自己那段 query，K/V 块沿环传递，P 步后每个 query 都见过全部 key。
#
# 在线 softmax：每块只保留最大值 m、分母 l 和未归一化输出 o，换到同一个最大值下相加即为精确结果；反向用保存的 log-sum-exp 重算概率，不存 P 块概率。
#
# 与 Ulysses 不同，环形注意力不受注意力头数限制（2 个头也能用 4 个 rank）；USP 在节点内用 Ulysses、节点间用环。ring 2、USP 2 x 2、DP 2 x ring 2、2 个头的 ring 4 与单进程对比，损失和梯度范数每一步都在 1e-5 以内。
#
# 负对照（negative control）：`--break cp-average` 把上下文并行组内应当求和的梯度取了平均，梯度只有正确值的一半。每步都在裁剪，所以损失与单进程仍在容差以内，只看损失会判 PASS；裁剪前的梯度范数每一步都是单进程的 0.5 倍，parity 判 FAIL。只看损失发现不了它。
#
# 代码里的重叠顺序：前向在算当前块时下一块 K/V 在传；反向在算本 rank 的份额时，下一块 K/V 和当前块的部分 dK、dV 在传，只有最后一跳把 dK、dV 送回主人时要等。是否真的重叠本章没有测量；context.py 只在 CPU（gloo）上跑过，从未在 2 张以上 GPU 的 NCCL 上运行。
#
# 合并的统计量要保持 fp32：在 P = 2、3、4 上测得，每步都舍入到 bf16 的误差是最后只舍入一次的 2.7、3.0、3.3 倍，且随 P 增大而增大（只测了这三个 P）。
#
# 计数（不是计时）：P = 2 时环与 Ulysses 前向发送量相同；P = 4 时环是 Ulysses 的两倍；每个 rank 的激活在 P = 2 时约减半、P = 4 时约降到四分之一（3136 个 token 时为单进程的 0.52 倍和 0.26 倍，16 个 token 时为 0.55 倍和 0.30 倍）。
#
# DiT 的注意力不是因果的，每个 rank 每步工作量相同；因果 LLM 需要 zig-zag 切分来平衡负载。
