"""Float8 linear layers (dit_core.fp8): the three matmuls against fp32's, the scaling that makes float8 usable, and
the checks on what the tensor cores cannot take. torch._scaled_mm runs on the CPU too, so this needs no GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dit_core.config import load_config
from dit_core.fp8 import E4M3, E5M2, Float8Linear, quantize, use_fp8
from dit_core.model import DiT

TINY = {"model.depth": 2, "model.hidden_size": 64, "model.num_heads": 4, "model.image_size": 8,
        "model.num_classes": 10}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def grads_of(lin: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    lin.zero_grad()
    y = lin(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).square().mean().backward()
    return y.detach(), x.grad, lin.weight.grad.clone(), lin.bias.grad.clone()


def test_quantize_uses_the_whole_range_and_rounds_to_3_mantissa_bits():
    torch.manual_seed(0)
    x = torch.randn(256, 64) * 1e-3            # far below float8's smallest normal number without scaling
    x8, inv = quantize(x, E4M3)
    assert x8.dtype == E4M3 and x8.float().abs().max().item() == 448.0    # the largest value lands on the top
    back = x8.float() * inv
    normal = x8.float().abs() >= 2 ** -6                # e4m3's normal range (below it: subnormals, fewer bits)
    assert normal.float().mean() > 0.99
    err = ((back - x) / x).abs()[normal]
    assert err.max().item() <= 2 ** -4 + 1e-6          # round to nearest with 3 mantissa bits: half of 2^-3
    assert err.mean().item() > 1e-3                     # and float8 did happen
    # without the scale the same tensor mostly rounds to zero or subnormals: the scale is what makes float8 usable
    assert (x.to(E4M3).float() - x).abs().max() / x.abs().max() > 0.1
    g8, _ = quantize(torch.randn(64, 64) * 1e4, E5M2)
    assert g8.float().abs().max().item() == 57344.0


def test_float8_linear_matches_fp32_within_float8_precision():
    torch.manual_seed(0)
    ref = nn.Linear(64, 96)
    f8 = nn.Linear(64, 96)
    f8.load_state_dict(ref.state_dict())
    f8.__class__ = Float8Linear
    x = torch.randn(4, 32, 64)
    want, got = grads_of(ref, x), grads_of(f8, x)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # e4m3 x e4m3 forward, e5m2 gradients: a few percent, and not bf16's 0.4% (float8 really ran)
        assert 1e-3 < rel(a, b) < 0.08, (name, rel(a, b))
    # the bias gradient is a plain sum of g, no float8 in it: with a loss whose g does not depend on y, exact
    c = torch.randn(4, 32, 96)
    for lin in (ref, f8):
        lin.zero_grad()
        (lin(x) * c).sum().backward()
    assert rel(f8.bias.grad, ref.bias.grad) < 1e-6
    # negative control: drop the weight's inverse scale and the check above fails by orders of magnitude
    x8, sx = quantize(x.reshape(-1, 64), E4M3)
    w8, _ = quantize(f8.weight, E4M3)
    wrong = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=torch.ones(()), out_dtype=torch.float32) + f8.bias
    assert rel(wrong.reshape(4, 32, 96), want[0]) > 10


def test_float8_linear_returns_bf16_under_autocast_and_fp32_gradients_for_fp32_weights():
    lin = nn.Linear(64, 64)
    lin.__class__ = Float8Linear
    x = torch.randn(32, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_use_fp8_switches_the_block_layers_and_keeps_the_state_dict():
    cfg = load_config("configs/dit_xl2.yaml", TINY)
    torch.manual_seed(0)
    model = DiT(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fp8(model) == 4 * cfg.model.depth
    assert all(isinstance(b.mlp.fc1, Float8Linear) and isinstance(b.attn.qkv, Float8Linear) for b in model.blocks)
    assert type(model.blocks[0].adaLN_modulation[-1]) is nn.Linear          # a few rows a step: stays bf16
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="not nn.Linear"):
        use_fp8(model)                                                       # already switched


def test_float8_linear_names_a_shape_the_tensor_cores_cannot_take():
    lin = nn.Linear(64, 64)
    lin.__class__ = Float8Linear
    with pytest.raises(ValueError, match="multiples of 16, got 10 rows"):
        lin(torch.randn(10, 64))


def test_matmul_ceiling_says_it_needs_a_gpu(capsys, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("matmul_ceiling", "tools/matmul_ceiling.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tool.main([]) == 2
    assert "no CUDA device here" in capsys.readouterr().out
