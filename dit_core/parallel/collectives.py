"""The five collectives, run for real between spawned processes (gloo, CPU).

Chapter 05 calls `run_all(world_size)`: N processes start, each holds a small
tensor that tells which rank made it, every collective runs, and each rank
reports what it held before and after. The functions live here (not in the
notebook) so that `torch.multiprocessing.spawn` can pickle them.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..scratch import scratch_dir
from .dist import exit_process, free_port

COLLECTIVES = ("broadcast", "all_reduce", "reduce_scatter", "all_gather", "all_to_all")


# all_gather_single / reduce_scatter_single are the newer names (torch >= 2.14) of all_gather_into_tensor /
# reduce_scatter_tensor: the one this torch has, newer first, looked up at each call (so that a counter that
# wraps torch.distributed's functions, dit_core.parallel.measure.CommCounter, sees every call).
def all_gather_flat(out, x, **kw):
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, **kw)


def reduce_scatter_flat(out, x, **kw):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, **kw)


def rank_tensor(rank: int, world: int) -> torch.Tensor:
    """Rank r holds [10r, 10r+1, ..., 10r+N-1]: the tens digit names the owner, the units the slot."""
    return torch.arange(world, dtype=torch.float32) + 10 * rank


def _collective(name: str, x: torch.Tensor, world: int) -> torch.Tensor:
    if name == "broadcast":            # rank 0's tensor, everywhere
        out = x.clone()
        dist.broadcast(out, src=0)
    elif name == "all_reduce":         # the element-wise sum, everywhere
        out = x.clone()
        dist.all_reduce(out)
    elif name == "reduce_scatter":     # the sum, cut into N pieces: rank r keeps piece r
        out = torch.empty(x.numel() // world)
        reduce_scatter_flat(out, x)
    elif name == "all_gather":         # every rank's tensor, concatenated, everywhere
        out = torch.empty(x.numel() * world)
        all_gather_flat(out, x)
    elif name == "all_to_all":         # piece j of rank i goes to rank j, as its piece i (a transpose)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x)
    else:
        raise ValueError(f"unknown collective {name!r}; one of {', '.join(COLLECTIVES)}")
    return out


def ring_all_reduce(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-reduce written with point-to-point messages around a ring; returns (sum, bytes this rank sent).

    Phase 1 (reduce-scatter, N-1 steps): each rank passes one chunk to its right neighbour, which adds it to
    its own; after N-1 steps rank r holds the full sum of chunk r+1. Phase 2 (all-gather, N-1 steps): the
    finished chunks travel round the ring once more. Each step sends 1/N of the data: 2(N-1)/N in all.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = list(x.clone().chunk(n))
    right, left = (rank + 1) % n, (rank - 1) % n
    sent = 0
    for phase in ("reduce", "gather"):
        for step in range(n - 1):
            if phase == "reduce":
                send_i, recv_i = (rank - step) % n, (rank - step - 1) % n
            else:
                send_i, recv_i = (rank + 1 - step) % n, (rank - step) % n
            buf = torch.empty_like(chunks[recv_i])
            reqs = [dist.isend(chunks[send_i].contiguous(), right), dist.irecv(buf, left)]
            for q in reqs:
                q.wait()
            sent += chunks[send_i].numel() * chunks[send_i].element_size()
            chunks[recv_i] = chunks[recv_i] + buf if phase == "reduce" else buf
    return torch.cat(chunks), sent


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = rank_tensor(rank, world)
    res = {name: _collective(name, x, world).tolist() for name in COLLECTIVES}
    res["before"] = x.tolist()
    big = torch.randn(world * 1024, generator=torch.Generator().manual_seed(rank))
    ring, sent = ring_all_reduce(big)
    ref = big.clone()
    dist.all_reduce(ref)
    res["ring"] = {"max_abs_diff_vs_all_reduce": (ring - ref).abs().max().item(), "bytes_sent": sent,
                   "tensor_bytes": big.numel() * big.element_size()}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    exit_process(0)


def run_all(world_size: int = 4) -> dict[int, dict]:
    """Spawn world_size processes; return {rank: {"before": [...], collective: [...]}}."""
    outdir = str(scratch_dir("dit-collectives-"))
    mp.spawn(_worker, args=(world_size, free_port(), outdir), nprocs=world_size, join=True)
    return {r: json.load(open(os.path.join(outdir, f"rank{r}.json"))) for r in range(world_size)}


def expected(name: str, world: int) -> dict[int, list]:
    """What each rank must hold after `name`, computed on one process from the definition."""
    xs = [rank_tensor(r, world) for r in range(world)]
    total = torch.stack(xs).sum(0)
    if name == "broadcast":
        return {r: xs[0].tolist() for r in range(world)}
    if name == "all_reduce":
        return {r: total.tolist() for r in range(world)}
    if name == "reduce_scatter":
        return {r: total.chunk(world)[r].tolist() for r in range(world)}
    if name == "all_gather":
        return {r: torch.cat(xs).tolist() for r in range(world)}
    if name == "all_to_all":
        return {r: [xs[i][r].item() for i in range(world)] for r in range(world)}
    raise ValueError(name)


def bytes_sent_per_rank(name: str, size_bytes: float, world: int) -> float:
    """Bytes each rank sends with the bandwidth-optimal (ring) algorithm, for a tensor of size_bytes
    (for all-gather: the size of the *gathered* result; for reduce-scatter: of the input)."""
    n = world
    return {"broadcast": size_bytes * (n - 1) / n,     # pipelined/scatter+gather: ~ S per rank
            "all_reduce": 2 * size_bytes * (n - 1) / n,  # reduce-scatter + all-gather
            "reduce_scatter": size_bytes * (n - 1) / n,
            "all_gather": size_bytes * (n - 1) / n,
            "all_to_all": size_bytes * (n - 1) / n}[name]
