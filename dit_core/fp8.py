"""Float8 matmuls for training: a linear layer whose three matrix multiplications run on float8 tensor cores.

An H100's tensor cores multiply float8 (8-bit floating point) matrices at twice their bfloat16 rate (1979 against
989 dense TFLOP/s on NVIDIA's data sheet). Eight bits hold little, so each tensor is first scaled to use the format's
whole range ("per-tensor dynamic scaling"): scale = largest finite float8 / max |x|, x8 = float8(x * scale), and the
matmul multiplies the result by 1/scale of each operand. Two float8 formats share the work:

    e4m3 (4 exponent bits, 3 mantissa bits, largest 448)      inputs and weights: more precision
    e5m2 (5 exponent bits, 2 mantissa bits, largest 57344)     output gradients: more range

One linear layer y = x W^T + b does three matmuls per step, each with float8 operands and a bf16 (or fp32) result:

    forward         y  = x8  @ W8^T       (e4m3 x e4m3)
    input gradient  dx = g8  @ W8         (e5m2 x e4m3)
    weight gradient dW = g8^T @ x8        (e5m2 x e4m3, accumulated in fp32 for the fp32 weight)

torch._scaled_mm wants its first operand row-major and its second column-major, so backward makes transposed copies
of the float8 tensors (memory-bound kernels that torch.compile fuses with the casts). Forward keeps x8, not x, for
the weight gradient: half the bytes of bf16's saved input. The bias is added by the matmul's epilogue; its gradient is
g summed over the rows. The ideas are those of NVIDIA's Transformer Engine and torchao's float8 training (per-tensor
"tensorwise" scaling); the code is this project's own.

`use_fp8(model)` switches the big linear layers of every DiT block (qkv, proj, fc1, fc2) in place: same parameters,
same state_dict, only the matmul changes. The adaLN modulation (a few rows per step), the patch embedding and the
final layer stay in bf16. Used by `dit_core.bench_model`'s ladder; a test checks the gradients against bf16's on the
CPU, where torch._scaled_mm also runs (slowly).
"""
from __future__ import annotations

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x in float8 scaled to the format's range, and the inverse scale that undoes it (fp32 scalar)."""
    top = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    x8 = (x.float() * scale).clamp(-top, top).to(dtype)
    return x8, scale.reciprocal()


def col_major(x8: torch.Tensor) -> torch.Tensor:
    """The same (rows, cols) matrix stored column by column (what _scaled_mm wants of its second operand)."""
    return x8.t().contiguous().t()


class _Float8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        x8, sx = quantize(x, E4M3)
        w8, sw = quantize(weight, E4M3)
        # the bias rides in the matmul's epilogue for a bf16/fp16 result; CUDA's float8 matmul takes only a bf16
        # bias for an fp32 result, so there it is added afterwards at full precision
        fused = bias is not None and out_dtype != torch.float32
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype,
                             bias=bias.to(out_dtype) if fused else None)
        if bias is not None and not fused:
            y = y + bias
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x8, sx, w8, sw = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g8, sg = quantize(g, E5M2)
        dx = torch._scaled_mm(g8, col_major(w8), scale_a=sg, scale_b=sw, out_dtype=g.dtype)
        dw = torch._scaled_mm(g8.t().contiguous(), col_major(x8), scale_a=sg, scale_b=sx,
                              out_dtype=torch.float32 if w_dtype == torch.float32 else g.dtype)
        db = None if b_dtype is None else g.float().sum(0).to(b_dtype)
        return dx.to(x_dtype), dw.to(w_dtype), db, None


class Float8Linear(nn.Linear):
    """nn.Linear whose matmuls run in float8 (see the module's docstring). Rows and features must be multiples of 16,
    as the float8 tensor cores require (DiT-XL/2: 1152, 3456, 4608 features; batch x 256 rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"Float8Linear cannot return {out_dtype}; run it in fp32 or under bf16 autocast")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] % 16 or self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"Float8Linear needs rows and features that are multiples of 16, got {x2.shape[0]} rows "
                             f"and {self.in_features} -> {self.out_features} features; keep this layer in bf16")
        y = _Float8Linear.apply(x2, self.weight, self.bias, out_dtype)
        return y.reshape(*lead, self.out_features)


BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def use_fp8(model: nn.Module, names: tuple[str, ...] = BLOCK_LINEARS) -> int:
    """Switch the named linear layers of every block of a DiT to Float8Linear in place; returns how many."""
    n = 0
    for blk in model.blocks:
        for name in names:
            lin = blk.get_submodule(name)
            if type(lin) is not nn.Linear:
                raise ValueError(f"use_fp8: block layer {name} is a {type(lin).__name__}, not nn.Linear; "
                                 f"leave it out of names")
            lin.__class__ = Float8Linear
            n += 1
    return n
