"""Checks of Ulysses attention that need real processes; run by test_ulysses.py as
    torchrun --standalone --nproc_per_node 2 tests/ulysses_checks.py OUT.json
Every rank builds the same full q, k, v (same seed), keeps its slice of the sequence, and compares
with full attention computed locally. Rank 0 writes {check: value} to OUT.json."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.config import load_config  # noqa: E402
from dit_core.diffusion import Diffusion  # noqa: E402
from dit_core.model import DiT, sdpa_attention  # noqa: E402
from dit_core.parallel.dist import exit_process, init_from_env, teardown  # noqa: E402
from dit_core.parallel.ulysses import SequenceParallelDiT, token_slice, ulysses_attention, ulysses_elements  # noqa: E402
from dit_core.parallel.measure import CommCounter  # noqa: E402


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def attention_vs_full(attn, rank, P, B=3, N=16, H=4, D=8):
    """Output and q/k/v gradients of `attn` on this rank's slice, relative to full attention."""
    g = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(B, N, H, D, generator=g) for _ in range(4))   # w: a random upstream gradient
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    out_full = sdpa_attention(*full)
    (out_full * w).sum().backward()
    s = token_slice(N, rank, P)
    local = [x[:, s].clone().requires_grad_() for x in (q, k, v)]
    out = attn(*local)
    (out * w[:, s]).sum().backward()
    res = {"shape_ok": tuple(out.shape) == (B, N // P, H, D), "out": rel(out, out_full[:, s])}
    for name, a, b in zip("qkv", local, full):
        res[f"grad_{name}"] = rel(a.grad, b.grad[:, s])
    worst = torch.tensor(max(v for k_, v in res.items() if k_ != "shape_ok"))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)          # the worst over both ranks
    res["worst"] = worst.item()
    return res


def main():
    env = init_from_env("cpu")
    rank, P = env.rank, env.world_size
    out = {"ours": attention_vs_full(lambda q, k, v: ulysses_attention(q, k, v), rank, P)}

    # The peer implementation, same call: DeepSpeed's DistributedAttention (batch-first layout).
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    from dit_core.parallel.zero import skip_inference_kernel_build
    skip_inference_kernel_build()          # (~90 s of compiling a kernel this check never calls)
    deepspeed.init_distributed(dist_backend="gloo")
    ds = DistributedAttention(sdpa_attention, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    out["deepspeed"] = attention_vs_full(lambda q, k, v: ds(q, k, v, 0), rank, P)

    # Bad shapes stop before any collective, with one sentence.
    try:
        ulysses_attention(*(torch.zeros(1, 4, 3, 8) for _ in range(3)))
    except ValueError as e:
        out["heads_error"] = str(e)
    try:
        token_slice(49, rank, P)
    except ValueError as e:
        out["tokens_error"] = str(e)

    # Bytes: one forward + backward of a sequence-parallel DiT, all-to-alls counted.
    cfg = load_config(None, {"model.hidden_size": 32, "model.depth": 3, "model.num_heads": 4, "model.patch_size": 7})
    torch.manual_seed(0)
    sp = SequenceParallelDiT(DiT(cfg.model), dist.group.WORLD)
    B = 4
    x, noise = torch.randn(B, 1, 28, 28), torch.randn(B, 1, 28, 28)
    t, y = torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
    diffusion = Diffusion(cfg.diffusion)
    with CommCounter() as c:
        pred = sp(diffusion.q_sample(x, t, noise), t, y)
        c_fwd = dict(c.bytes)
        pred.sum().backward()
    out["a2a_calls"] = c.calls["all_to_all_single"]
    out["a2a_sent_forward"] = c_fwd["all_to_all_single"] * (P - 1) / P
    out["a2a_sent_step"] = c.bytes["all_to_all_single"] * (P - 1) / P
    out["formula_forward"] = cfg.model.depth * ulysses_elements(B, sp.module.num_tokens, 32, P) * 4   # fp32 bytes
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
    teardown()
    exit_process(0)


if __name__ == "__main__":
    main()
