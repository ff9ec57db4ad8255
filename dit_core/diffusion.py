"""Gaussian diffusion (Ho et al. 2020): schedule, forward noising, loss, samplers.

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the model learns eps (diffusion.objective=eps), or
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (v, Salimans & Ho 2022), or x_0 itself (x0); optionally each
sample's error weighted by min-SNR-gamma (Hang et al. 2023). Sampling walks back from pure noise: DDPM uses
all T steps with the posterior q(x_{t-1} | x_t, x_0); DDIM (Song et al. 2021) jumps over a subsequence.

objective=flow is rectified flow / flow matching as in SiT (Ma et al. 2024): x_s = (1 - s) x_0 + s eps for
s in (0, 1), the network learns the velocity eps - x_0, and an ODE solver (Euler or Heun) integrates from
s = 1 (noise) to s = 0. The determinism contract still draws an integer t in [0, T) per sample; flow maps it
to s = (t + 1/2) / T (uniform) or through the logit-normal quantile function, and the network's time input
stays t (a float t at sampling), so every strategy's code is unchanged.

Classifier-free guidance (Ho & Salimans 2022) mixes a conditional and an unconditional prediction at
sampling time.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import DiffusionConfig
from .fast import GraphedStep


def make_betas(schedule: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if schedule == "cosine":  # Nichol & Dhariwal 2021, s = 0.008
        s = 0.008
        f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"diffusion.schedule={schedule!r} is not linear or cosine.")


class Diffusion:
    def __init__(self, cfg: DiffusionConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.T = cfg.timesteps
        b = make_betas(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)
        ab = np.cumprod(1.0 - b)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)        # beta-tilde_t; 0 at t = 0
        # Computed in float64, stored in float32 on the device.
        arrays = {
            "betas": b, "alphas_cumprod": ab, "alphas_cumprod_prev": ab_prev,
            "sqrt_ab": np.sqrt(ab), "sqrt_one_minus_ab": np.sqrt(1.0 - ab),
            "posterior_variance": post_var,
            "posterior_log_variance": np.log(np.append(post_var[1], post_var[1:])),  # log 0 avoided at t=0
            "posterior_mean_coef1": b * np.sqrt(ab_prev) / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab),
        }
        arrays["alphas_cumprod_ext"] = np.append(ab, 1.0)      # abar after the last sampling step
        snr = ab / (1.0 - ab)
        gamma = np.minimum(snr, cfg.snr_gamma)
        arrays["loss_weight"] = {"eps": gamma / snr, "v": gamma / (snr + 1.0), "x0": gamma}.get(
            cfg.objective, np.ones_like(snr)) if cfg.weighting == "min_snr" else np.ones_like(snr)
        u = (np.arange(cfg.timesteps) + 0.5) / cfg.timesteps                 # flow: t -> s in (0, 1)
        arrays["flow_s"] = u if cfg.flow_time == "uniform" else 1.0 / (1.0 + np.exp(-_normal_quantile(u)))
        for k, v in arrays.items():
            setattr(self, k, torch.tensor(v, dtype=torch.float32, device=device))
        self.plain = cfg.objective == "eps" and cfg.weighting == "none"     # the original objective, bit for bit

    @staticmethod
    def _at(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return a.index_select(0, t.to(a.device)).view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.cfg.objective == "flow":
            s = self._at(self.flow_s, t)
            return (1 - s) * x0 + s * noise
        return self._at(self.sqrt_ab, t) * x0 + self._at(self.sqrt_one_minus_ab, t) * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise)."""
        o = self.cfg.objective
        if o == "eps":
            return noise
        if o == "x0":
            return x0
        if o == "v":
            return self._at(self.sqrt_ab, t) * noise - self._at(self.sqrt_one_minus_ab, t) * x0
        return noise - x0                                                     # flow: the velocity d x_s / d s

    def loss(self, model, x0, y, t, noise, drop=None) -> torch.Tensor:
        """Mean per-element error between the predicted and the true noise."""
        return self.error(model(self.q_sample(x0, t, noise), t, y, drop), x0, t, noise)

    def error(self, pred, x0, t, noise) -> torch.Tensor:
        """The objective on a prediction: apart from `loss` for a pipeline, whose first stage noises the
        images (q_sample) and whose last stage, holding the prediction, computes this."""
        err = F.mse_loss if self.cfg.loss == "mse" else F.l1_loss
        pred = first_channels(pred, noise)
        if self.plain:
            return err(pred.float(), noise)
        per_sample = err(pred.float(), self.target(x0, t, noise), reduction="none").flatten(1).mean(1)
        if self.cfg.weighting == "none":
            return per_sample.mean()
        return (self.loss_weight.index_select(0, t.to(self.loss_weight.device)) * per_sample).mean()

    def error_on_target(self, pred, target) -> torch.Tensor:
        """The unweighted error against a target computed beforehand (torch.distributed.pipelining's loss_fn
        sees only the prediction and a target)."""
        err = F.mse_loss if self.cfg.loss == "mse" else F.l1_loss
        return err(first_channels(pred, target).float(), target)

    def token_error(self, pred, target, t, count: int) -> torch.Tensor:
        """A rank's share of a micro-batch's loss when it holds only some of every image's tokens (sequence and
        context parallelism): its tokens' errors (min-SNR weighted per sample, as on one process), summed and
        divided by `count`, the element count of the *whole* micro-batch. The shares of the ranks that split the
        images add up to the mean loss (the mean of the per-sample means: every sample has as many elements), and
        their gradients to its gradient."""
        err = F.mse_loss if self.cfg.loss == "mse" else F.l1_loss
        e = err(pred.float(), target, reduction="none")
        if self.cfg.weighting != "none":
            e = e * self.loss_weight.index_select(0, t.to(e.device)).view(-1, *[1] * (e.dim() - 1))
        return e.sum() / count

    def split(self, x_t, t, out):
        """(x0, eps) from the network's output for objectives eps, v and x0 (the samplers need both)."""
        out = first_channels(out, x_t)
        a, b = self._at(self.sqrt_ab, t), self._at(self.sqrt_one_minus_ab, t)
        if self.cfg.objective == "x0":
            return out, (x_t - a * out) / b
        if self.cfg.objective == "v":
            return a * x_t - b * out, b * x_t + a * out
        return self.predict_x0(x_t, t, out), out

    def predict_x0(self, x_t, t, eps):
        return (x_t - self._at(self.sqrt_one_minus_ab, t) * eps) / self._at(self.sqrt_ab, t)

    def q_posterior_mean(self, x0, x_t, t):
        return self._at(self.posterior_mean_coef1, t) * x0 + self._at(self.posterior_mean_coef2, t) * x_t

    def sampling_steps(self, sampler: str, steps: int) -> list[int]:
        """The timesteps a sampler visits, from T-1 down to 0."""
        if sampler == "ddpm":
            return list(range(self.T - 1, -1, -1))
        if sampler == "ddim":
            return sorted(set(np.linspace(0, self.T - 1, steps).round().astype(int).tolist()), reverse=True)
        raise ValueError(f"sampler={sampler!r} is not ddim or ddpm.")

    def denoise_step(self, model, x, t, prev, labels, z, cfg_scale: float, sampler: str, eta: float,
                     clip: bool) -> torch.Tensor:
        """x_t -> x_prev for a batch. t, prev: (B,) long tensors (prev = -1 after the last step); z:
        the step's fresh noise (DDPM, DDIM with eta > 0), else unused. Only tensor arithmetic, no
        branch on values, so the step can be recorded once as a CUDA graph."""
        x0, eps = self.split(x, t, model.forward_with_cfg(x, t, labels, cfg_scale).float())
        if clip:
            x0 = x0.clamp(-1, 1)
            # eps consistent with the clipped x0, so both samplers stay on the data range
            eps = (x - self._at(self.sqrt_ab, t) * x0) / self._at(self.sqrt_one_minus_ab, t)
        more = (prev >= 0).float().view(-1, 1, 1, 1)           # 0 at the last step: no new noise
        if sampler == "ddpm":
            mean = self.q_posterior_mean(x0, x, t)
            return mean + more * torch.exp(0.5 * self._at(self.posterior_log_variance, t)) * z
        ab = self._at(self.alphas_cumprod, t)
        # alphas_cumprod with a 1 appended: index -1 (after the last step) reads abar = 1
        ab_prev = self._at(self.alphas_cumprod_ext, prev.remainder(self.T + 1))
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        return x + more * sigma * z if eta > 0 else x

    @torch.no_grad()
    def sample(self, model, labels: torch.Tensor, cfg_scale: float = 3.0, sampler: str = "ddim",
               steps: int = 50, eta: float = 0.0, seed: int = 0, clip: bool = True,
               fast: bool = False, compile: bool = False, pixels: bool = True) -> torch.Tensor:
        """Images in [-1, 1] for the given labels, with classifier-free guidance. pixels=False: VAE latents, which
        are no pixels, returned unclamped (with clip=False, Meta's sample.py's clip_denoised=False).

        fast (CUDA): the denoising step is recorded once as a CUDA graph and replayed, so each of
        the (up to 1000) steps costs one launch instead of one per kernel; compile: torch.compile
        the step first (fewer, fused kernels). Same noise, same arithmetic: the same digits."""
        device = labels.device
        c = model.cfg
        if (self.cfg.objective == "flow") != (sampler in ("euler", "heun")):
            raise ValueError(f"sampler={sampler} does not sample diffusion.objective={self.cfg.objective}; flow takes "
                             f"euler or heun, eps, v and x0 take ddim or ddpm.")
        if self.cfg.objective == "flow":
            return self.sample_flow(model, labels, cfg_scale, sampler, steps, seed, pixels)
        ts = self.sampling_steps(sampler, steps)
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (labels.shape[0], c.in_channels, c.image_size, c.image_size)
        x = torch.randn(shape, generator=g, device=device)
        noisy = sampler == "ddpm" or eta > 0
        def step_fn(x, t, prev, z):
            return self.denoise_step(model, x, t, prev, labels, z, cfg_scale, sampler, eta, clip)

        # Row i: every sample's timestep at step i; the last row (-1) follows the final step.
        timesteps = torch.tensor(ts + [-1], device=device).view(-1, 1).expand(-1, shape[0]).contiguous()
        z = None
        if fast and device.type == "cuda" and not getattr(c, "num_experts", 0):
            # (a mixture of experts routes a data-dependent number of rows to each expert: no graph for it)
            z = torch.zeros_like(x)
            step_fn = GraphedStep(torch.compile(step_fn) if compile else step_fn, (x, timesteps[0], timesteps[1], z))
        for i in range(len(ts)):
            if noisy:
                z = torch.randn(shape, generator=g, device=device)
            x = step_fn(x, timesteps[i], timesteps[i + 1], z)
        return x.clamp(-1, 1) if pixels else x

    def flow_model_time(self, s: torch.Tensor) -> torch.Tensor:
        """The network's time input for flow time s: the t (a float) that q_sample maps to s."""
        u = s if self.cfg.flow_time == "uniform" else torch.special.ndtr(torch.logit(s))
        return u * self.T - 0.5

    @torch.no_grad()
    def sample_flow(self, model, labels, cfg_scale: float, sampler: str, steps: int, seed: int,
                    pixels: bool = True) -> torch.Tensor:
        """Integrate dx/ds = v(x, s) from s = 1 (noise) to 0 in `steps` equal steps: Euler, or Heun (the
        average of the slopes at both ends; the last step is Euler, as the slope at s = 0 is not trained)."""
        device, c = labels.device, model.cfg
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn((labels.shape[0], c.in_channels, c.image_size, c.image_size), generator=g, device=device)
        grid = torch.linspace(1.0, 0.0, steps + 1, device=device)

        def v(x, s):
            t = self.flow_model_time(s).expand(x.shape[0])
            return first_channels(model.forward_with_cfg(x, t, labels, cfg_scale), x).float()

        for i in range(steps):
            s, s_next = grid[i], grid[i + 1]
            d = v(x, s)
            x_next = x + (s_next - s) * d
            if sampler == "heun" and i < steps - 1:
                x_next = x + (s_next - s) * 0.5 * (d + v(x_next, s_next))
            x = x_next
        return x.clamp(-1, 1) if pixels else x


def first_channels(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The prediction in a (B, 2C, H, W) output of a DiT with model.learn_sigma: its first C channels (as Meta's
    sample.py and its training loss read it; the other C set the variance). Any other output is returned as is."""
    c = like.shape[1]
    return out[:, :c] if out.dim() == 4 and out.shape[1] == 2 * c else out


def _normal_quantile(u: np.ndarray) -> np.ndarray:
    """Phi^-1(u), the standard normal's quantile (logit-normal flow time, SD3's default m = 0, s = 1)."""
    return torch.special.ndtri(torch.tensor(u, dtype=torch.float64)).numpy()
