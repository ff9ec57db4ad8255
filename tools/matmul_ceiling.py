"""The ceiling of a DiT block's matmuls on this GPU: TFLOP/s of each of its linear layers' three matmuls (forward,
input gradient, weight gradient) at the model's shapes, in bf16 (torch.matmul) and in float8 (torch._scaled_mm, per-
tensor scales, as dit_core.fp8 runs them), casts not included.

    python tools/matmul_ceiling.py --config configs/dit_xl2.yaml --batch 128 [--json OUT]

What it tells: how fast a step made only of these matmuls could go, the bound that the ladder's FP8 row is read
against. GPU only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dit_core.config import load_config  # noqa: E402


def bench(fn, iters: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/dit_xl2.yaml")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("matmul_ceiling: no CUDA device here; run it on a GPU machine")
        return 2
    m = load_config(a.config, {}).model
    h, S = m.hidden_size, (m.image_size // m.patch_size) ** 2
    M = a.batch * S
    f = int(h * m.mlp_ratio)
    layers = {"qkv": (h, 3 * h), "proj": (h, h), "fc1": (h, f), "fc2": (f, h)}
    dev, bf, e4, e5 = "cuda", torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2
    one = torch.ones((), device=dev)
    rows, total = [], {"bf16": 0.0, "fp8": 0.0, "flops": 0.0}
    for name, (K, N) in layers.items():
        x, w, g = (torch.randn(M, K, device=dev, dtype=bf), torch.randn(N, K, device=dev, dtype=bf),
                   torch.randn(M, N, device=dev, dtype=bf))
        x8, w8, g8 = x.to(e4), w.to(e4), g.to(e5)
        w8c, x8c, g8t = w8.t().contiguous().t(), x8.t().contiguous().t(), g8.t().contiguous()
        cases = {"forward": (lambda: x @ w.t(),
                             lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=bf)),
                 "input grad": (lambda: g @ w,
                                lambda: torch._scaled_mm(g8, w8c, scale_a=one, scale_b=one, out_dtype=bf)),
                 "weight grad": (lambda: g.t() @ x,
                                 lambda: torch._scaled_mm(g8t, x8c, scale_a=one, scale_b=one,
                                                          out_dtype=torch.float32))}
        for which, (f_bf, f_8) in cases.items():
            flops = 2 * M * K * N
            t_bf, t_8 = bench(f_bf), bench(f_8)
            rows.append({"layer": name, "matmul": which, "M": M, "K": K, "N": N, "bf16_tflops": flops / t_bf / 1e12,
                         "fp8_tflops": flops / t_8 / 1e12, "bf16_ms": 1000 * t_bf, "fp8_ms": 1000 * t_8})
            total["bf16"] += t_bf
            total["fp8"] += t_8
            total["flops"] += flops
            print(f"{name:5} {which:12} M={M} K={K} N={N}  bf16 {rows[-1]['bf16_tflops']:6.0f}  "
                  f"fp8 {rows[-1]['fp8_tflops']:6.0f} TFLOP/s", flush=True)
    per_block = {"bf16_ms": 1000 * total["bf16"], "fp8_ms": 1000 * total["fp8"],
                 "bf16_tflops": total["flops"] / total["bf16"] / 1e12, "fp8_tflops": total["flops"] / total["fp8"] / 1e12}
    print(f"one block's 12 matmuls: bf16 {per_block['bf16_ms']:.2f} ms ({per_block['bf16_tflops']:.0f} TFLOP/s), "
          f"fp8 {per_block['fp8_ms']:.2f} ms ({per_block['fp8_tflops']:.0f} TFLOP/s); x{m.depth} blocks: "
          f"{m.depth * per_block['bf16_ms']:.1f} / {m.depth * per_block['fp8_ms']:.1f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                            "batch": a.batch, "rows": rows, "per_block": per_block}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
