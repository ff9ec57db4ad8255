import math

import numpy as np
import pytest
import torch

from dit_core.config import DiffusionConfig
from dit_core.diffusion import Diffusion, make_betas


def test_linear_schedule_matches_the_course():
    b = make_betas("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02) and len(b) == 1000
    assert np.prod(1 - b) < 1e-4           # x_T is almost pure noise


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    ab = np.cumprod(1 - make_betas("cosine", T))
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert ab[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_q_sample_mean_and_variance():
    d = Diffusion(DiffusionConfig())
    t = torch.full((200000,), 300)
    x0 = torch.full((200000, 1, 1, 1), 0.7)
    xt = d.q_sample(x0, t, torch.randn(200000, 1, 1, 1, generator=torch.Generator().manual_seed(0)))
    ab = float(np.cumprod(1 - make_betas("linear", 1000))[300])
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - ab, rel=1e-2)
    # exact, with zero noise and unit noise
    torch.testing.assert_close(d.q_sample(x0[:1], t[:1], torch.zeros(1, 1, 1, 1)),
                               torch.tensor(math.sqrt(ab) * 0.7).view(1, 1, 1, 1))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_gaussian_product(schedule):
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on two Gaussians, computed independently."""
    d = Diffusion(DiffusionConfig(schedule=schedule))
    b = make_betas(schedule, 1000)
    ab = np.cumprod(1 - b)
    for t in (1, 10, 500, 999):
        # prior x_{t-1} ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}); likelihood x_t ~ N(sqrt(1-b_t) x_{t-1}, b_t)
        prior_var, a = 1 - ab[t - 1], math.sqrt(1 - b[t])
        var = 1 / (1 / prior_var + a * a / b[t])
        x0, xt = 0.3, -0.8
        mean = var * (math.sqrt(ab[t - 1]) * x0 / prior_var + a * xt / b[t])
        assert float(d.posterior_variance[t]) == pytest.approx(var, rel=1e-5)
        got = d.q_posterior_mean(torch.full((1, 1, 1, 1), x0), torch.full((1, 1, 1, 1), xt), torch.tensor([t]))
        assert got.item() == pytest.approx(mean, rel=1e-4, abs=1e-6)
    assert float(d.posterior_variance[0]) == 0.0


def test_predict_x0_inverts_q_sample():
    d = Diffusion(DiffusionConfig())
    x0, eps, t = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(d.predict_x0(d.q_sample(x0, t, eps), t, eps), x0, rtol=1e-3, atol=2e-3)


class Oracle(torch.nn.Module):
    """Knows the data is a constant image c: predicts eps exactly from x_t."""

    def __init__(self, d, c):
        super().__init__()
        self.d, self.c = d, c
        self.cfg = type("C", (), {"in_channels": 1, "image_size": 28, "num_classes": 10})()

    def forward(self, x, t, y, drop=None):
        return (x - self.d._at(self.d.sqrt_ab, t) * self.c) / self.d._at(self.d.sqrt_one_minus_ab, t)

    def forward_with_cfg(self, x, t, y, scale):
        return self(x, t, y)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_reach_the_data_with_a_perfect_model(sampler):
    d = Diffusion(DiffusionConfig())
    c = 0.5
    out = d.sample(Oracle(d, c), torch.arange(3), sampler=sampler, steps=20, seed=1)
    assert out.shape == (3, 1, 28, 28)
    torch.testing.assert_close(out, torch.full_like(out, c), rtol=0, atol=1e-3)


def test_ddim_eta0_is_deterministic_and_loss_kinds():
    d = Diffusion(DiffusionConfig())
    m = Oracle(d, 0.1)
    a = d.sample(m, torch.arange(2), steps=10, seed=3)
    torch.testing.assert_close(a, d.sample(m, torch.arange(2), steps=10, seed=3))
    x0, t, eps = torch.zeros(2, 1, 28, 28), torch.tensor([5, 6]), torch.randn(2, 1, 28, 28)
    zero = lambda x, t, y, drop=None: torch.zeros_like(x)  # noqa: E731
    assert d.loss(zero, x0, None, t, eps).item() == pytest.approx(eps.pow(2).mean().item())
    l1 = Diffusion(DiffusionConfig(loss="l1"))
    assert l1.loss(zero, x0, None, t, eps).item() == pytest.approx(eps.abs().mean().item())
