# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 15 · Expert parallelism (专家并行): a mixture-of-experts DiT, by hand
#
# **The idea.** A **mixture of experts** (MoE, 混合专家; Shazeer et al., 2017) replaces a block's MLP by E MLPs, the
# *experts*, and a small linear **router** that picks, for every token, the k experts it goes to. The model holds E
# MLPs' worth of weights, but each token pays for only k of them: parameters grow without the compute per token
# growing. Switch Transformer (Fedus et al., 2021) trained models up to 1.6 trillion parameters this way and reports
# up to 7x faster pre-training than a dense T5 at the same compute; DeepSeek-V3 (2024) holds 671B parameters of
# which 37B are active per token; DiT-MoE (Fei et al., 2024) brought it to diffusion transformers, 16.5B parameters
# and FID-50K 1.80 on ImageNet 512x512.
#
# **Expert parallelism** (EP) is how such a model is spread: each of P ranks holds E/P experts (and a copy of all
# the rest, trained data-parallel); every token travels to the rank of its expert and back, with two
# **all-to-alls** per MoE layer. Unlike Ulysses' all-to-all (chapter 09), the pieces are uneven and change every
# step: the router decides how many tokens each rank sends to each other rank.
#
# The code: the MoE layer is in `dit_core/model.py` (`MoEMlp`, off unless `model.num_experts > 0`, so every
# earlier chapter is unchanged), expert parallelism in `dit_core/parallel/expert.py` (~270 lines):
#
#     python launchers/single.py --config configs/moe.yaml                                     # one process
#     torchrun --nproc_per_node 2 launchers/moe.py --ep-degree 2 --config configs/moe.yaml --device cpu
#     torchrun --nproc_per_node 4 launchers/moe.py --ep-degree 2 --config configs/moe.yaml     # DP 2 x EP 2

# %%
import os, json, inspect
import numpy as np
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.model import DiT, MoEMlp, balance_loss, dispatch_local, moe_layers, count_parameters
from dit_core.parallel import expert
from dit_core.parity import run_mixed, run_here, compare, max_rel, format_table
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30          # parity runs
TRAIN = 60 if SMOKE else 1500       # the single-process runs whose routing sections 2 and 3 look at
# The parity DiT of chapters 09-14 (hidden 32, depth 2, 4 heads) as configs/moe.yaml builds it: 4 experts of half
# the dense MLP width, top-2. Clipping at 0.05 acts at every step (the gradient norm is about 0.5).
SMALL = ["--config", "configs/moe.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.05",
         "--overwrite"]   # the /tmp/ch15 folders are scratch: a re-run replaces them
os.chdir("..")  # launchers are run from the repository root

# %% [markdown]
# ## 1. The layer: route, compute, combine
#
# For each token x the router gives probabilities p = softmax(W_r x) over the E experts; the token goes to its top-k
# experts, and its output is Σ_j w_j · MLP_{e_j}(x) with w_j = p_{e_j} / Σ p_{e_·} (the k probabilities
# renormalised to sum to 1). Running it efficiently means not looping over tokens: sort the (token, choice) pairs
# by expert, run each expert once on its consecutive rows, put the results back in pair order and combine. The E
# experts' weights are stacked (`w1` is E x hidden x width), so expert parallelism can keep a slice of them under
# the same names.

# %%
print(inspect.getsource(MoEMlp.forward))
print(inspect.getsource(dispatch_local))

# %% [markdown]
# The check: one token at a time, straight from the definition, against the layer.

# %%
torch.manual_seed(0)
moe = MoEMlp(8, 12, num_experts=4, top_k=2, group=1)
torch.nn.init.normal_(moe.router.weight); moe.reset_experts()
x = torch.randn(3, 5, 8)
out = moe(x).reshape(-1, 8)
worst = 0.0
for t, xt in enumerate(x.reshape(-1, 8)):
    p = torch.softmax(moe.router(xt), -1)
    top = p.topk(2)
    want = sum(wk / top.values.sum() * (moe.act(xt @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e])
               for wk, e in zip(top.values, top.indices))
    worst = max(worst, (out[t] - want).abs().max().item())
print(f"max difference over 15 tokens: {worst:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print("MoE layer == each token's weighted top-2 experts (<= 1e-6):", worst <= 1e-6)

# %% [markdown]
# How much is "equal active parameters"? `configs/moe.yaml` is the tiny DiT of `make demo` with 4 experts of half
# the dense MLP width (mlp_ratio 2), top-2: a token meets two half-width MLPs, as many weights as one full one.

# %%
dense = DiT(load_config("configs/tiny.yaml").model)
mixed = DiT(load_config("configs/moe.yaml").model)
blk_d, blk_m = dense.blocks[0].mlp, mixed.blocks[0].mlp
mlp_dense = count_parameters(blk_d)
per_expert = sum(getattr(blk_m, n)[0].numel() for n in expert.EXPERT_PARAMS)
active = blk_m.router.weight.numel() + 2 * per_expert
print(f"per block: dense MLP {mlp_dense:,}; MoE: router {blk_m.router.weight.numel():,} + 4 experts x {per_expert:,} "
      f"= {count_parameters(blk_m):,} held, {active:,} active per token")
print(f"whole model: dense {count_parameters(dense):,}, MoE {count_parameters(mixed):,} "
      f"({count_parameters(mixed) / count_parameters(dense):.2f}x the weights)")

# %%
# NBVAL_CHECK_OUTPUT
print("active MLP parameters per token within 1% of the dense MLP's:", abs(active / mlp_dense - 1) < 0.01)

# %% [markdown]
# ## 2. One process first: train it, and look at the routing
#
# The router must not send everything to one expert: an expert that wins early gets more gradient, gets better,
# wins more (a rich-get-richer loop), and the others are wasted weights; under expert parallelism the rank holding
# it also does all the work. The **load-balancing loss** of Switch / GShard pushes back:
#
#     L_aux = E · Σ_e f_e · P_e,   f_e = share of the (token, choice) pairs routed to e,   P_e = mean router probability of e
#
# It is 1 when routing is uniform and grows as it concentrates. f has no gradient (it counts); the router learns
# through P. The total loss is the diffusion loss + `model.aux_loss_weight` (0.01) x L_aux; the log keeps
# `diffusion_loss`, `aux_loss` and `expert_tokens` (per layer and expert) apart. Two runs of `configs/moe.yaml` on
# one process, with and without the balance term:

# %%
print(inspect.getsource(balance_loss))
base = ["--config", "configs/moe.yaml", "--device", "cpu", "--max-steps", str(TRAIN), "--set", "train.tensorboard=false",
        "--set", "train.ckpt_every=0", "--overwrite"]
with_aux, no_aux = run_here("launchers/single.py", [base + ["--results-dir", "/tmp/ch15/aux"],
                                                    base + ["--set", "model.aux_loss_weight=0", "--results-dir", "/tmp/ch15/noaux"]])
r = with_aux[-1]
print(f"step {r['step']}: loss {r['loss']:.4f} = diffusion {r['diffusion_loss']:.4f} + 0.01 x aux {r['aux_loss']:.4f}")

# %%
# NBVAL_CHECK_OUTPUT
pairs = 32 * 16 * 2                      # images x tokens x top-2, per layer and step
print("logged loss == diffusion loss + 0.01 x balance loss at every step:",
      all(abs(r["loss"] - r["diffusion_loss"] - 0.01 * r["aux_loss"]) <= 1e-6 * r["loss"] for r in with_aux))
print("every (token, choice) pair counted once per layer at every step:",
      all(sum(layer) == pairs for r in with_aux for layer in r["expert_tokens"]))

# %% [markdown]
# Which token goes where: ten test digits (one per class), noised to the middle of the schedule, through the trained
# model; each of the 16 patches coloured by the expert its token ranks first, in the first and the last block.

# %%
from dit_core.checkpoint import model_from_checkpoint
from dit_core.data import load_mnist
from dit_core.diffusion import Diffusion
model, cfg = model_from_checkpoint(f"/tmp/ch15/aux/checkpoint-{TRAIN}", ema=False)
diffusion = Diffusion(cfg.diffusion, "cpu")
test = load_mnist("test", "cpu")
idx = torch.stack([torch.nonzero(test.labels == c)[0, 0] for c in range(10)])
x0, _ = test.gather(idx)

def route(x0, t, y):
    """Top-1 expert of every token in every MoE layer: (layers, B, tokens)."""
    picks = []
    hooks = [m.router.register_forward_hook(lambda mod, i, o: picks.append(o.argmax(-1))) for m in moe_layers(model)]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        model(diffusion.q_sample(x0, t, noise), t, y)
    for h in hooks:
        h.remove()
    return torch.stack(picks).view(len(picks), len(x0), -1), diffusion.q_sample(x0, t, noise)

t_mid = torch.full((10,), 500)
picks, xt = route(x0, t_mid, torch.arange(10))
grid = model.grid
cmap = plt.get_cmap("tab10", 4)
fig, axes = plt.subplots(3, 10, figsize=(10, 3.3))
for c in range(10):
    axes[0, c].imshow(xt[c, 0], cmap="gray"); axes[0, c].set_title(str(c), fontsize=8)
    for row, layer in ((1, 0), (2, len(picks) - 1)):
        axes[row, c].imshow(picks[layer, c].view(grid, grid), cmap=cmap, vmin=-0.5, vmax=3.5)
for a in axes.flat:
    a.set_xticks([]); a.set_yticks([])
axes[0, 0].set_ylabel("x_t, t=500", fontsize=7); axes[1, 0].set_ylabel("block 0", fontsize=7)
axes[2, 0].set_ylabel(f"block {len(picks) - 1}", fontsize=7)
fig.suptitle("each patch coloured by its token's first expert (4 colours = 4 experts)", fontsize=9); plt.tight_layout()

# %% [markdown]
# DiT-MoE reports that expert choice follows spatial position and the denoising timestep far more than the class.
# The same question of this small model: the share of first choices each expert gets, by timestep and by class
# (100 test images per class, block 0).

# %%
imgs, _ = test.gather(torch.cat([torch.nonzero(test.labels == c)[:100, 0] for c in range(10)]))
labels = torch.arange(10).repeat_interleave(100)
by_t = []
for tv in (50, 250, 500, 750, 950):
    p, _ = route(imgs, torch.full((len(imgs),), tv), labels)
    by_t.append(torch.bincount(p[0].flatten(), minlength=4).float() / p[0].numel())
p, _ = route(imgs, torch.full((len(imgs),), 500), labels)
by_c = [torch.bincount(p[0, labels == c].flatten(), minlength=4).float() / p[0, labels == c].numel() for c in range(10)]
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8), sharey=True)
for ax, rows, ticks, title in ((axes[0], by_t, [50, 250, 500, 750, 950], "by timestep t (all classes)"),
                               (axes[1], by_c, list(range(10)), "by class (t = 500)")):
    rows = torch.stack(rows).numpy()
    bottom = np.zeros(len(rows))
    for e in range(4):
        ax.bar(range(len(rows)), rows[:, e], bottom=bottom, color=cmap(e), label=f"expert {e}"); bottom += rows[:, e]
    ax.set_xticks(range(len(rows)), ticks); ax.set_title(title, fontsize=9)
axes[0].set_ylabel("share of first choices"); axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
plt.tight_layout()
spread = lambda rows: (torch.stack(rows).max(0).values - torch.stack(rows).min(0).values).max().item()
print(f"largest change of an expert's share across timesteps: {spread(by_t):.2f}, across classes: {spread(by_c):.2f}")

# %% [markdown]
# **What to notice.** The strongest pattern is spatial: in block 0 the same patches go to the same experts in
# every digit (the border, background in all of MNIST, to one or two experts; the centre, where the strokes are, to
# others), and the deepest block mixes more. DiT-MoE found expert choice following position and timestep more than
# class. This small model, as committed (1500 steps), moves an expert's share by 0.07 across timesteps and 0.13
# across classes (the thin 1 stands out): position first, as they found, but class before timestep here. A
# 4-expert MNIST DiT is not a 16B ImageNet one; the cell is the tool to ask your own model the question.
#
# ## 3. Load balance, with and without the balance loss
#
# Each expert's share of the (token, choice) pairs over training, block 0. Uniform is 1/4.

# %%
def shares(log, layer=0):
    return np.array([np.array(r["expert_tokens"][layer]) / sum(r["expert_tokens"][layer]) for r in log])

def smooth(a, n=25):
    n = min(n, len(a))
    return np.stack([np.convolve(a[:, e], np.ones(n) / n, mode="valid") for e in range(a.shape[1])], 1)

committed = json.load(open("docs/moe_balance_cpu.json"))      # the 6000-step runs of docs/results.md
runs = [("this execution, aux 0.01", shares(with_aux)), ("this execution, no aux", shares(no_aux)),
        ("6000 steps, aux 0.01 (committed)", np.array(committed["moe"])),
        ("6000 steps, no aux (committed)", np.array(committed["moe-noaux"]))]
fig, axes = plt.subplots(1, 4, figsize=(14, 2.8), sharey=True)
for ax, (name, s) in zip(axes, runs):
    sm = smooth(s, 25 if "this" in name else 5)
    for e in range(4):
        ax.plot(sm[:, e], color=cmap(e), label=f"expert {e}")
    ax.axhline(0.25, color="k", ls=":"); ax.set_title(name, fontsize=9)
    ax.set_xlabel("step" if "this" in name else f"step / {committed['every']}")
axes[0].set_ylabel("share of pairs, block 0"); axes[-1].legend(fontsize=7)
plt.tight_layout()
for name, s in runs:
    print(f"{name:34s}: last-10% mean share of the busiest expert {s[-max(1, len(s) // 10):].mean(0).max():.2f}, "
          f"of the idlest {s[-max(1, len(s) // 10):].mean(0).min():.2f}")

# %%
# NBVAL_CHECK_OUTPUT
c = committed["summary"]
print(f"committed 6000-step runs: with the balance loss the busiest expert's share is lower than without: "
      f"{c['moe']['busiest'] < c['moe-noaux']['busiest']}")

# %% [markdown]
# **What to notice.** Without the balance term nothing holds the router back and the shares drift apart; with it
# they stay near 1/4. Over the last 600 of the committed 6000 steps, block 0's busiest expert took 25.3% of the
# pairs with the balance loss and 36.2% without (the idlest 24.3% and 18.3%; in the least balanced block without it,
# 40% and 11%). A 0.01 weight is enough: the balance loss moves only the router, and the router has few weights.
#
# ## 4. Expert parallelism: dispatch and combine
#
# P ranks, E/P experts each, every rank with its own images (the non-expert weights are data-parallel). In every
# MoE layer each rank routes its own tokens, then:
#
# 1. **sizes**: an all-to-all of E counts, so every rank learns how many rows it will receive from each rank for
#    each of its experts (the splits change every step);
# 2. **dispatch**: the (token, choice) rows, sorted by expert (so by destination rank), through an all-to-all with
#    those uneven splits (`all_to_all_single` with `input_split_sizes` / `output_split_sizes`);
# 3. **compute**: each rank's experts on the rows from every rank;
# 4. **combine**: the results back along the same routes (the splits swapped), then each token's k rows weighted.
#
# As an autograd function the all-to-all's backward is the same exchange reversed, so every gradient goes back to
# where its row came from, and each expert's gradient sums every rank's tokens.

# %%
print(inspect.getsource(expert.AllToAll))
print(inspect.getsource(expert.ExpertDispatch.__call__))

# %% [markdown]
# What one all-to-all moves, for the ten digits above split over 2 ranks (5 images each) with the experts of
# block 0 split 2 + 2: row s, column e is how many of rank s's pairs go to expert e. The diagonal blocks stay home;
# the off-diagonal ones cross the wire, in the dispatch and again in the combine.

# %%
full_top = []
h = moe_layers(model)[0].router.register_forward_hook(lambda m, i, o: full_top.append(o.topk(2, -1).indices))
with torch.no_grad():
    model(xt, t_mid, torch.arange(10))
h.remove()
top = full_top[0].view(2, -1, 2)                          # (rank, its tokens, k)
table = np.array([[int((top[s] == e).sum()) for e in range(4)] for s in range(2)])
fig, ax = plt.subplots(figsize=(4.2, 2.4))
ax.imshow(table, cmap="Blues")
for s in range(2):
    for e in range(4):
        ax.text(e, s, table[s, e], ha="center", va="center", fontsize=9,
                fontweight="bold" if e // 2 != s else None)
ax.set_xticks(range(4), [f"expert {e}\n(rank {e // 2})" for e in range(4)], fontsize=7)
ax.set_yticks(range(2), ["from rank 0", "from rank 1"], fontsize=7)
ax.set_title("pairs per (source rank, expert); bold: sent to the other rank", fontsize=8); plt.tight_layout()
print(f"rows sent to the other rank: rank 0 {table[0, 2:].sum()}, rank 1 {table[1, :2].sum()} "
      f"(of {table[0].sum()} each); uniform routing would send half: {table[0].sum() // 2}")

# %% [markdown]
# Per rank and MoE layer, forward, with uniform routing: T·k·h·(P-1)/P elements out in the dispatch and as many
# back in the combine (`expert.dispatch_elements`), T = its tokens; the backward sends the same again. With real
# routing the numbers are the off-diagonal counts above, which is why the sizes must be exchanged first.
#
# ## 5. The proof
#
# First the layer, in four processes: every rank builds the same whole MoE layer and the same tokens, keeps its
# slice of the tokens and its E/P experts, and compares the output and the gradients (tokens, router, routing
# weights, every expert parameter) with the whole layer in one process, for EP groups of 2 and 4; again with an
# **unbalanced** routing in which no token chooses expert 1 (at P = 4 its rank receives nothing, yet must still
# take part in every all-to-all of forward and backward). Then training against one process: EP 2 (2 processes),
# EP 4 and DP 2 x EP 2 (4 processes), with gradient accumulation 1 and 2 for EP 2, and clipping active.

# %%
def ep(p, a=1, extra=(), name=None):
    return ("launchers/moe.py", SMALL + ["--ep-degree", str(p), "--grad-accum", str(a), *extra,
                                         "--results-dir", f"/tmp/ch15/{name or f'ep{p}-a{a}'}"])
(checks,), ep4, dp2 = run_mixed([("tests/expert_checks.py", []), ep(4), ep(2, name="dp2ep2")], nproc=4)
two = run_mixed([ep(2), ep(2, 2),
                 ep(2, extra=["--set", "model.moe_aux_group=8"], name="per-rank-group"),      # section 6
                 ep(2, extra=["--set", "model.num_experts=3", "--set", "model.top_k=1"], name="e3"),
                 ep(2, extra=["--set", "model.top_k=5"], name="k5")], nproc=2)
single = run_here("launchers/single.py", [SMALL + ["--grad-accum", str(a), "--results-dir", f"/tmp/ch15/single{a}"]
                                          for a in (1, 2)]
                  + [SMALL + ["--set", "model.moe_aux_group=16", "--results-dir", "/tmp/ch15/single-g16"]])
for P in (2, 4):
    print(f"EP {P}: max relative difference to the whole layer {checks[f'layer P={P}']:.1e}; unbalanced routing "
          f"(expert 1 gets {checks[f'unbalanced P={P} tokens of expert 1']} tokens) {checks[f'unbalanced P={P}']:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print("EP layer == whole layer (<= 1e-6), P = 2 and 4, also with an expert that gets no token:",
      all(checks[f"{k} P={P}"] <= 1e-6 for k in ("layer", "unbalanced") for P in (2, 4)))
print("elements each rank sent == the off-diagonal counts of its routing, forward and backward:",
      checks["sent == counts, every rank"])

# %%
runs = {("EP 2", 1, 2): two[0], ("EP 2", 2, 2): two[1], ("EP 4", 1, 4): ep4, ("DP 2 x EP 2", 1, 4): dp2}
print(format_table(compare(single[0], two[0])[:6], "single", "EP 2"))

# %%
# NBVAL_CHECK_OUTPUT
for (name, acc, n), log in runs.items():
    ref = single[acc - 1]
    same_tokens = [r["expert_tokens"] for r in log] == [r["expert_tokens"] for r in ref]
    aux = max(abs(a["aux_loss"] / b["aux_loss"] - 1) for a, b in zip(log, ref))
    print(f"{name:12s} ({n} processes) accumulation {acc}: loss parity "
          f"{'PASS' if len(log) == STEPS and max_rel(compare(ref, log)) <= 1e-5 else 'FAIL'}, tokens per expert "
          f"identical at every step: {same_tokens}, balance loss within 1e-5: {aux <= 1e-5}")
print("bad layouts stop with one sentence each:")
for bad in two[3:]:
    print("  error:", bad)

# %%
for (name, acc, n), log in runs.items():
    print(f"{name:12s} accumulation {acc}: max rel loss diff {max_rel(compare(single[acc - 1], log)):.1e}")
parity_curves(single[0], two[0], names=("single process", "expert parallel, 2 ranks"));

# %% [markdown]
# **What to notice.** The routing is the same decision on one process and on N (tokens per expert identical at
# every step: the router is the same numbers on the same tokens), and the loss agrees to float rounding: the
# expert's gradient is the same sum of the same rows' contributions, added in another order.
#
# ## 6. Break it: where the balance loss is computed
#
# The balance loss is not a mean over tokens: f·P is a product of two averages, so the loss over 16 images is not the
# mean of the losses over two halves of 8. The natural code computes it over "the batch", which on one process is
# 16 images and on each of 2 ranks is 8: the two runs then optimise different objectives. This workbook computes it
# per **routing group** of `model.moe_aux_group` images (GShard's groups; 1 image = the sequence-wise loss of
# DeepSeek-V3), and a group never straddles two ranks or micro-batches, so every layout sees the same groups. Above
# ran the natural code's objective on purpose: one process with groups of 16 (its whole batch), 2 ranks with groups
# of 8 (each its whole batch).

# %%
# NBVAL_CHECK_OUTPUT
g16, g8 = single[2], two[2]
worst_aux = max(abs(a["aux_loss"] / b["aux_loss"] - 1) for a, b in zip(g8, g16))
print(f"balance loss over each rank's batch vs over the whole batch: parity "
      f"{'PASS' if max_rel(compare(g16, g8)) <= 1e-5 else 'FAIL'}; balance loss differs by more than 1e-3 relative: "
      f"{worst_aux > 1e-3}")

# %%
print(f"max relative loss difference {max_rel(compare(g16, g8)):.1e}, balance loss {worst_aux:.1e} "
      f"(step 0: {g16[0]['aux_loss']:.5f} vs {g8[0]['aux_loss']:.5f})")

# %% [markdown]
# **What to notice.** It fails from step 0, before any weight differs: the same routing, a different number. This
# is how "the balance loss depends on the number of GPUs" happens. Either reduce f and P across the ranks before the
# product (a collective in every MoE layer, and the gradient through P must be scaled to match), or define the
# groups so that no layout splits one (no collective): this workbook does the second.
#
# ## 7. Measured
#
# **Memory per rank.** Under EP each rank holds all non-expert weights and E/P of the experts; fp32 weights,
# gradients and Adam's two moments are 16 bytes per parameter. For `configs/moe.yaml`:

# %%
total = count_parameters(mixed)
experts_all = sum(getattr(m, n).numel() for m in moe_layers(mixed) for n in expert.EXPERT_PARAMS)
print(f"{'EP':>3} | {'shared':>9} | {'experts':>9} | {'per rank':>9} | model states per rank")
per_rank = {}
for P in (1, 2, 4):
    per_rank[P] = total - experts_all + experts_all // P
    print(f"{P:>3} | {total - experts_all:>9,} | {experts_all // P:>9,} | {per_rank[P]:>9,} | "
          f"{per_rank[P] * 16 / 2**20:.2f} MiB")

# %%
# NBVAL_CHECK_OUTPUT
m2 = DiT(load_config("configs/moe.yaml").model)
expert.shard_experts(m2, 0, 4, None)
print("a rank of EP 4 holds exactly shared + experts / 4:", count_parameters(m2) == per_rank[4])

# %% [markdown]
# The experts are 57% of this model, so a rank of EP 4 holds 58% of it: the shared part (attention, embeddings,
# adaLN modulation, routers) stays whole on every rank. Expert parallelism shrinks exactly the weights the MoE
# added; combined with ZeRO or FSDP (chapters 07, 13) over the data-parallel ranks, the shared part shrinks too.
#
# **Quality at equal active parameters** (2-core CPU, 6000 steps each, the same batches; `python
# tools/compare_objectives.py --out R --only moe,dense,moe-noaux`, 1000 samples scored by the workbook's classifier,
# `docs/moe_cpu.jsonl`):

# %%
rows = {json.loads(l)["name"]: json.loads(l) for l in open("docs/moe_cpu.jsonl")}
print(f"{'model':10s} | {'train s':>7} | {'accuracy':>8} | {'worst class':>11} | FID / floor")
for name, row in rows.items():
    s = row["samples"][0]
    print(f"{name:10s} | {row['train_s']:>7.0f} | {s['accuracy']:>8.1%} | {s['worst_class']:>11.0%} | "
          f"{s['fid'] / s['fid_floor']:.1f}")

# %% [markdown]
# ![dense vs MoE digits](../docs/figures/moe_digits.png)
#
# **What to notice.** At equal active parameters the MoE reads as well as the dense DiT (100.0% against 99.9%, a
# lower FID ratio), with 1.4x its weights, and takes 1.45x its training time on this CPU: routing, sorting and one
# small matrix product per expert cost more than they save when every expert is this small. MoE pays at scale,
# where an expert's matrix products dwarf the routing and the extra weights buy quality a dense model of the same
# compute does not reach. Without the balance loss this small model also reads well: imbalance wastes experts (and,
# under expert parallelism, the idle ranks' time) before it costs quality.
#
# ## 8. At scale: capacity, dropping, shared experts
#
# This workbook's MoE is **dropless**: an expert takes every row it is sent. Production systems usually give each
# expert a **capacity** C·(T·k)/E rows per step (capacity factor C, e.g. 1.25 in Switch) so that every rank's work
# and buffers have a fixed size; rows over capacity are **dropped** (the token skips the MLP through the residual
# connection). From the counts the runs above logged, what each capacity factor would have dropped:

# %%
def dropped(log, C):
    tot = over = 0
    for r in log:
        for layer in r["expert_tokens"]:
            cap = C * sum(layer) / len(layer)
            over += sum(max(0.0, n - cap) for n in layer); tot += sum(layer)
    return over / tot
Cs = [1.0, 1.25, 1.5, 2.0]
fig, ax = plt.subplots(figsize=(5, 2.6))
for name, log in (("aux 0.01", with_aux), ("no aux", no_aux)):
    d = [dropped(log, C) for C in Cs]
    ax.plot(Cs, [100 * v for v in d], "o-", label=name)
    print(f"{name:9s}: " + ", ".join(f"C={C:g}: {100 * v:.1f}% dropped" for C, v in zip(Cs, d)))
ax.set_xlabel("capacity factor C"); ax.set_ylabel("% of pairs dropped"); ax.legend(); plt.tight_layout()

# %% [markdown]
# (Counted per step over the whole batch; a real system applies capacity per rank or per group, which drops more.)
# A balanced router is what makes a small C affordable. Dropping also breaks this chapter's proof: which rows an
# expert drops depends on the order they arrive in, so a dropping rule must be defined on the global token order to
# give one process and N ranks the same model. Two more designs at scale: **shared experts** (DeepSeekMoE, 2024;
# DiT-MoE uses them) that every token always visits, beside the routed ones, to hold what all tokens need; and
# **fine-grained experts**, many small experts with a larger k, which route more precisely for the same compute.
#
# ## Exercises
#
# 1. **Predict.** `configs/moe.yaml` on EP 2: how many parameters does each rank hold, and what fraction of the
#    model is that? Check with the table of section 7.
# 2. **Predict, then count.** A rank of EP 4 with 512 tokens, top-2, hidden 64, uniform routing: how many elements
#    does it send in one MoE layer's forward (dispatch and combine together)? Compare with `expert.dispatch_elements`.
# 3. **Break it.** In `ExpertStrategy.finish_gradient_sync` all-reduce the expert gradients over **every** rank
#    (group `None`) instead of over their replicas. Predict the verdicts of section 5 for EP 2 (2 processes) and for
#    DP 2 x EP 2 (4 processes). Then run them.
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-15).

# %% [markdown]
# ## 中文要点
#
# 混合专家（MoE）：每个 block 的 MLP 换成 E 个专家和一个线性路由器，每个 token 只去 top-k 个专家，参数变多而每个 token 的计算量不变。
#
# 专家并行（expert parallelism）：每个 rank 只放 E/P 个专家，其余参数数据并行；每个 MoE 层两次 all-to-all（分发、合并），切分大小每步不同，要先交换。
#
# 负载均衡损失 E·Σ f·P 防止路由器只用少数专家；它不是 token 的平均，所以按固定的“路由组”计算，单卡与多卡才完全一致（本章复现了按每卡批次计算导致不一致的问题）。
#
# 专家梯度只在持有同一专家副本的 rank 之间求和；与单进程对比损失误差约 1e-7，每个专家收到的 token 数完全相同。
#
# 大规模时：容量因子与丢弃 token、共享专家、细粒度专家。
