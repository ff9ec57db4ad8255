"""Throughput of data-parallel training steps, and the all-reduce bandwidth, on GPUs.

    torchrun --nproc_per_node 2 tools/bench_ddp.py --config configs/mnist.yaml --impl hand --per-gpu-batch 256
    torchrun --nproc_per_node 2 tools/bench_ddp.py --allreduce-mb 256

One fixed batch lives on each GPU (no data pipeline, no loss read back), so the time is the training step itself:
forward, backward with its gradient communication, clipping and the fused AdamW step. Rank 0 prints one JSON line.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dit_core.batch import global_batch, shard  # noqa: E402
from dit_core.bench import sync  # noqa: E402
from dit_core.config import load_config  # noqa: E402
from dit_core.diffusion import Diffusion  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from dit_core.parallel.ddp import DDPStrategy  # noqa: E402
from dit_core.parallel.dist import exit_process, init_from_env, teardown  # noqa: E402
from dit_core.train import autocast_ctx  # noqa: E402


def bench_allreduce(env, mb: float, iters: int = 20) -> dict:
    x = torch.ones(int(mb * 2 ** 20) // 4, device=env.device)
    for _ in range(5):
        dist.all_reduce(x)
    sync(env.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    sync(env.device)
    dt = (time.perf_counter() - t0) / iters
    n = env.world_size
    # bus bandwidth (nccl-tests' convention): the bytes each rank sends over its link in a ring all-reduce
    return {"allreduce_mb": mb, "time_ms": dt * 1e3, "algbw_GBps": x.numel() * 4 / dt / 1e9,
            "busbw_GBps": x.numel() * 4 * 2 * (n - 1) / n / dt / 1e9, "world_size": n}


def bench_train(env, args) -> dict:
    cfg = load_config(args.config, {"train.precision": args.precision})
    torch.manual_seed(0)
    model = DiT(cfg.model).to(env.device)
    strategy = DDPStrategy(env, args.impl) if args.impl != "none" else None   # none: one GPU, no wrapper
    wrapped = strategy.wrap(model) if strategy else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=env.device.type == "cuda")
    diffusion = Diffusion(cfg.diffusion, env.device)
    G = args.per_gpu_batch * env.world_size
    b = shard(global_batch(0, 0, G, 60000, 1000, 0.1), env.rank, env.world_size).to(env.device)
    x0 = torch.rand(len(b), 1, 28, 28, device=env.device) * 2 - 1
    y = torch.randint(0, 10, (len(b),), device=env.device)

    def step():
        with autocast_ctx(cfg.train.precision, env.device):
            loss = diffusion.loss(wrapped, x0, y, b.t, b.noise, b.drop)
        loss.backward()
        if strategy:
            strategy.finish_gradient_sync(wrapped)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(env.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(env.device)
    dt = (time.perf_counter() - t0) / args.steps
    return {"config": args.config, "impl": args.impl, "world_size": env.world_size, "precision": args.precision,
            "per_gpu_batch": args.per_gpu_batch, "step_ms": dt * 1e3, "images_per_s": G / dt,
            "params": sum(p.numel() for p in model.parameters()),
            "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/mnist.yaml")
    p.add_argument("--impl", default="torch", choices=("none", "hand", "torch", "naive"))
    p.add_argument("--precision", default="bf16")
    p.add_argument("--per-gpu-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--allreduce-mb", type=float, default=0, help="measure all-reduce bandwidth instead")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    env = init_from_env(args.device)
    out = bench_allreduce(env, args.allreduce_mb) if args.allreduce_mb else bench_train(env, args)
    if env.is_main:
        print(json.dumps(out), flush=True)
    teardown()
    exit_process(0)


if __name__ == "__main__":
    main()
