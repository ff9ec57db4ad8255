"""Ulysses throughput, measured in one run (docs/results.md, "Ulysses on GPUs").

    torchrun --nproc_per_node 2 tools/bench_ulysses.py --image-size 56 --patch 1 --out ulysses.json

1. Training step (forward, backward, AdamW) of a DiT on synthetic images at long sequences: rank 0
   alone (one GPU), then all ranks as one sequence-parallel group. Same global batch, so the ratio
   of images/s is the speed-up of sequence parallelism.
2. Attention alone, forward + backward, identical shapes: `ulysses_attention` against DeepSpeed's
   `DistributedAttention` (if DeepSpeed is installed), the peer implementation of the same call.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.bench import sync  # noqa: E402
from dit_core.config import load_config  # noqa: E402
from dit_core.model import DiT, sdpa_attention  # noqa: E402
from dit_core.parallel.ddp import DataParallel  # noqa: E402
from dit_core.parallel.dist import exit_process, init_from_env, teardown  # noqa: E402
from dit_core.parallel.ulysses import SequenceParallelDiT, ulysses_attention  # noqa: E402


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def train_step_fn(model, batch, device, precision):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    g = torch.Generator(device=device).manual_seed(0)
    c = model.module.module.cfg if isinstance(model, DataParallel) else model.cfg
    x = torch.randn(batch, 1, c.image_size, c.image_size, generator=g, device=device)
    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    y = torch.randint(0, 10, (batch,), generator=g, device=device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x, t, y)
        out.float().square().mean().backward()
        if isinstance(model, DataParallel):
            model.finish_gradient_synchronization()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--patch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="images per step (the whole group's)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    env = init_from_env("auto")
    dev, P = env.device, env.world_size
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = load_config(None, {"model.image_size": a.image_size, "model.patch_size": a.patch,
                             "model.hidden_size": a.hidden, "model.depth": a.depth, "model.num_heads": a.heads})
    tokens = (a.image_size // a.patch) ** 2
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "world": P,
           "tokens": tokens, "args": vars(a)}

    # 1. training step: one device, then the sequence-parallel group
    if env.rank == 0:
        torch.manual_seed(0)
        one = DiT(cfg.model).to(dev)
        res["one_device_s"] = timed(train_step_fn(one, a.batch, dev, a.precision), dev, a.warmup, a.iters)
        res["one_device_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        del one
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
    dist.barrier()
    torch.manual_seed(0)
    sp = DataParallel(SequenceParallelDiT(DiT(cfg.model).to(dev), dist.group.WORLD), divisor=1)
    res["sp_s"] = timed(train_step_fn(sp, a.batch, dev, a.precision), dev, a.warmup, a.iters)
    res["sp_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    res["speedup"] = res.get("one_device_s", 0) / res["sp_s"]
    res["sp_images_per_s"] = a.batch / res["sp_s"]

    # 2. attention alone: ours against DeepSpeed's, same shapes, forward + backward
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    g = torch.Generator(device=dev).manual_seed(env.rank)
    shape = (a.batch, tokens // P, a.heads, a.hidden // a.heads)
    q, k, v = (torch.randn(shape, generator=g, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    w = torch.randn(shape, generator=g, device=dev, dtype=dtype)

    def bench(attn):
        def fb():
            (attn(q, k, v) * w).sum().backward()
        return timed(fb, dev, a.warmup, a.iters)

    res["attn_ours_s"] = bench(lambda q_, k_, v_: ulysses_attention(q_, k_, v_))
    try:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention
        deepspeed.init_distributed(dist_backend=env.backend)
        ds = DistributedAttention(sdpa_attention, dist.group.WORLD, scatter_idx=2, gather_idx=1)
        res["attn_deepspeed_s"] = bench(lambda q_, k_, v_: ds(q_, k_, v_, 0))
    except ImportError:
        res["attn_deepspeed_s"] = None
    if env.is_main:
        print(json.dumps(res, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
    teardown()
    exit_process(0)


if __name__ == "__main__":
    main()
