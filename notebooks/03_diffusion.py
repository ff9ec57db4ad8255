# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Diffusion: noising, the objective, sampling, guidance, evaluation
#
# **The idea** (Ho et al., 2020). Destroy an image step by step with Gaussian noise until nothing is left; train a
# network to predict the noise that was added at any step; then run the destruction backwards, from pure noise to an
# image, with the network's prediction at each step. Forward: x_t = √ᾱ_t · x_0 + √(1-ᾱ_t) · ε, where ᾱ_t falls from 1
# to almost 0 over T = 1000 steps. Objective: ‖ε - ε_θ(x_t, t, y)‖², at a random t for every image.

# %%
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

# %% [markdown]
# ## 1. Forward noising of real digits

# %%
x0, _ = data.gather(torch.arange(6))
ts = [0, 50, 100, 250, 500, 750, 999]
g = torch.Generator().manual_seed(0)
noise = torch.randn(x0.shape, generator=g)
rows = [diffusion.q_sample(x0, torch.full((6,), s), noise) for s in ts]
fig, axes = plt.subplots(1, len(ts), figsize=(1.6 * len(ts), 5))
for ax, s, r in zip(axes, ts, rows):
    ax.imshow(grid_array(r, nrow=1), cmap="gray"); ax.set_title(f"t = {s}", fontsize=9); ax.axis("off")

# %%
# NBVAL_CHECK_OUTPUT
t = torch.full((200000,), 500)
xt = diffusion.q_sample(torch.zeros(200000, 1, 1, 1), t, torch.randn(200000, 1, 1, 1))
ab = diffusion.alphas_cumprod[500].item()
print("q_sample(x0=0, t=500) has std sqrt(1 - abar_500):", abs(xt.std().item() - (1 - ab) ** 0.5) < 0.01)
print(f"abar at t = 0, 250, 500, 999: {[round(diffusion.alphas_cumprod[s].item(), 4) for s in (0, 250, 500, 999)]}")

# %% [markdown]
# **What to notice:** by t = 500 the digit is hard to see, and well before t = 999 nothing of it is left. The linear
# schedule spends many steps at high noise.
#
# ## 2. Schedules: linear and cosine
#
# ᾱ_t and the signal-to-noise ratio SNR = ᾱ/(1-ᾱ) for the linear schedule (this project's default, as in DDPM) and
# the cosine schedule (Nichol & Dhariwal, 2021), which destroys information more evenly.

# %%
import numpy as np
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for name in ("linear", "cosine"):
    ab_ = np.cumprod(1 - make_betas(name, 1000))
    axes[0].plot(ab_, label=name); axes[1].semilogy(ab_ / (1 - ab_), label=name)
axes[0].set_title("ᾱ_t (signal kept)"); axes[1].set_title("SNR"); [a.set_xlabel("t") or a.legend() for a in axes]
plt.tight_layout()

# %% [markdown]
# ## 3. A short training run
#
# The tiny config on this CPU. (The GPU config, `configs/mnist.yaml`, trains in about 1.5 minutes on one H100 and
# passes 99% sample accuracy with a feature FID under 3x its floor after 60-75 s: chapter 11 and `docs/results.md`.)

# %%
from dit_core.train import train
STEPS = 50 if SMOKE else 4000
d = tempfile.mkdtemp(prefix="ch03-")
run_cfg = load_config("configs/tiny.yaml", {"train.max_steps": STEPS, "train.warmup_steps": min(200, STEPS // 5),
                                            "train.tensorboard": False, "run.device": DEVICE, "run.results_dir": d})
t0 = time.perf_counter()
res = train(run_cfg, quiet=True)
print(f"{STEPS} steps of {run_cfg.train.global_batch_size} images in {time.perf_counter() - t0:.0f} s")
l = np.array(res.losses); k = max(1, min(100, len(l) // 10))
plt.figure(figsize=(6, 2.8)); plt.plot(np.convolve(l, np.ones(k) / k, mode="valid")); plt.xlabel("step"); plt.ylabel("loss (moving mean)"); plt.grid(alpha=0.3)

# %% [markdown]
# ## 4. DDPM and DDIM sampling
#
# DDPM walks back through all 1000 steps, adding fresh noise each time. DDIM (Song et al., 2021) takes a
# deterministic path through a subsequence of the steps: here 50, 20x fewer network calls.

# %%
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

# %%
# NBVAL_CHECK_OUTPUT
print("DDIM ran 20x fewer network calls and was faster:", timing["ddim"] < timing["ddpm"])
print("both samplers return images in [-1, 1]:", all(s.min() >= -1 and s.max() <= 1 for s in samples.values()))

# %% [markdown]
# ## 5. Classifier-free guidance
#
# During training 10% of the labels are replaced by the null class, so one network learns both ε(x, t, y) and
# ε(x, t, ∅). At sampling time guidance extrapolates from the unconditional prediction toward the conditional one:
# ε = ε(∅) + s · (ε(y) - ε(∅)). s = 0 ignores the label, s = 1 is the plain conditional model, larger s trades
# variety for fidelity to the class.

# %%
scales = [0.0, 1.0, 3.0, 5.0, 8.0]
fig, axes = plt.subplots(1, len(scales), figsize=(2.4 * len(scales), 2.8))
acc = {}
for ax, s in zip(axes, scales):
    imgs = diffusion.sample(ema, torch.arange(10, device=DEVICE).repeat(2), cfg_scale=s, steps=50, seed=1)
    ax.imshow(grid_array(imgs, nrow=10), cmap="gray"); ax.set_title(f"guidance {s}", fontsize=9); ax.axis("off")
    acc[s] = score_samples(imgs, torch.arange(10, device=DEVICE).repeat(2), DEVICE)["accuracy"]
plt.tight_layout()
print("sample accuracy by guidance scale:", {s: f"{a:.0%}" for s, a in acc.items()})

# %% [markdown]
# ## 6. EMA against the raw weights, and the evaluation numbers
#
# `dit_core.evaluate` reads generated digits with a small CNN trained on MNIST (99% on the test set): the share read
# as the class they were generated for (per class), and a Fréchet distance between the CNN's features of generated and
# real digits (feature FID), next to its floor, the same distance between two sets of *real* digits.

# %%
raw = res.model.eval()
for name, m in (("EMA weights", ema), ("raw weights", raw)):
    imgs = diffusion.sample(m, labels, cfg_scale=cfg.sample.cfg_scale, steps=50, seed=2)
    print(name + ":", format_report(score_samples(imgs, labels, DEVICE)))

# %% [markdown]
# **What to notice.** A few minutes of CPU training give digits the classifier reads far better than chance (10%)
# but far from the 99.7% of the GPU run: `docs/results.md` ("choosing the tiny config") explains why a DiT is slow to
# lay out a whole digit with epsilon prediction at this budget. Guidance is what makes the short run's classes
# readable at all: s = 0 (and here s = 1) read near chance, s = 3 best, and very strong guidance loses again. With 20
# images per scale these are rough; with 300 samples the standard error of an accuracy near 28% is still about 2.6
# points, which is why the EMA and the raw weights of this short run cannot be told apart by accuracy (the EMA's
# feature FID is a little lower).

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** With the linear schedule (β from 1e-4 to 0.02, 1000 steps), how much of the original image is left at the last step: what is ᾱ_T? Print `Diffusion(cfg.diffusion).alphas_cumprod[-1]`.
# 2. **Predict, then run.** Sample with guidance 0, 3 and 8 (section 5's sweep): which gives the highest classifier accuracy, and which the most varied digits?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-03).

# %% [markdown]
# ## 中文要点
#
# 前向加噪有闭式解：x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε，任意时间步一步到位。
#
# 训练目标是预测所加的噪声 ε；线性调度与余弦调度对高噪声步的权重不同。
#
# 采样：DDPM 走完全部步数，DDIM 用少得多的步数得到相近的图像（本章快了约 19 倍）；无分类器引导（CFG）有一个最佳系数，本章的短训练模型在 3 附近最好，太大反而变差。
#
# EMA 是权重的滑动平均，长时间训练后通常比原始权重采样更好；本章只训练了很短时间，两者相近（27.7% 对 29.0%）。评估用分类器准确率和特征空间的 FID。
