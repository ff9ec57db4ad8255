"""Gaussian diffusion (Ho et al. 2020): schedule, forward noising, loss, samplers.

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the model learns eps.
Sampling walks back from pure noise: DDPM uses all T steps with the posterior
q(x_{t-1} | x_t, x_0); DDIM (Song et al. 2021) jumps over a subsequence of steps.
Classifier-free guidance (Ho & Salimans 2022) mixes a conditional and an
unconditional prediction at sampling time.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import DiffusionConfig


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
        for k, v in arrays.items():
            setattr(self, k, torch.tensor(v, dtype=torch.float32, device=device))

    @staticmethod
    def _at(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return a.index_select(0, t.to(a.device)).view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_ab, t) * x0 + self._at(self.sqrt_one_minus_ab, t) * noise

    def loss(self, model, x0, y, t, noise, drop=None) -> torch.Tensor:
        """Mean per-element error between the predicted and the true noise."""
        return self.error(model(self.q_sample(x0, t, noise), t, y, drop), x0, t, noise)

    def error(self, pred, x0, t, noise) -> torch.Tensor:
        """The objective on a prediction: apart from `loss` for a pipeline, whose first stage noises the
        images (q_sample) and whose last stage, holding the prediction, computes this."""
        err = F.mse_loss if self.cfg.loss == "mse" else F.l1_loss
        return err(pred.float(), noise)

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
        eps = model.forward_with_cfg(x, t, labels, cfg_scale).float()
        x0 = self.predict_x0(x, t, eps)
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
               fast: bool = False, compile: bool = False) -> torch.Tensor:
        """Images in [-1, 1] for the given labels, with classifier-free guidance.

        fast (CUDA): the denoising step is recorded once as a CUDA graph and replayed, so each of
        the (up to 1000) steps costs one launch instead of one per kernel; compile: torch.compile
        the step first (fewer, fused kernels). Same noise, same arithmetic: the same digits."""
        device = labels.device
        c = model.cfg
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
        if fast and device.type == "cuda":
            from .fast import GraphedStep
            z = torch.zeros_like(x)
            step_fn = GraphedStep(torch.compile(step_fn) if compile else step_fn, (x, timesteps[0], timesteps[1], z))
        for i in range(len(ts)):
            if noisy:
                z = torch.randn(shape, generator=g, device=device)
            x = step_fn(x, timesteps[i], timesteps[i + 1], z)
        return x.clamp(-1, 1)
