"""Checks of the hand-written DDP that need real processes; run by test_ddp.py as
    torchrun --standalone --nproc_per_node 2 tests/dist_checks.py OUT.json
Rank 0 writes {check: value} to OUT.json; the test asserts on it."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.batch import global_batch, shard  # noqa: E402
from dit_core.config import load_config  # noqa: E402
from dit_core.data import load_mnist  # noqa: E402
from dit_core.diffusion import Diffusion  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from dit_core.parallel.ddp import DataParallel  # noqa: E402
from dit_core.parallel.dist import exit_process, init_from_env, teardown  # noqa: E402

CFG = load_config(None, {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 7})


def model(seed):
    torch.manual_seed(seed)
    m = DiT(CFG.model)
    with torch.no_grad():  # leave adaLN-Zero: every parameter gets a non-zero gradient
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max relative difference of a to b (b all zeros: the absolute difference)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def worst(x: float, group=None) -> float:
    """The largest value of x over the ranks of `group`."""
    t = torch.tensor(float(x))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def out_path(argv: list) -> str:
    """Where a checks script writes: --log-jsonl OUT as a row of a dit_core.many job, else its first argument."""
    return argv[argv.index("--log-jsonl") + 1] if "--log-jsonl" in argv else argv[0]


def report(checks: dict, out: str, rank: int, standalone: bool) -> None:
    """Rank 0 writes the checks as one JSON line; a standalone job (torchrun ... OUT) then ends, while a row of a
    dit_core.many job leaves the process group to the job's other rows."""
    if rank == 0:
        Path(out).write_text(json.dumps(checks) + "\n")
    if standalone:
        teardown()
        exit_process(0)


def spread(x: torch.Tensor) -> float:
    """max over ranks minus min over ranks of a tensor (0 = identical everywhere)."""
    hi, lo = x.detach().clone(), x.detach().clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).abs().max().item()


def flat_grads(m):
    return torch.cat([p.grad.reshape(-1) for p in m.parameters() if p.grad is not None])


def backward(m, rank, world, step=0, micro=0, accum=1):
    data = load_mnist("train", subset=512)
    g = global_batch(0, step, 16, len(data), 1000, 0.1)
    b = shard(g, rank, world, micro, accum)
    x0, y = data.gather(b.indices)
    Diffusion(CFG.diffusion).loss(m, x0, y, b.t, b.noise, b.drop).backward()


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.frozen = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x, use_b):
        return self.b(self.a(x)) if use_b else self.a(x)


def main():
    env = init_from_env("cpu")
    rank, world = env.rank, env.world_size
    out = {}
    # 1. broadcast on wrap: ranks seeded differently end identical
    m = model(seed=100 + rank)
    before = torch.cat([p.reshape(-1) for p in m.parameters()])
    out["weights_spread_before_wrap"] = spread(before)
    hand = DataParallel(m, bucket_cap_mb=0.01, first_bucket_mb=0.01)   # tiny buckets: many, all paths exercised
    out["weights_spread_after_wrap"] = spread(torch.cat([p.reshape(-1) for p in m.parameters()]))
    out["num_buckets"] = len(hand.buckets)
    # 2. one backward: hand-written == torch DDP == naive
    backward(hand, rank, world)
    hand.finish_gradient_synchronization()
    ref = nn.parallel.DistributedDataParallel(model(seed=100))
    backward(ref, rank, world)
    naive = DataParallel(model(seed=100), overlap=False)
    backward(naive, rank, world)
    naive.finish_gradient_synchronization()
    gh, gt, gn = flat_grads(hand.module), flat_grads(ref.module), flat_grads(naive.module)
    out["hand_vs_torch_max_abs"] = (gh - gt).abs().max().item()
    out["naive_vs_torch_max_abs"] = (gn - gt).abs().max().item()
    out["grad_norm"] = gt.norm().item()
    out["grads_spread_after_sync"] = spread(gh)
    # 3. negative check: inside no_sync nothing is communicated, so the ranks' gradients differ
    m2 = DataParallel(model(seed=100))
    with m2.no_sync():
        backward(m2, rank, world, micro=0, accum=2)
    out["grads_spread_inside_no_sync"] = spread(flat_grads(m2.module))
    backward(m2, rank, world, micro=1, accum=2)      # the last micro-step syncs the accumulated sum
    m2.finish_gradient_synchronization()
    out["grads_spread_after_accumulation"] = spread(flat_grads(m2.module))
    # 4. unused and frozen parameters must not hang the step
    for name, use_b in (("unused_everywhere", False), ("unused_on_rank1", rank == 0)):
        torch.manual_seed(0)
        br = DataParallel(Branchy(), bucket_cap_mb=1e-5, first_bucket_mb=1e-5)   # one parameter per bucket
        br(torch.ones(2, 4), use_b).sum().backward()
        br.finish_gradient_synchronization()
        out[f"{name}_b_grad"] = br.module.b.weight.grad.abs().sum().item()
        out[f"{name}_frozen_grad_is_none"] = br.module.frozen.weight.grad is None
        out[f"{name}_spread"] = spread(flat_grads(br.module))
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
    teardown()
    exit_process(0)


if __name__ == "__main__":
    main()
