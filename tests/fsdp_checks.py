"""Checks of the hand-written FSDP that need real processes. test_fsdp.py runs them as a row of the suite's 2- and
4-process jobs (dit_core.many calls main(argv) with --log-jsonl OUT); by hand:
    torchrun --standalone --nproc_per_node N tests/fsdp_checks.py OUT.json
Rank 0 writes {check: value} as one JSON line to OUT; the test asserts on it."""
import sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))     # dist_checks, also when dit_core.many loads this file

from dist_checks import CFG, backward, model, out_path, rel, report  # noqa: E402
from dit_core.parallel.dist import init_from_env  # noqa: E402
from dit_core.parallel.fsdp import FullyShardedDiT  # noqa: E402
from dit_core.parallel.fsdp_train import TorchLayout, shard_with_fsdp2  # noqa: E402


def adam(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def main(argv=None, standalone: bool = False) -> None:
    """`standalone`: this process is the whole job (torchrun ... fsdp_checks.py OUT); as a row of dit_core.many the
    job's other rows still need the process group."""
    argv = sys.argv[1:] if argv is None else list(argv)
    out = out_path(argv)
    env = init_from_env("cpu")
    r, N = env.rank, env.world_size
    c = {}

    # One step's gradients of the same model three ways (one process on the whole batch, by hand, FSDP2), compared
    # before the optimizer: AdamW's first update is about lr * sign(g), blind to a gradient wrong by a positive factor.
    single = model(1)
    for rank in range(N):              # the whole global batch, as N slices, summed: the single process
        backward(single, rank, N)
    want = {n: p.grad / N for n, p in single.named_parameters()}

    hand_model = model(1)
    psi = sum(p.numel() for p in hand_model.parameters())
    fsdp = FullyShardedDiT(hand_model)
    fsdp.timeline = []
    opt = adam(hand_model.parameters())
    backward(hand_model, r, N)
    units = fsdp.units
    hand = fsdp.full_tensors([u.shard.grad for u in units])
    opt.step()
    c["shard_params"] = [p.numel() for p in hand_model.parameters()]
    c["unit_padded"] = [u.padded for u in units]
    c["psi"] = psi
    c["traffic"] = dict(fsdp.traffic)
    c["timeline"] = [f"{what} {name}" for what, name in fsdp.timeline]
    c["peak_live_prefetch"] = fsdp.peak_live
    c["hand_grads_vs_single"] = max(rel(hand[n], g) for n, g in want.items())

    torch_model = model(1)
    shard_with_fsdp2(torch_model, init_device_mesh("cpu", (N,)), "fp32")
    backward(torch_model, r, N)
    layout = TorchLayout(torch_model)
    tgrads = layout.full([layout.local(p.grad) for p in layout.params])
    c["fsdp2_grads_vs_single"] = max(rel(tgrads[n], g) for n, g in want.items())
    c["hand_grads_vs_fsdp2"] = max(rel(hand[n], tgrads[n]) for n in want)

    # The negative control: the reduce-scattered shard not divided by N (--break average) is N times the mean.
    m_bad = model(1)
    f_bad = FullyShardedDiT(m_bad, broken="average")
    backward(m_bad, r, N)
    bad = f_bad.full_tensors([u.shard.grad for u in f_bad.units])
    c["broken_grads_vs_single"] = max(rel(bad[n], g) for n, g in want.items())
    c["broken_norm_ratio"] = (torch.stack([g.norm() for g in bad.values()]).norm()
                              / torch.stack([g.norm() for g in want.values()]).norm()).item()

    # Without prefetch: a unit is gathered only when it runs, so at most the root and one block are whole.
    m2 = model(1)
    f2 = FullyShardedDiT(m2, prefetch=False)
    f2.timeline = []
    backward(m2, r, N)
    c["peak_live_no_prefetch"] = f2.peak_live
    c["timeline_no_prefetch"] = [f"{what} {name}" for what, name in f2.timeline]
    # One unit for the whole model: the peak is the whole model, on every rank.
    m3 = model(1)
    f3 = FullyShardedDiT(m3, unit_per_block=False)
    backward(m3, r, N)
    c["peak_live_one_unit"] = f3.peak_live
    c["one_unit_padded"] = f3.root.padded

    # Accumulation: inside no_sync nothing is reduce-scattered, each unit keeps its whole flat gradient.
    m4 = model(1)
    f4 = FullyShardedDiT(m4)
    with f4.no_sync():
        backward(m4, r, N, micro=0, accum=2)
    c["no_sync_reduce_scatter"] = f4.traffic["reduce_scatter"]
    c["no_sync_shard_grads_none"] = all(p.grad is None for p in m4.parameters())
    c["no_sync_kept_elements"] = sum(u.grad_acc.numel() for u in f4.units)
    backward(m4, r, N, micro=1, accum=2)
    single2 = model(1)
    for rank in range(N):
        for micro in range(2):
            backward(single2, rank, N, micro=micro, accum=2)
    want = {n: p.grad / N for n, p in single2.named_parameters()}
    got = f4.full_tensors([u.shard.grad for u in f4.units])
    c["accumulated_grads_vs_single"] = max((got[n] - want[n]).abs().max().item() for n in want)

    # Sampling under no_grad frees every unit after its forward: nothing stays gathered.
    with torch.no_grad():
        hand_model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), torch.tensor([3, 4]))
    c["live_after_no_grad_forward"] = fsdp.live
    c["config_depth"] = CFG.model.depth
    report(c, out, r, standalone)


if __name__ == "__main__":
    main(standalone=True)
