# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The training recipe: accumulation, precision, clipping, schedule, EMA, resume
#
# Chapter 03 trained the DiT; this chapter takes its training loop (`dit_core.train`, the loop every launcher
# reuses) apart and proves each ingredient on its own: gradient accumulation (梯度累积) equals the large batch, what
# mixed precision (混合精度) changes, what clipping does, the schedule, the EMA, an exact resume, the TensorBoard logs
# and `torch.compile`. It ends with the recipe: the defaults and why.
#
# **One choice for the whole chapter:** its runs train with DDPM's ε objective (`diffusion.objective=eps`), not the
# clean-image target the configs use since chapter 03's section 8. The lessons here are about the optimizer and the
# arithmetic, and ε makes them easy to read: its loss starts near 1 for every model (the noise has variance 1), so
# "back at the untrained loss" means one thing. The proofs (accumulation, resume, precision) hold for any objective;
# the dynamics do not: with x_0 the warm-up experiment of section 4 comes out differently (at lr 0.1 a warm-up of 8
# steps no longer saves the run; not shown here).

# %%
import os, time, copy, contextlib
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.parity import compare, max_rel, parity, format_table, read_jsonl, LADDER, BITWISE, SUM_ORDER, CURVE
from dit_core.train import train, ema_decay
from dit_core.scratch import scratch_dir           # temporary folders, removed when the kernel exits

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 12 if SMOKE else 150
os.chdir("..")
SMALL = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "train.train_subset": 2048,
         "train.global_batch_size": 32, "train.max_steps": STEPS, "train.warmup_steps": max(2, STEPS // 10),
         "train.tensorboard": False, "run.device": "cpu", "diffusion.objective": "eps"}

def run(**over):
    o = dict(SMALL, **{"run.results_dir": str(scratch_dir("ch04-"))})
    o.update({k.replace("__", "."): v for k, v in over.items()})
    cfg = load_config("configs/tiny.yaml", o)
    res = train(cfg, quiet=True)
    return [__import__("json").loads(l) for l in open(os.path.join(cfg.run.results_dir, "log.jsonl"))], res, cfg

@contextlib.contextmanager
def one_thread():
    # This model's matmuls are tiny: on a shared 2-core CPU one thread is faster than two.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)

print(LADDER)

# %% [markdown]
# ## 1. Gradient accumulation equals the large batch
#
# With accumulation A the global batch of 32 is processed as A micro-batches of 32/A, each loss divided by A, the
# gradients summed by autograd (chapter 01: `backward` adds), one optimizer step at the end. The gradient is the mean
# over the same 32 samples, so the run is the same run, with less activation memory.
#
# "The same run" needs a tolerance. Every parity proof in this workbook takes it from one place, the tolerance ladder
# (容差阶梯, `dit_core.parity.LADDER`, printed above). Its rung is chosen by what the strategy changes in the
# arithmetic. Accumulation changes only the order of a sum (one sum over 32 samples, or four sums over 8, added): fp32
# rounds each order a little differently (~1e-7 per step), so the rung is `SUM_ORDER` = 1e-5.
#
# A parity proof (`dit_core.parity.parity`) compares two runs at every step on two numbers the log holds: the loss,
# and the gradient norm before clipping. The second is there because a gradient wrong by a constant factor (an
# accumulation divided twice, a sum never divided by N) can leave the loss unchanged; chapters 06, 07, 09 and 10
# break their strategies that way on purpose and show it.

# %%
acc = {a: run(train__grad_accum=a)[0] for a in (1, 2, 4)}
verdict = {a: parity(acc[1], acc[a], SUM_ORDER) for a in (2, 4)}
print(format_table(acc[1], acc[4], "accum 1", "accum 4", limit=5))
for a, v in verdict.items():                      # the measured maxima (this 2-core CPU)
    print(f"accumulation {a} vs 1: {v}")

# %%
# NBVAL_CHECK_OUTPUT
for a, v in verdict.items():
    print(f"accumulation {a} vs one batch of 32: loss and gradient norm equal within the sum-order rung "
          f"({SUM_ORDER:.0e}) at every step:", "PASS" if v.ok else "FAIL")

# %% [markdown]
# ## 2. fp32, bf16, fp16
#
# `train.precision` runs the forward under `torch.autocast` (matmuls in 16 bits, weights and optimizer in fp32);
# fp16 adds a `GradScaler` (chapter 01, section 8). The curves follow each other but are not equal. Here the rounding
# itself changes: every matmul rounds its inputs to 16 bits, at every step, and Adam and the training carry those
# differences on. So mixed precision sits on the loosest rung of the tolerance ladder, `CURVE` = 5e-2: the largest relative
# loss difference to the fp32 run, over all steps, stays under 5%. The curves must follow each other; step by step
# they need not agree. The fp32 rungs (`SUM_ORDER` = 1e-5, `BITWISE` = 0) never judge a 16-bit run.
#
# This is not a strategy's parity proof (a 16-bit run is not meant to be the fp32 run), but the gradient norm is
# measured beside the loss all the same, against the same rung: `parity(fp32, bf16, CURVE)` reports both maxima.

# %%
runs = {p: run(train__precision=p) for p in ("fp32", "bf16", "fp16")}
prec = {p: r[0] for p, r in runs.items()}
vs32 = {p: parity(prec["fp32"], prec[p], CURVE) for p in ("bf16", "fp16")}
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3))
for p, log in prec.items():
    ax.plot([r["loss"] for r in log], label=p, lw=1.2)
ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(); ax.set_title("the same run in three precisions (CPU autocast)")
for i, p in enumerate(("bf16", "fp16")):
    for key, style in (("loss", "-"), ("grad_norm", ":")):
        rows = compare(prec["fp32"], prec[p], key)
        ax2.semilogy([r["step"] for r in rows], [max(r["rel"], 1e-9) for r in rows], style, color=f"C{i + 1}",
                     label=f"{p}, {'loss' if key == 'loss' else 'gradient norm'}")
ax2.axhline(CURVE, color="k", ls="--", lw=0.8, label="curve rung"); ax2.set_xlabel("step")
ax2.set_ylabel("relative difference to fp32"); ax2.legend(fontsize=7); ax2.set_title("loss and gradient norm vs fp32")
plt.tight_layout()
for p, v in vs32.items():                         # measured on this 2-core CPU
    print(f"{p} vs fp32: {v}")

# %%
# NBVAL_CHECK_OUTPUT
for p, v in vs32.items():
    print(f"{p}'s loss follows fp32 on the curve rung ({CURVE:.0e}):", v.loss <= CURVE, "| but is not bitwise fp32:", v.loss > BITWISE)
print("fp16 lands closer to fp32 than bf16, in the loss and in the gradient norm:",
      vs32["fp16"].loss < vs32["bf16"].loss and vs32["fp16"].grad_norm < vs32["bf16"].grad_norm)

# %% [markdown]
# **The gradient norm, measured beside the loss.** It follows fp32 much less closely than the loss does (the printed
# maxima, and the dotted lines of the right plot, which rise along the run): bf16's largest relative difference is
# 4.2e-2, at step 147, some 40 times its loss difference (9.9e-4) and close to the curve rung of 5e-2; fp16's is
# 7.9e-3. So at full size on this CPU bf16 stays inside the rung on the gradient norm too, but with little room, and
# this 150-step run says nothing about longer ones. What it means: step by step, a 16-bit run's gradient norm is
# only roughly the fp32 run's, while its loss curve follows closely; the verdict above is on the loss, and the
# gradient norm is reported here, not proved. (The verdict cell does not check the norm against the rung, so that a
# re-run landing just past 5e-2 cannot be mistaken for a broken recipe; the rung itself is not loosened:
# `dit_core/parity.py` keeps `CURVE` = 5e-2.) A strategy's parity proof never uses this rung: those are fp32 runs.
#
# ### Why fp16 lands closer to fp32 than bf16
#
# Both formats have 16 bits; they split them differently. fp16 keeps 10 mantissa bits and 5 exponent bits; bf16
# keeps 7 mantissa bits and fp32's 8 exponent bits. Rounding to the nearest number makes a relative error of at most
# the unit roundoff (单位舍入误差) u = 2^-(mantissa bits + 1): 2^-11 ≈ 4.9e-4 for fp16, 2^-8 ≈ 3.9e-3 for bf16, 8 times
# more. So fp16 buys precision and bf16 buys range. fp16's largest number is 65504, and below 2^-14 ≈ 6.1e-5 it runs
# out of exponent: smaller numbers lose digits, and below 2^-24 ≈ 6e-8 they become 0. Gradients live down there, so
# fp16 needs the loss scaler (损失缩放: the `GradScaler` multiplies the loss by 2^16 at the start, then adapts). bf16
# has the range of fp32 and needs no scaler. The cell measures the rounding on the fp32 run's trained weights, on the
# activations that enter its matmuls and convolution in one forward, and on one gradient.

# %%
from dit_core.batch import global_batch
from dit_core.data import load_mnist
from dit_core.diffusion import Diffusion
from dit_core.model import DiT

base = load_config("configs/tiny.yaml", SMALL)
data, diffusion = load_mnist("train", "cpu", base.train.train_subset), Diffusion(base.diffusion)

def loss_at(m, step):
    """The loss of the determinism contract's batch of `step` (the batch the loop draws)."""
    b = global_batch(base.train.seed, step, base.train.global_batch_size, len(data), base.diffusion.timesteps,
                     base.diffusion.label_dropout)
    x0, y = data.gather(b.indices)
    return diffusion.loss(m, x0, y, b.t, b.noise, b.drop)

trained = runs["fp32"][1].model
acts = []
hooks = [mod.register_forward_hook(lambda mod, inp, out: acts.append(inp[0].detach().flatten()))
         for mod in trained.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
with one_thread():
    grad = torch.autograd.grad(loss_at(trained, 0), list(trained.parameters()))
for h in hooks:
    h.remove()
tensors = {"weights": torch.cat([p.detach().flatten() for p in trained.parameters()]), "activations": torch.cat(acts),
           "gradient": torch.cat([g.flatten() for g in grad])}
U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
rounding = {}
for what, x in tensors.items():
    for dt, u in U.items():
        err = (x.to(dt).float() - x).abs()
        normal = x.abs() >= torch.finfo(dt).tiny                    # inside the format's normal range
        rounding[what, dt] = dict(norm=(err.norm() / x.norm()).item(), worst=(err[normal] / x.abs()[normal]).max().item(),
                                  below=(~normal & (x != 0)).float().mean().item(),
                                  zero=((x.to(dt) == 0) & (x != 0)).float().mean().item(), u=u)
print("tensor        format  |x-r(x)|/|x|  worst element / u  below normal range  became 0")
for (what, dt), r in rounding.items():
    print(f"{what:12s}  {str(dt)[6:]:8s}  {r['norm']:.2e}      {r['worst'] / r['u']:.3f}              "
          f"{r['below']:7.2%}            {r['zero']:6.2%}")
print(f"loss curves, max relative difference to fp32: bf16 {vs32['bf16'].loss:.1e}, fp16 {vs32['fp16'].loss:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
for what in tensors:
    r16, rb = rounding[what, torch.float16], rounding[what, torch.bfloat16]
    print(f"{what}: every element in range rounds within u (fp16, bf16):", r16["worst"] <= r16["u"], rb["worst"] <= rb["u"],
          "| bf16's error is 4-16x fp16's:", 4 <= rb["norm"] / r16["norm"] <= 16)
print("some gradient elements fall below fp16's normal range, none below bf16's:",
      rounding["gradient", torch.float16]["below"] > 0, rounding["gradient", torch.bfloat16]["below"] == 0)

# %% [markdown]
# **Notice:** the weights and the activations round within u in both formats, and bf16's error is about 8 times
# fp16's: the 3 missing mantissa bits. The loss curves above differ by more than that (9.9e-4 against 4.6e-5, as
# rounding is carried on from step to step), in the same direction. fp16 is closer because it is
# more precise, not because it is better for training: most of the gradient (80% of its elements here) falls below
# fp16's normal range and would lose digits or become 0 without the loss scaler, and a scaled value above 65504
# overflows (the scaler then skips the step). bf16 needs neither. That is why the recipe (section 9) picks bf16 on
# GPUs: its precision is enough for the curve rung (the loss with room, the gradient norm with little), and its range is
# fp32's, so in practice nothing overflows.
#
# **Before `torch.amp`: NVIDIA Apex.** Older training scripts (Megatron-LM's first versions, many 2019-2021 repos)
# import `apex`, NVIDIA's extension library, for three things PyTorch did not have then. `apex.amp` offered mixed
# precision as "opt levels": O1 patched functions to cast to fp16 where safe (what autocast does now), O2 cast the
# model to fp16 and kept fp32 master weights in the optimizer, and O3 was pure fp16; each came with dynamic loss
# scaling. `apex.optimizers` had fused Adam and LAMB (one kernel for the whole update instead of several per tensor),
# and `apex.normalization.FusedLayerNorm` a fused LayerNorm kernel. PyTorch has since absorbed each: `torch.amp`
# (autocast plus `GradScaler`, from 1.6, 2020) replaced apex.amp, which NVIDIA has deprecated; `torch.optim.AdamW(...,
# fused=True)` and `foreach=True` replaced the fused optimizers; and `torch.compile` fuses LayerNorm with its
# neighbours, while `nn.LayerNorm` has its own fused CUDA kernel. This workbook needs no Apex: chapter 11's loop
# uses `torch.amp`, fused AdamW and `torch.compile`. Apex's O2 idea lives on in DeepSpeed and FSDP's mixed precision
# (16-bit weights for compute, fp32 master weights in the optimizer), and its fused kernels in Transformer Engine.

# %% [markdown]
# ## 3. Gradient clipping
#
# `clip_grad_norm_` rescales the whole gradient when its norm exceeds the threshold and returns the norm *before*
# clipping, which is what the log's `grad_norm` holds. Early in training (and after a bad batch) the norm spikes;
# clipping caps the gradient's norm; under Adam the step itself shrinks much less (section 4).

# %%
free, _, _ = run(train__grad_clip=0.0)
limit = sorted(r["grad_norm"] for r in free)[int(0.8 * len(free))]     # the unclipped run's 80th percentile
clipped, _, _ = run(train__grad_clip=limit)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([r["grad_norm"] for r in free], label="no clipping"); ax.plot([r["grad_norm"] for r in clipped], label=f"clip at {limit:.2f}")
ax.axhline(limit, color="k", ls=":"); ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("gradient norm (before clipping)"); ax.legend()
print(f"clipping at {limit:.3f} acted on {sum(r['grad_norm'] > limit for r in clipped)} of {len(clipped)} steps; "
      f"max relative loss difference to the unclipped run {max_rel(compare(free, clipped)):.1e}")

# %% [markdown]
# ## 4. Warm-up and cosine, from the log
#
# The learning rate each step used is in the log: a linear warm-up (学习率预热) over `train.warmup_steps`, then a
# cosine down to `min_lr_ratio` of the peak.

# %%
log = acc[1]
plt.figure(figsize=(6, 2.6)); plt.plot([r["lr"] for r in log]); plt.xlabel("step"); plt.ylabel("lr")
plt.title(f"warmup {SMALL['train.warmup_steps']} steps, cosine to 5%"); plt.grid(alpha=0.3)

# %% [markdown]
# ### Why Adam wants a warm-up
#
# A common explanation says: Adam's moment estimates start at zero, so its first updates are huge. For Adam as
# PyTorch implements it, that is wrong. Bias correction (偏差校正) divides the moments by 1 - β^t. After one step
# m̂ = (1 - β1) g / (1 - β1) = g and v̂ = g², so the first update is lr · g / (|g| + ε) ≈ lr · sign(g). Every parameter
# moves by the full rate, whatever the size of its gradient, and no more. The cell takes one step of the loop's AdamW
# (`dit_core.engine.build_optimizer`, fresh state, the peak rate) on the DiT, once as the loop builds it and once
# moved off adaLN-Zero (as in section 8) so that every parameter has a gradient.

# %%
cfg0 = load_config("configs/tiny.yaml", dict(SMALL, **{"train.warmup_steps": 0}))    # step 0 runs at the peak rate

def make_dit(off_zero):
    torch.manual_seed(cfg0.train.seed)                                  # the loop's initial weights
    m = DiT(cfg0.model)
    if off_zero:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return m

from dit_core.engine import build_optimizer
first = {}
with one_thread():
    for name, off_zero in (("the DiT as built", False), ("moved off adaLN-Zero", True)):
        m = make_dit(off_zero)
        opt, _ = build_optimizer(m, cfg0, torch.device("cpu"))
        lr, eps = opt.param_groups[0]["lr"], opt.param_groups[0]["eps"]
        before = [p.detach().clone() for p in m.parameters()]
        for p, g in zip(m.parameters(), torch.autograd.grad(loss_at(m, 0), list(m.parameters()))):
            p.grad = g
        opt.step()
        g = torch.cat([p.grad.flatten() for p in m.parameters()])
        step = torch.cat([(p.detach() - w).flatten() for p, w in zip(m.parameters(), before)]) / -lr
        first[name] = (g, step, eps)
        big = g.abs() > 1e4 * eps                                       # where eps's share is under 1e-4
        print(f"{name}: {int((g != 0).sum())} of {g.numel()} parameters have a gradient, |g| from "
              f"{g[g != 0].abs().min():.1e} to {g.abs().max():.1e}; where |g| > {1e4 * eps:.0e}, |update| / lr from "
              f"{step[big].abs().min():.4f} to {step[big].abs().max():.4f}")

# %%
# NBVAL_CHECK_OUTPUT
verdicts = []
for name, (g, step, eps) in first.items():
    within = (step - g.sign()).abs() <= eps / (g.abs() + eps) + 1e-4  # eps's share, and fp32 rounding of w + update
    verdicts.append(f"{name}: the first update is lr * sign(g) for every parameter, within eps: {bool(within.all())}")
print("\n".join(verdicts))

# %% [markdown]
# **Notice:** a gradient of 1e-5 and one of 1e-2 move their parameters by the same lr. In the DiT as built, adaLN-Zero
# leaves only the final linear layer with a gradient in step 0; the others have g = 0 and stay where they are
# (sign(0) = 0). The first step is not huge. Because the step does not depend on the gradient's size, clipping
# (section 3), which only scales the gradient, cannot make it smaller either.
#
# The accepted argument is about the adaptive rate 1/√v̂ (Liu et al., 2020, "On the Variance of the Adaptive Learning
# Rate and Beyond", the RAdam paper). In the first steps v̂ is an average of one, two, three squared gradients, and
# such a small sample varies a lot. So some parameters get an adaptive rate many times the one they settle at later.
# A warm-up keeps the global rate small until v̂ rests on enough gradients. The cell holds the weights still, takes
# 40 batches' gradients, and compares 1/√v̂ after t steps (β2 = 0.999, bias-corrected, as in AdamW) with its settled
# value 1/√E[g²], estimated from the last 32 batches.

# %%
m = make_dit(True)
beta2 = cfg0.train.betas[1]
with one_thread():
    G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss_at(m, s), list(m.parameters()))])
                     for s in range(40)])
settled = G[8:].square().mean(0).rsqrt()
v, spread = torch.zeros_like(G[0]), {}
for t in range(1, 9):
    v = beta2 * v + (1 - beta2) * G[t - 1].square()
    ratio = (v / (1 - beta2 ** t)).rsqrt() / settled                    # adaptive rate / its settled value
    q10, q50, q90 = torch.quantile(ratio.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.double)).tolist()
    spread[t] = dict(q10=q10, q50=q50, q90=q90, over3=(ratio > 3).double().mean().item())
fig, ax = plt.subplots(figsize=(6, 3))
ts = list(spread)
ax.fill_between(ts, [spread[t]["q10"] for t in ts], [spread[t]["q90"] for t in ts], alpha=0.3, label="10th to 90th percentile")
ax.plot(ts, [spread[t]["q50"] for t in ts], "k", label="median"); ax.axhline(1, color="k", ls=":")
ax.set_yscale("log"); ax.set_xlabel("Adam step t"); ax.set_ylabel(r"$(1/\sqrt{\hat v})$ / settled value"); ax.legend()
ax.set_title("the adaptive rate of every parameter, first steps")
for t in (1, 2, 4, 8):
    s = spread[t]
    print(f"t={t}: 10th-90th percentile {s['q10']:.2f}-{s['q90']:.2f} (ratio {s['q90'] / s['q10']:.1f}); "
          f"over 3x the settled rate: {s['over3']:.1%} of the parameters")

# %%
# NBVAL_CHECK_OUTPUT
width = [spread[t]["q90"] / spread[t]["q10"] for t in spread]
print("the spread of 1/sqrt(v_hat) shrinks at every step:", all(a > b for a, b in zip(width, width[1:])),
      "| at t=1 it is over 3x its width at t=8:", width[0] > 3 * width[-1])

# %% [markdown]
# ### The same run with and without warm-up
#
# Two comparisons, same seed, same batches. First the chapter's run at its rate (3e-3), with the warm-up of section 1's
# run and without one. Then the same model at a rate 33 times higher (0.1), 24 steps, with 8 warm-up steps and without.

# %%
with one_thread():
    no_warmup = run(train__warmup_steps=0)[0]
    hot = {w: run(train__lr=0.1, train__warmup_steps=w, train__max_steps=24)[0] for w in (8, 0)}
fig, axs = plt.subplots(1, 3, figsize=(12, 3))
for lg, lab in ((acc[1], f"warm-up {SMALL['train.warmup_steps']}"), (no_warmup, "no warm-up")):
    axs[0].plot([r["loss"] for r in lg], label=lab); axs[1].plot([r["grad_norm"] for r in lg], label=lab)
for w, lg in hot.items():
    axs[2].plot([r["loss"] for r in lg], label=f"warm-up {w}" if w else "no warm-up")
axs[0].set_title("lr 3e-3: loss"); axs[1].set_title("lr 3e-3: gradient norm"); axs[2].set_title("lr 0.1: loss")
axs[2].set_yscale("log")
for ax in axs:
    ax.set_xlabel("step"); ax.legend()
k = SMALL["train.warmup_steps"]
mean = lambda lg, a, b: sum(r["loss"] for r in lg[a:b]) / len(lg[a:b])
print(f"lr 3e-3, mean loss of the first {k} steps: {mean(acc[1], 0, k):.4f} with warm-up, {mean(no_warmup, 0, k):.4f} "
      f"without; last step {acc[1][-1]['loss']:.4f} and {no_warmup[-1]['loss']:.4f} (relative difference "
      f"{abs(acc[1][-1]['loss'] - no_warmup[-1]['loss']) / acc[1][-1]['loss']:.1e}); largest gradient norm "
      f"{max(r['grad_norm'] for r in acc[1]):.3f} and {max(r['grad_norm'] for r in no_warmup):.3f}")
for w, lg in hot.items():
    print(f"lr 0.1, warm-up {w}: peak loss {max(r['loss'] for r in lg):.2f} at step "
          f"{max(lg, key=lambda r: r['loss'])['step']}, largest gradient norm {max(r['grad_norm'] for r in lg):.1f}, "
          f"last loss {lg[-1]['loss']:.3f}")

# %%
# NBVAL_CHECK_OUTPUT
print("lr 3e-3: without warm-up the first steps' loss is lower:", mean(no_warmup, 0, k) < mean(acc[1], 0, k))
print("lr 0.1: without warm-up the loss passes 10 and the run ends near 1 (the untrained model's loss):",
      max(r["loss"] for r in hot[0]) > 10 and hot[0][-1]["loss"] > 0.9,
      "| with warm-up it stays below 5 and ends below 0.8:",
      max(r["loss"] for r in hot[8]) < 5 and hot[8][-1]["loss"] < 0.8)

# %% [markdown]
# **Notice:** at the chapter's rate the warm-up costs a little and saves nothing. Without it the loss falls faster
# in the first steps, because the rate is full from step 0, and by the end the two runs meet (the printed last losses).
# Both runs show a bump in the gradient norm some 20 steps in; the warm-up delays it, it does not remove it. That is
# the honest result for a tiny model at a modest rate: nothing here needed protecting. At 0.1 the difference is
# plain. Without warm-up the full rate is applied while v̂ is at its noisiest (the spread above): the loss jumps to
# tens within about 5 steps, the gradient norm to hundreds. Clipping at 1.0 is on, but it only scales the gradient, and
# Adam divides most of that scale out again (all of it in the first step). The run then stays near 1.0, the loss the
# untrained model started at. With 8 warm-up steps the same rate trains. Here the warm-up is what lets the high rate
# work; its length, like the rate, is found by trying.

# %% [markdown]
# ## 5. EMA: an average of the weights along the way
#
# After every step the EMA weights move a little toward the current ones: `ema = ema + (1 - d)(w - ema)`. The decay
# d is warmed up (`min(decay, (1 + n) / (10 + n))`) so a short run still averages trained weights, not the
# initialisation. Samples are drawn with the EMA weights (chapter 03 compares the two).

# %%
# NBVAL_CHECK_OUTPUT
n = torch.arange(0, 5000)
plt.figure(figsize=(6, 2.6)); plt.semilogx(n + 1, [ema_decay(0.999, int(k)) for k in n]); plt.xlabel("update"); plt.ylabel("decay")
plt.title("EMA decay: warmed up, then 0.999"); plt.grid(alpha=0.3)
_, res, _ = run()
w = dict(res.model.named_parameters())
moved = max((w[k].detach() - v).abs().max().item() for k, v in res.ema.module.named_parameters())
print("EMA weights differ from the last weights:", moved > 0, "| decay after 0, 10, 1000 updates:",
      [round(ema_decay(0.999, k), 4) for k in (0, 10, 1000)])

# %% [markdown]
# ## 6. Checkpoint and resume, proved exact
#
# Stop a run in the middle (as a job with a time limit would), resume from its checkpoint, and compare with the run
# that never stopped. Weights, Adam's moments, the scheduler, the EMA and the step counter are restored; the batches
# come from the step number (the determinism contract), so nothing else is needed.
# On the tolerance ladder this is the `BITWISE` rung: the resumed run does the same operations on the same numbers in
# the same order, so it must agree exactly, not within a tolerance.

# %%
# NBVAL_CHECK_OUTPUT
d = str(scratch_dir("ch04-resume-"))
cfg = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d}))
full = train(cfg, quiet=True)
cfg2 = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d + "/b"}))
train(cfg2, quiet=True, stop_at=STEPS // 2)
cfg3 = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d + "/b", "run.resume": f"{d}/b/checkpoint-{STEPS // 2}"}))
rest = train(cfg3, quiet=True)
after = lambda log: [r for r in log if r["step"] >= STEPS // 2]           # the steps the resumed run trained
v = parity(after(read_jsonl(f"{d}/log.jsonl")), after(read_jsonl(f"{d}/b/log.jsonl")), BITWISE)
print("every step after the resume, loss and gradient norm == the uninterrupted run's, bitwise:",
      "PASS" if v.ok and v.steps == STEPS - STEPS // 2 else "FAIL")
print("final weights equal:", all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), rest.model.state_dict().values())))

# %% [markdown]
# ### A real crash: `kill -9` in the middle, then `--resume`
#
# A job that is killed (out of memory, a pre-empted node, Ctrl-C twice) gets no chance to clean up. Here the real
# launcher runs in its own process with a checkpoint every 4 steps, and is killed with SIGKILL once a few steps are
# logged. A checkpoint is written into a hidden `.checkpoint-<step>.tmp/` and renamed when complete, so the kill can
# only cost the steps since the last checkpoint. Resuming from the latest one truncates the log to the steps before
# it (the killed run had logged a few more) and continues; the result is compared with a run that was never killed.
# The guarantees, and the tests that hold the code to them, are in `docs/faults.md`.

# %%
# NBVAL_CHECK_OUTPUT
import shutil, signal, subprocess, sys
from dit_core.logs import read_jsonl
N = 48                                      # steps of this demonstration, in CI and at full size
CLI = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(N), "--global-batch-size", "32",
       "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
       "--set", "train.train_subset=2048", "--set", "train.tensorboard=false", "--set", "train.ckpt_every=4",
       "--set", "diffusion.objective=eps"]
d = str(scratch_dir("ch04-crash-"))
env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
quiet = dict(env=env, stdout=subprocess.DEVNULL)           # each run prints its summary line; not needed here
subprocess.run([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/whole"], check=True, **quiet)
job = subprocess.Popen([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/killed"], **quiet)
while not os.path.exists(f"{d}/killed/log.jsonl") or len(read_jsonl(f"{d}/killed/log.jsonl")) < N // 2:
    time.sleep(0.01)
job.send_signal(signal.SIGKILL); job.wait()
logged = len(read_jsonl(f"{d}/killed/log.jsonl"))
latest = max(int(p.split("-")[1]) for p in os.listdir(f"{d}/killed") if p.startswith("checkpoint-"))
subprocess.run([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/killed",
                "--resume", f"{d}/killed/checkpoint-{latest}"], check=True, **quiet)
whole, resumed = read_jsonl(f"{d}/whole/log.jsonl"), read_jsonl(f"{d}/killed/log.jsonl")
print(f"after the resume: one row per step: {[r['step'] for r in resumed] == list(range(N))}; "
      f"equal to the run never killed, bitwise: {resumed == whole}")

# %%
print(f"the killed run had logged {logged} steps; its latest complete checkpoint was checkpoint-{latest}; "
      f"hidden leftovers of an interrupted checkpoint now: {[p for p in os.listdir(f'{d}/killed') if p.startswith('.check')]}")

# %% [markdown]
# ### Divergence stops the run, and nothing diverged is saved
#
# A diverging run (发散) is finite long before it is NaN: it writes checkpoints whose loss is 1e15 and whose weights
# are thousands of times a healthy run's, and a resume from one of them diverges again at once. So the loop judges
# divergence three ways, at every read-back and before every checkpoint:
#
# - **the weights' norm** against its value at initialisation: above `train.diverge_weights` (100x) the run stops.
#   One AdamW step moves every weight by about the learning rate, so a rate of 1000 trips it at step 0; healthy runs
#   measured here stay within 1.6x (2000 steps of `configs/tiny.yaml`) and 3.6x (lr 0.1 above);
# - **the loss** against its running level (the median of the last 50 steps, once 20 are known): above
#   `train.diverge_loss` (10x) the run stops. Healthy runs measured up to 3.4x at a batch of one, 1.4x at 32. The
#   last 50 losses travel inside each checkpoint, so a resumed run is judged from its first step;
# - **non-finite** loss, gradient norm or weights, the last line: fp32 and bf16 stop at the first; fp16's loss scaler
#   may skip up to `train.max_nonfinite_steps` overflowing steps in a row (that is its job).
#
# The sentence quotes the rate in use and names the last checkpoint written *before* the loss began to climb;
# checkpoints written during the climb are renamed `diverged-checkpoint-N`, so that `--resume auto` never picks one.
# Two runs: lr 1000 from the start, and the 48-step run above resumed from its step-24 checkpoint at lr 1 (the
# schedule's rate, no longer warming up, jumps 300-fold).

# %%
# NBVAL_CHECK_OUTPUT
r = subprocess.run([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/diverged",
                    "--set", "train.lr=1e3", "--set", "train.warmup_steps=0"], env=env, capture_output=True, text=True)
errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
print("lr 1000: exit code:", r.returncode, "| one sentence:", len(errors) == 1,
      "| it names the rate in use and what to do:", "the rate at that step was" in errors[0] and "lower train.lr" in errors[0],
      "| steps logged:", len(read_jsonl(f"{d}/diverged/log.jsonl")),
      "| checkpoints written:", sorted(p for p in os.listdir(f"{d}/diverged") if "checkpoint" in p))
shutil.copytree(f"{d}/whole", f"{d}/hot")
for c in os.listdir(f"{d}/hot"):
    if c.startswith("checkpoint-") and int(c.split("-")[1]) > 24:
        shutil.rmtree(f"{d}/hot/{c}")
r2 = subprocess.run([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/hot", "--set", "train.lr=1.0",
                     "--set", "train.diverge_weights=0", "--resume", f"{d}/hot/checkpoint-24"],
                    env=env, capture_output=True, text=True)
hot_err = [l for l in r2.stderr.splitlines() if l.startswith("error:")]
print("resumed at lr 1: exit code:", r2.returncode, "| stopped by the loss against its running level:",
      len(hot_err) == 1 and "x its running level" in hot_err[0],
      "| points at checkpoint-24:", "checkpoint-24, the last written before step" in hot_err[0],
      "| checkpoints after 24:", [p for p in os.listdir(f"{d}/hot") if p.startswith("checkpoint-") and int(p.split("-")[1]) > 24])

# %%
print(errors[0]); print("the loss logged at that step:", round(read_jsonl(f"{d}/diverged/log.jsonl")[0]["loss"], 3))
print(hot_err[0])

# %% [markdown]
# Notice the first sentence: the loss logged at step 0 was still an ordinary number (about 1.0, the untrained
# model's); the weights had already grown about two-thousandfold, and no later step was taken. In the second, step
# 25's loss is judged against the level the run had reached before the resume (the median of the 25 losses carried in
# checkpoint-24, about 1.0 for this small eps model), not against an empty history, and checkpoint-24 is named as
# the last one written before the loss left that level.
#
# ## 7. TensorBoard
#
# With `train.tensorboard: true` (the default) rank 0 writes `results/<run>/tb`. Open it with
# `tensorboard --logdir results`. The event file is readable from Python too:

# %%
# NBVAL_CHECK_OUTPUT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = str(scratch_dir("ch04-tb-"))
train(load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d, "train.tensorboard": True, "train.log_every": 1})), quiet=True)
ev = EventAccumulator(os.path.join(d, "tb")); ev.Reload()
print("scalars:", sorted(ev.Tags()["scalars"]), "| points of train/loss:", len(ev.Scalars("train/loss")) == STEPS)

# %% [markdown]
# ## 8. `torch.compile`
#
# `torch.compile` traces the model into a graph once and generates fused kernels (Inductor). It must not change the
# numbers beyond float rounding. `train.compile: true` turns it on in the loop; here the model alone, forward and
# backward. (In CI the check uses the `aot_eager` backend, which traces the graph but skips code generation, to stay
# fast; the committed outputs use Inductor.)

# %%
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

# %%
# NBVAL_CHECK_OUTPUT
print("compiled output equals eager within 1e-4:", torch.allclose(out_c, out_e, rtol=1e-4, atol=1e-5))

# %% [markdown]
# On this CPU the compiled step was slower (264.9 ms against 225.2 ms eager, after 115.8 s of compiling; numbers from
# the cell above, measured on this shared 2-core CPU). On a GPU compile pays (fewer kernel launches, fused elementwise
# work); chapter 11 measures it.
#
# ## 9. The recipe
#
# | setting | default (`configs/mnist.yaml`) | why |
# |---|---|---|
# | optimizer | AdamW, betas (0.9, 0.999), weight decay 0 | as in the DiT paper (AdamW, no weight decay) |
# | learning rate | 2e-3 with 300 warmup steps, cosine to 5% (tiny: 3e-3) | warmup keeps the rate low while Adam's v̂ rests on few gradients (section 4: at 0.1 the tiny model needs it, at 3e-3 not); the tiny rate came from the sweep in `docs/results.md` |
# | global batch | 4096 (tiny: 32) | GPU throughput: a small model's step is host-bound at smaller batches (chapter 11); on a CPU the budget is images, and the sweep found more, smaller steps better |
# | gradient clipping | 1.0 | caps the gradient norm of spikes; Adam divides most of the scale out; inactive once training settles |
# | precision | bf16 on GPUs, fp32 for proofs | fp32's range, no loss scaler (fp16 is 8x more precise but needs one, section 2); proofs need exact fp32 |
# | EMA | 0.999 (tiny: 0.995), warmed up | smoother samples; short runs need the warm-up |
# | accumulation | 1 | only when the batch does not fit; section 1 proves it changes nothing else |
# | checkpoints | every 2000 steps, atomic rename | section 6: resume is exact |
#
# On a GPU: `python launchers/single.py --config configs/mnist.yaml` (the config's `run.device: auto`, the same as
# `--device auto`, picks CUDA; bf16 and the one-GPU fast path come from the config).

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** Section 1 proves accumulation 2 and 4 equal 1. Push it to micro-batches of 2: what maximum relative difference of the loss and of the gradient norm do you expect for accumulation 8 against 1 at the same global batch of 16? Run `python launchers/single.py --config configs/tiny.yaml --device cpu --max-steps 20 --global-batch-size 16 --set diffusion.objective=eps --grad-accum 8 --results-dir B` against `--grad-accum 1 --results-dir A` and compare with `python -m dit_core.parity compare A/log.jsonl B/log.jsonl`.
# 2. **Break it.** Resume section 6's checkpoint with another `--seed`. What happens, and why must it?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-04).

# %% [markdown]
# ## 中文要点
#
# 梯度累积（gradient accumulation）与大批次等价：本章逐步证明每一步的损失和裁剪前的梯度范数都相同（在求和顺序一级 1e-5 之内，实测约 1e-7 到 9e-7）。
#
# fp32、bf16、fp16 三种精度的对比；fp16 需要损失缩放。发散（divergence）不等到 NaN 才判定：权重范数超过初始值的 100 倍（`train.diverge_weights`），或某一步损失超过最近 50 步中位数的 10 倍（`train.diverge_loss`），训练就停止，不保存坏的检查点，并指出损失开始上升之前的最后一个检查点；本章 lr=1000 的运行在第 0 步即因权重范数被停止。
#
# fp16 比 bf16 更接近 fp32：fp16 有 10 位尾数（单位舍入误差 2^-11），bf16 只有 7 位（2^-8），误差约大 8 倍；bf16 换来的是与 fp32 相同的数值范围，不需要损失缩放。混合精度按容差阶梯（`dit_core.parity.LADDER`）的 CURVE 一级（5e-2）判定损失。梯度范数也一并测量：bf16 与 fp32 的最大相对差为 4.2e-2（第 147 步），虽在 5e-2 之内，但余量很小，约为其损失差（9.9e-4）的 40 倍；fp16 为 7.9e-3。它只是报告，不作为证明。
#
# 学习率预热的理由：有偏差校正时，Adam 的第一步约为 lr·sign(g)，并不“巨大”；真正的原因是最初几步的 v̂ 只由很少几个梯度估计，自适应学习率 1/√v̂ 方差很大（Liu 等，2020，RAdam）。在本章的小模型上，lr 为 3e-3 时预热几乎没有影响，lr 为 0.1 时不预热则训练崩溃。
#
# 梯度裁剪、学习率预热加余弦退火、EMA，都能从日志里看出来。
#
# 断点续训是精确的：中断后从检查点恢复，后续每一步的损失和梯度范数与不中断的运行逐位相同。
