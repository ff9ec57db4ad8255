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


# ---------------------------------------------------------------- objectives: eps, v, x0, flow; min-SNR weighting

def _obj(objective="eps", **kw):
    return Diffusion(DiffusionConfig(objective=objective, **kw))


def test_targets_closed_form():
    x0, eps, t = torch.rand(3, 1, 28, 28) * 2 - 1, torch.randn(3, 1, 28, 28), torch.tensor([0, 400, 999])
    ab = torch.tensor(np.cumprod(1 - make_betas("linear", 1000))[[0, 400, 999]], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(_obj("eps").target(x0, t, eps), eps)
    torch.testing.assert_close(_obj("x0").target(x0, t, eps), x0)
    torch.testing.assert_close(_obj("v").target(x0, t, eps), ab.sqrt() * eps - (1 - ab).sqrt() * x0)
    flow = _obj("flow")
    s = ((t + 0.5) / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(flow.q_sample(x0, t, eps), (1 - s) * x0 + s * eps)
    torch.testing.assert_close(flow.target(x0, t, eps), eps - x0)
    ln = _obj("flow", flow_time="logit_normal")
    assert ln.flow_s[499].item() == pytest.approx(1 / (1 + math.exp(-math.sqrt(2) * 0.0)), abs=2e-3)  # u near 1/2
    assert torch.all(ln.flow_s[1:] > ln.flow_s[:-1])
    assert ln.flow_s[0].item() == pytest.approx(1 / (1 + math.exp(3.2905267)), rel=1e-5)   # Phi^-1(0.0005) = -3.29
    for d in (flow, ln):                                  # the network's time input inverts t -> s
        torch.testing.assert_close(d.flow_model_time(d.flow_s[t]), t.float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_split_recovers_x0_and_eps_from_the_target(objective):
    d = _obj(objective)
    x0, eps, t = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 990])
    got_x0, got_eps = d.split(d.q_sample(x0, t, eps), t, d.target(x0, t, eps))
    torch.testing.assert_close(got_eps, eps, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(got_x0, x0, rtol=1e-3, atol=2e-3)


def test_default_objective_is_the_original_bit_for_bit_and_min_snr_weights():
    pred, x0, eps = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    t = torch.tensor([0, 100, 500, 999])
    assert torch.equal(_obj("eps").error(pred, x0, t, eps), torch.nn.functional.mse_loss(pred, eps))
    ab = np.cumprod(1 - make_betas("linear", 1000))[[0, 100, 500, 999]]
    snr = ab / (1 - ab)
    per = ((pred - eps) ** 2).flatten(1).mean(1).double().numpy()
    for objective, w in (("eps", np.minimum(snr, 5) / snr), ("v", np.minimum(snr, 5) / (snr + 1)), ("x0", np.minimum(snr, 5))):
        d = _obj(objective, weighting="min_snr", snr_gamma=5.0)
        target = d.target(x0, t, eps)
        per = ((pred - target) ** 2).flatten(1).mean(1).double().numpy()
        assert d.error(pred, x0, t, eps).item() == pytest.approx(float((w * per).mean()), rel=1e-5)
    assert w[-1] == pytest.approx(snr[-1]) and w[0] == 5.0      # x0: low-noise steps capped at gamma


class FlowOracle(torch.nn.Module):
    """Data is the constant image c: the exact velocity eps - c from x_s (straight paths)."""

    def __init__(self, d, c):
        super().__init__()
        self.d, self.c = d, c
        self.cfg = type("C", (), {"in_channels": 1, "image_size": 28, "num_classes": 10})()
        self.calls = 0

    def forward_with_cfg(self, x, t, y, scale):
        self.calls += 1
        u = (t.float() + 0.5) / self.d.T
        s = (u if self.d.cfg.flow_time == "uniform" else torch.sigmoid(torch.special.ndtri(u))).view(-1, 1, 1, 1)
        return (x - (1 - s) * self.c) / s - self.c


@pytest.mark.parametrize("sampler, flow_time", [("euler", "uniform"), ("heun", "logit_normal")])
def test_flow_samplers_reach_the_data_with_a_perfect_model(sampler, flow_time):
    d = _obj("flow", flow_time=flow_time)
    m = FlowOracle(d, 0.5)
    out = d.sample(m, torch.arange(3), sampler=sampler, steps=4, seed=1)
    torch.testing.assert_close(out, torch.full_like(out, 0.5), rtol=0, atol=1e-4)
    assert m.calls == (4 if sampler == "euler" else 2 * 4 - 1)   # Heun: two slopes per step, Euler's last step


def test_flow_euler_first_step_and_heun_order():
    d = _obj("flow")

    class Lin(torch.nn.Module):                          # v(x) = x: dx/ds = x, exact x(0) = x(1) / e
        cfg = type("C", (), {"in_channels": 1, "image_size": 28, "num_classes": 10})()

        def forward_with_cfg(self, x, t, y, scale):
            return x

    x1 = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    one = d.sample(Lin(), torch.arange(1), sampler="euler", steps=1, seed=2)
    torch.testing.assert_close(one, (x1 - x1).clamp(-1, 1))      # one Euler step: x + (0 - 1) * v = 0
    exact = x1 / math.e
    err = {s: (d.sample(Lin(), torch.arange(1), sampler=s, steps=8, seed=2) - exact.clamp(-1, 1)).abs().max().item()
           for s in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 3


def test_objective_and_sampler_must_agree_in_one_sentence():
    from dit_core.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="sample.sampler=ddim does not sample diffusion.objective=flow; use euler"):
        load_config(None, {"diffusion.objective": "flow"})
    with pytest.raises(ConfigError, match="euler and heun need objective flow"):
        load_config(None, {"sample.sampler": "heun"})
    with pytest.raises(ConfigError, match="weighting=min_snr is defined through the SNR"):
        load_config(None, {"diffusion.objective": "flow", "sample.sampler": "euler", "diffusion.weighting": "min_snr"})
    assert load_config(None, {"diffusion.objective": "flow", "sample.sampler": "heun"}).diffusion.objective == "flow"


@pytest.mark.parametrize("over", [{"diffusion.objective": "v", "diffusion.weighting": "min_snr"},
                                  {"diffusion.objective": "x0"},
                                  {"diffusion.objective": "flow", "sample.sampler": "euler",
                                   "diffusion.flow_time": "logit_normal"}])
def test_every_objective_trains_and_samples(tmp_path, over):
    from dit_core.config import load_config
    from dit_core.train import train
    cfg = load_config("configs/tiny.yaml", {**over, "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2,
                                            "train.max_steps": 3, "train.global_batch_size": 8, "run.device": "cpu",
                                            "train.train_subset": 64, "train.tensorboard": False,
                                            "run.results_dir": str(tmp_path)})
    res = train(cfg, quiet=True)
    assert len(res.losses) == 3 and all(math.isfinite(v) for v in res.losses)
    d = Diffusion(cfg.diffusion)
    out = d.sample(res.model.eval(), torch.arange(2), sampler=cfg.sample.sampler, steps=3, seed=0)
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()
