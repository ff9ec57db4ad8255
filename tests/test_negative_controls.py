"""Negative controls: a parity check that cannot fail proves nothing.

For every strategy, one teaching bug (the launcher's `--break`) makes the gradient wrong by a constant factor, the
kind of slip a real implementation makes (a sum never divided by N, a divisor of the wrong group, an accumulation
count divided twice). Each runs as real processes (torchrun, gloo, CPU) in the suite's jobs and is compared with the
single process by `dit_core.parity.parity`, the comparison every parity test uses. It must FAIL, on the gradient
norm, by the factor the bug predicts.

Where the factor scales the whole gradient, the loss alone cannot see it: clipping acts at every step of these runs
(norms ~0.17 > 0.05), so the update has the same direction and length whatever the factor, and AdamW divides a
constant factor out of its update anyway. Those controls also assert that the loss stays within the tolerance:
"the loss alone cannot see it", measured. (Where only the experts' gradients are scaled, the update's direction changes and
the loss notices too, here about as much as the norm.)
"""
import pytest

from conftest import declare, job_dir, parity_flags
from dit_core.parity import SUM_ORDER, parity

D = job_dir() / "controls"
MOE = {"model.num_experts": 4, "model.top_k": 2, "model.mlp_ratio": 2.0}
# name: (processes, launcher, flags, accumulation, reference overrides, B/A of the gradient norm or None (not uniform))
CONTROLS = {
    "ddp hand, no / N": (2, "launchers/ddp.py", ["--impl", "hand", "--break", "average"], 1, {}, 2.0),
    "zero-2, / accum twice": (2, "launchers/zero.py", ["--stage", "2", "--break", "accum-twice"], 2, {}, 0.5),
    "fsdp hand, no / N": (2, "launchers/fsdp.py", ["--impl", "hand", "--break", "average"], 1, {}, 2.0),
    "pipeline, no / M": (2, "launchers/pipeline.py", ["--pp-degree", "2", "--schedule", "1f1b", "--microbatches", "4",
                                                      "--break", "sum-microbatches"], 1, {}, 4.0),
    "tensor, / world size": (2, "launchers/tp.py", ["--tp-degree", "2", "--break", "world-average"], 1, {}, 0.5),
    "ulysses, per-rank mean": (2, "launchers/ulysses.py", ["--sp-degree", "2", "--break", "loss-norm"], 1, {}, 2.0),
    "context, cp averaged": (2, "launchers/context.py", ["--cp-degree", "2", "--break", "cp-average"], 1, {}, 0.5),
    "expert, experts / dp": (2, "launchers/moe.py", ["--ep-degree", "2", "--break", "expert-average"], 1, MOE, None),
    "n-d pp2 cp2 tp2, cp averaged": (8, "launchers/nd.py", ["--pp", "2", "--cp", "2", "--tp", "2",
                                                            "--break", "cp-average"], 1, {}, 0.5),
}
for name, (n, script, flags, accum, over, _) in CONTROLS.items():
    declare(n, f"control {name}", script, parity_flags(**over, **{"train.grad_accum": accum}) + flags +
            ["--results-dir", D / name.replace(" ", "_").replace(",", "").replace("/", "")])


@pytest.mark.parametrize("name", list(CONTROLS))
def test_the_gradient_norm_catches_a_constant_factor(jobs, reference, name):
    n, _, _, accum, over, factor = CONTROLS[name]
    log = jobs(n)[f"control {name}"]
    assert isinstance(log, list), log                     # it trained (a sentence would mean it refused)
    v = parity(reference(accum, **over)[0], log, SUM_ORDER)
    assert not v.ok and "grad_norm" in v.failed, str(v)
    lo, hi = v.norm_ratio
    if factor is None:
        # only the experts' share of the gradient doubles (ep = 2). adaLN-Zero's gates start at zero, so that share is
        # nil at step 0 and small after; once the update's direction has changed the runs part and the ratio wanders
        # (0.988 to 1.011 over chapter 15's 30 steps). What must hold: the norm leaves the tolerance no later than the
        # loss, and there the broken run's norm is the larger.
        first = {k: next(r for r in v.rows[k] if not r["rel"] <= SUM_ORDER) for k in ("loss", "grad_norm")
                 if k in v.failed}
        assert first["grad_norm"]["step"] <= first.get("loss", {"step": 10 ** 9})["step"], str(v)
        assert first["grad_norm"]["b"] > first["grad_norm"]["a"] and hi < 2, str(v)
    else:
        assert abs(lo / factor - 1) < 1e-4 and abs(hi / factor - 1) < 1e-4, str(v)
        assert v.failed == ("grad_norm",), str(v)         # the loss alone cannot see it


def test_the_verdict_itself():
    """Equal losses and 2x gradient norms FAIL; a missing step FAILs; NaN FAILs; equal logs PASS."""
    a = [{"step": s, "loss": 1 / (s + 1), "grad_norm": 0.2 + s} for s in range(5)]
    twice = [dict(r, grad_norm=2 * r["grad_norm"]) for r in a]
    assert parity(a, a, 0.0).ok
    v = parity(a, twice, SUM_ORDER)
    assert v.failed == ("grad_norm",) and v.loss == 0 and v.norm_ratio == (2.0, 2.0) and "FAIL" in str(v)
    assert parity(a, a[:4], SUM_ORDER).failed == ("steps",)
    nan = [dict(r) for r in a]
    nan[3]["loss"] = float("nan")
    assert parity(a, nan, SUM_ORDER).failed == ("loss",)
    assert "steps" in parity(a, [], SUM_ORDER).failed

