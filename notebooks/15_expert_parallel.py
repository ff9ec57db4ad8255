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
#
# **On GPUs** the same commands run without `--device cpu`: `--device auto` gives each process one GPU and NCCL,
# e.g. `torchrun --nproc_per_node 2 launchers/moe.py --ep-degree 2 --config configs/moe.yaml` on a machine with 2
# GPUs (with fewer GPUs than processes every rank stops with a sentence saying so). **`launchers/moe.py` has never run
# on NCCL with 2 or more GPUs**, nor one rank through the CUDA code path: it has run only over gloo, on CPU
# processes. Every number this chapter computes or reads comes from a 2-core CPU.

# %%
import os, json, inspect
import numpy as np
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.model import DiT, count_parameters
from dit_core.moe import MoEMlp, balance_loss, dispatch_local, moe_layers
from dit_core.parallel import expert
from dit_core.parity import run_mixed, run_here, parity, format_table, compare, SUM_ORDER
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
# bookkeeping, not a proof: the log's three numbers are kept apart by the objective and must add up
print("bookkeeping: logged loss == diffusion loss + 0.01 x balance loss at every step:",
      all(abs(r["loss"] - r["diffusion_loss"] - 0.01 * r["aux_loss"]) <= 1e-6 * r["loss"] for r in with_aux))

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
# Is that routing what the layer says it does? Through the same forward, record each MoE layer's router logits z
# (hook on the router) and the decision its `forward` hands to the experts: each token's k expert indices and
# combine weights (a wrapper around `dispatch`). Then recompute the decision from z alone, another way: the k
# largest logits (softmax is monotone, so they are the k largest probabilities), and as weights the softmax over
# those k logits only, e^{z_e} / Σ_{chosen} e^{z_j}, which is p_e / Σ_{chosen} p_j without ever forming the softmax
# over all E. (Counting the (token, choice) pairs instead would prove nothing: there are T·k of them whatever the
# router decides.)

# %%
decisions, logits = [], []

def recording(inner):
    def dispatch(moe, x, top_i, w):
        decisions.append((top_i, w.double()))
        return inner(moe, x, top_i, w)
    return dispatch

layers = moe_layers(model)
inner = [m.dispatch for m in layers]
hooks = [m.router.register_forward_hook(lambda mod, i, o: logits.append(o.detach().double())) for m in layers]
for m, f in zip(layers, inner):
    m.dispatch = recording(f)
with torch.no_grad():
    model(xt, t_mid, torch.arange(10))
for m, f, h in zip(layers, inner, hooks):
    m.dispatch = f; h.remove()
k = cfg.model.top_k
same_experts = distinct = True
w_err = 0.0
gap = float("inf")
for z, (top_i, w) in zip(logits, decisions):
    z = z.reshape(-1, z.shape[-1])
    ranked = z.argsort(-1, descending=True)
    same_experts &= torch.equal(top_i.sort(-1).values, ranked[:, :k].sort(-1).values)
    distinct &= bool((top_i.sort(-1).values.diff(dim=-1) != 0).all())
    w_err = max(w_err, (w - torch.softmax(z.gather(-1, top_i), -1)).abs().max().item())
    zs = z.gather(-1, ranked)
    gap = min(gap, (zs[:, k - 1] - zs[:, k]).min().item())     # how far the k-th logit is from the (k+1)-th
print(f"{len(layers)} layers x {logits[0].numel() // logits[0].shape[-1]} tokens: combine weights differ from the "
      f"softmax over the chosen logits by at most {w_err:.1e}; smallest gap between the k-th and the next logit {gap:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print(f"every token's {k} experts are distinct, and are its {k} largest router logits, in every MoE layer:",
      distinct and same_experts)
print("combine weights == softmax over the chosen experts' logits alone (<= 1e-6):", w_err <= 1e-6)

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
# class. This small model, as committed (1500 steps), moves an expert's share by 0.08 across timesteps and 0.11
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
for k, label in (("moe", "aux 0.01"), ("moe-noaux", "no aux")):
    sm_ = committed["summary"][k]
    print(f"6000 steps, {label} (committed summary, last 10%): block 0 busiest {sm_['busiest']:.1%}, idlest "
          f"{sm_['idlest']:.1%}; over all blocks, the busiest expert of any block {sm_['busiest_any_layer']:.1%}, "
          f"the idlest of any block {sm_['idlest_any_layer']:.1%}")

# %%
# NBVAL_CHECK_OUTPUT
c = committed["summary"]
print(f"committed 6000-step runs: with the balance loss the busiest expert's share is lower than without: "
      f"{c['moe']['busiest'] < c['moe-noaux']['busiest']}")

# %% [markdown]
# **What to notice.** Without the balance term nothing holds the router back and the shares drift apart; with it
# they stay near 1/4. Over the last 600 of the committed 6000 steps, block 0's busiest expert took 25.3% of the
# pairs with the balance loss and 36.2% without (the idlest 24.3% and 18.3%; over all blocks without it, the busiest
# expert of any block took 40.1% and the idlest of any block 10.6%, against 27.2% and 22.5% with it). For this model
# a weight of 0.01 was enough.
#
# **Where the balance loss's gradient goes.** f has no gradient (it counts), so the balance loss reaches the model
# through P_e, the mean router probability, which depends on the router's weights *and on the router's input*: the
# block's normalised, adaLN-modulated hidden state, which nothing detaches. Measured with autograd on the trained
# model: one batch of 32 test images at random timesteps, the backward of the balance term alone, and beside it the
# backward of the diffusion loss alone, gradient norms by parameter group:

# %%
torch.manual_seed(0)
sel = torch.randperm(len(imgs))[:32]
xb, yb, tb = imgs[sel], labels[sel], torch.randint(0, 1000, (32,))
diff_loss = diffusion.loss(model, xb, yb, tb, torch.randn_like(xb))
aux_loss = torch.stack([balance_loss(m) for m in moe_layers(model)]).mean()
names, params = zip(*model.named_parameters())
g_aux = torch.autograd.grad(aux_loss, params, retain_graph=True, allow_unused=True)
g_diff = torch.autograd.grad(diff_loss, params, allow_unused=True)
last = len(model.blocks) - 1

def group(name):
    if ".mlp.router." in name:
        return "routers"
    if ".mlp." in name:
        return f"experts, block {last} (the last)" if name.startswith(f"blocks.{last}.") else f"experts, blocks 0-{last - 1}"
    if ".attn." in name:
        return "attention"
    if name.startswith("blocks."):
        return "adaLN modulation, blocks"
    return "final layer" if name.startswith("final_layer") else "embedders (patch, timestep, class)"

sq = {}
for n, p_, ga, gd in zip(names, params, g_aux, g_diff):
    row = sq.setdefault(group(n), [0, 0.0, 0.0])
    row[0] += p_.numel()
    row[1] += 0.0 if ga is None else ga.square().sum().item()
    row[2] += 0.0 if gd is None else gd.square().sum().item()
norm_aux = {g: v[1] ** 0.5 for g, v in sq.items()}
print(f"balance loss {aux_loss.item():.4f}, diffusion loss {diff_loss.item():.4f}")
print(f"{'parameter group':36s} {'params':>7} {'|grad| balance':>15} {'|grad| diffusion':>17} {'0.01 x balance / diffusion':>27}")
for g, (n_, a2, d2) in sq.items():
    print(f"{g:36s} {n_:>7,} {a2 ** 0.5:>15.2e} {d2 ** 0.5:>17.2e} {0.01 * a2 ** 0.5 / d2 ** 0.5:>27.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print("the balance loss alone sends gradient to the routers:", norm_aux["routers"] > 0)
print("... and to parameters outside the routers (attention, adaLN, embedders, earlier experts):",
      all(norm_aux[g] > 0 for g in ("attention", "adaLN modulation, blocks", "embedders (patch, timestep, class)",
                                    f"experts, blocks 0-{last - 1}")))
print("... but none to the last block's experts or the final layer, which act after every router:",
      norm_aux[f"experts, block {last} (the last)"] == 0 and norm_aux["final layer"] == 0)

# %% [markdown]
# **What to notice.** The balance loss does not move only the router. Its gradient flows back through every router's
# input into everything upstream of it: attention, the adaLN modulation (through the shift and scale that modulate
# the router's input), the patch, timestep and class embeddings, and the experts of every block before the last
# (their outputs feed later blocks' routers). Only what comes after the last router gets none: the last block's
# experts and the final layer. Unweighted, its gradient on the embedders (4.0e-2) and on the adaLN modulation
# (3.0e-2) is larger than on the routers (2.3e-2). Weighted by 0.01 it is 0.7% to 3.2% of the diffusion loss's
# gradient norm in each group it reaches in this batch, the most in the routers (the last column).
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
print(inspect.getsource(expert.RouteRowsAllToAll))
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
# take part in every all-to-all of forward and backward). The same job counts, at the collective
# (`dit_core.parallel.measure.CommCounter` wraps `torch.distributed.all_to_all_single`), the bytes each rank's
# all-to-alls carry in one layer's forward and backward (P = 4), and compares them with what the routing says, from
# the counts of every rank's choices: the sizes, the rows for this rank's expert from every rank, and this rank's own
# rows coming back, then the same two exchanges reversed. Then training against one process: EP 2 (2 processes),
# EP 4 and DP 2 x EP 2 (4 processes), with gradient accumulation 1 and 2 for EP 2, and clipping active. Each run is
# compared with `parity` (chapter 06): the loss **and** the gradient norm before clipping, at every step, within the
# sum-order rung (1e-5). The 2-process job also runs section 5b's negative control, section 6's experiment and two
# bad layouts.

# %%
def ep(p, a=1, extra=(), name=None):
    return ("launchers/moe.py", SMALL + ["--ep-degree", str(p), "--grad-accum", str(a), *extra,
                                         "--results-dir", f"/tmp/ch15/{name or f'ep{p}-a{a}'}"])
(checks,), ep4, dp2 = run_mixed([("tests/expert_checks.py", []), ep(4), ep(2, name="dp2ep2")], nproc=4)
two = run_mixed([ep(2), ep(2, 2),
                 ep(2, extra=["--set", "model.moe_aux_group=8"], name="per-rank-group"),      # section 6
                 ep(2, extra=["--break", "expert-average"], name="broken"),                    # section 5b
                 ep(2, extra=["--set", "model.num_experts=3", "--set", "model.top_k=1"], name="e3"),
                 ep(2, extra=["--set", "model.top_k=5"], name="k5")], nproc=2)
broken = two[3]
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
print("bytes each rank's all-to-alls carried (counted at torch.distributed.all_to_all_single) == its routing's counts, "
      "forward and backward:", checks["all-to-all bytes == routing counts, every rank"])

# %%
runs = {("EP 2", 1, 2): two[0], ("EP 2", 2, 2): two[1], ("EP 4", 1, 4): ep4, ("DP 2 x EP 2", 1, 4): dp2}
print(format_table(single[0], two[0], "single", "EP 2", limit=6))

# %%
# NBVAL_CHECK_OUTPUT
verdicts = {}
for (name, acc, n), log in runs.items():
    ref = single[acc - 1]
    v = verdicts[name, acc] = parity(ref, log, SUM_ORDER)
    same_tokens = [r["expert_tokens"] for r in log] == [r["expert_tokens"] for r in ref]
    aux = max(abs(a["aux_loss"] / b["aux_loss"] - 1) for a, b in zip(log, ref))
    print(f"{name:12s} ({n} processes) accumulation {acc}: parity (loss and gradient norm, {v.steps == STEPS and 'every step'}) "
          f"{'PASS' if v.ok else 'FAIL'}, tokens per expert identical at every step: {same_tokens}, balance loss "
          f"within 1e-5: {aux <= 1e-5}")
print("clipping acted at every step of the single-process runs (gradient norm > 0.05):",
      all(r["grad_norm"] > 0.05 for r in single[0] + single[1]))
print("bad layouts stop with one sentence each:")
for bad in two[4:]:
    print("  error:", bad)

# %%
for (name, acc), v in verdicts.items():
    print(f"{name:12s} accumulation {acc}: {v}")
parity_curves(single[0], two[0], names=("single process", "expert parallel, 2 ranks"));

# %% [markdown]
# **What to notice.** The routing is the same decision on one process and on N (tokens per expert identical at
# every step: the router is the same numbers on the same tokens), and the loss and the gradient norm agree to float
# rounding at every step: the expert's gradient is the same sum of the same rows' contributions, added in another
# order.
#
# ## 5b. The negative control: a factor on part of the gradient
#
# A check that cannot fail proves nothing, so here is one that must. Under expert parallelism an expert's gradient
# already sums the tokens of its whole EP group (the backward all-to-all brings every rank's rows home); all-reduced
# over its replicas (one per EP group) it must be divided by N, the world size, like every other gradient.
# `--break expert-average` divides it by its replica count dp instead, the size of the group it was all-reduced
# over, which is the rule for every other gradient: the experts' gradients come out ep = 2 times too large, the rest
# stays right. Unlike the constant factors of the other chapters' controls (chapter 14's cp-average: the whole
# gradient x 1/2) this one scales only a part of the gradient. It ran in the 2-process job above; parity against the
# same single process as EP 2:

# %%
vb = parity(single[0], broken, SUM_ORDER)
print(vb)
print(format_table(single[0], broken, "single", "expert-avg", limit=6))
rows_l, rows_n = compare(single[0], broken, "loss"), compare(single[0], broken, "grad_norm")
first = {k: next((r["step"] for r in rows if r["rel"] > SUM_ORDER), None) for k, rows in (("loss", rows_l),
                                                                                        ("grad_norm", rows_n))}
print(f"first step past the tolerance: gradient norm {first['grad_norm']}, loss {first['loss']}")
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
for rows, label, c in ((rows_n, "gradient norm", "C0"), (rows_l, "loss", "C3")):
    axes[0].semilogy([r["step"] for r in rows], [max(r["rel"], 1e-12) for r in rows], ".-", color=c, label=label)
axes[0].axhline(SUM_ORDER, color="k", ls=":", label="tolerance 1e-5")
axes[0].set_title("relative difference to one process", fontsize=9); axes[0].legend(fontsize=8)
axes[1].plot([r["step"] for r in rows_n], [r["b"] / r["a"] for r in rows_n], ".-", color="C0")
axes[1].axhline(1, color="k", ls=":")
axes[1].set_title("gradient norm before clipping: expert-average / one process", fontsize=9)
for ax in axes:
    ax.set_xlabel("optimizer step")
plt.tight_layout()

# %%
# NBVAL_CHECK_OUTPUT
print("expert-average, parity on loss and gradient norm:", "PASS" if vb.ok else "FAIL")
print("the gradient norm catches it:", "grad_norm" in vb.failed)
print("the gradient norm is past the tolerance no later than the loss:",
      first["grad_norm"] is not None and (first["loss"] is None or first["grad_norm"] <= first["loss"]))
print("there, the broken run's norm is the larger (the experts' share doubled):",
      first["grad_norm"] is not None and rows_n[first["grad_norm"]]["b"] > rows_n[first["grad_norm"]]["a"])

# %% [markdown]
# **What to notice.** The gradient norm catches it: it leaves the tolerance first (the line above: step 3, with the
# broken run's norm the larger), and its largest difference, 1.2e-2, comes at step 11. The ratio starts at
# exactly 1: adaLN-Zero's gates start at zero, so at step 0 the experts' gradient is exactly zero and doubling it
# changes nothing, and for a few steps after the experts' share of the gradient stays small. Here the loss catches
# it too, one step later, up to 2.4e-3: a factor on *part* of the gradient changes the direction of the update,
# which neither clipping nor AdamW divides out, so the two runs take different paths. From then on the ratio compares
# two different models, and it falls below 1 as well as rising above it (0.988 to 1.011 here). A bug that scales
# all of the gradient hides from the loss while clipping acts at every step (chapter 14's cp-average); one that
# scales a part of it need not, but the norm sees both.
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
vg = parity(g16, g8, SUM_ORDER)
worst_aux = max(abs(a["aux_loss"] / b["aux_loss"] - 1) for a, b in zip(g8, g16))
print(f"balance loss over each rank's batch vs over the whole batch: parity {'PASS' if vg.ok else 'FAIL'}; "
      f"balance loss differs by more than 1e-3 relative: {worst_aux > 1e-3}")

# %%
print(f"{vg}\nbalance loss: max relative difference {worst_aux:.1e} "
      f"(step 0: {g16[0]['aux_loss']:.5f} vs {g8[0]['aux_loss']:.5f})")
first_g = {k: next((r["step"] for r in vg.rows[k] if r["rel"] > SUM_ORDER), None) for k in ("loss", "grad_norm")}
print(f"first step past {SUM_ORDER:.0e}: loss {first_g['loss']}, gradient norm {first_g['grad_norm']}; "
      f"tokens per expert identical at step 0: {g16[0]['expert_tokens'] == g8[0]['expert_tokens']}")

# %% [markdown]
# **What to notice.** The loss fails from step 0 (the gradient norm from step 1), before any weight differs: the same
# routing (tokens per expert identical at step 0), a different balance loss, so a different total loss. This
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
# 混合专家（MoE）：每个 block 的 MLP 换成 E 个专家和一个线性路由器，每个 token 只去 top-k 个专家，参数变多而每个 token 的计算量不变。本章用路由器的 logits 独立重算了路由：每个 token 的 k 个专家互不相同、正是 logits 最大的 k 个，合并权重等于只在所选专家的 logits 上做 softmax。
#
# 专家并行（expert parallelism）：每个 rank 只放 E/P 个专家，其余参数数据并行；每个 MoE 层两次 all-to-all（分发、合并），切分大小每步不同，要先交换。
#
# 负载均衡损失 E·Σ f·P 防止路由器只用少数专家；它不是 token 的平均，所以按固定的“路由组”计算，单进程与多进程才完全一致（本章复现了按每个 rank 的批次计算导致不一致的问题）。它的梯度不只到路由器：路由器的输入没有 detach，梯度沿输入传到注意力、adaLN 调制、嵌入层和前面各 block 的专家；只有最后一个路由器之后的部分（最后一个 block 的专家、最终层）收不到。
#
# 专家梯度只在持有同一专家副本的 rank 之间求和、除以总 rank 数；EP 2、EP 4、DP 2 x EP 2 与单进程对比，损失和梯度范数每一步都在 1e-5 以内，每个专家收到的 token 数完全相同。
#
# 负对照（negative control）：`--break expert-average` 把专家梯度除以副本数而不是总 rank 数，只有专家那部分梯度变成 2 倍。梯度范数先超出容差（第 3 步），损失晚一步；因为只放大了一部分梯度，更新方向改变了，所以这里损失也能发现。放大整个梯度的错误（第 14 章的 cp-average）只看损失发现不了，梯度范数两种都能发现。
#
# moe.py 只在 CPU（gloo）上跑过，从未在 2 张以上 GPU 的 NCCL 上运行。
#
# 大规模时：容量因子与丢弃 token、共享专家、细粒度专家。
