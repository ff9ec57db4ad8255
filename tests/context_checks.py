"""Checks of ring attention and USP that need real processes: a row of the suite's 4-process job (dit_core.many calls
main(argv) with --log-jsonl OUT); by hand: torchrun --standalone --nproc_per_node 4 tests/context_checks.py OUT.
Rings of P = 2, 3 and 4 run on subgroups of the 4 ranks. Rank 0 writes {check: value} as one JSON line to OUT."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))     # dist_checks, also when dit_core.many loads this file

from dit_core.model import sdpa_attention  # noqa: E402
from dit_core.parallel.context import SENT, context_attention, ring_attention  # noqa: E402
from dist_checks import out_path, rel, report, worst  # noqa: E402
from dit_core.parallel.dist import init_from_env  # noqa: E402


def bounds(n: int, P: int, r: int) -> slice:
    """Contiguous slices as even as possible: the first n % P ranks take one token more."""
    base, extra = divmod(n, P)
    lo = r * base + min(r, extra)
    return slice(lo, lo + base + (r < extra))


def compare(attn, q, k, v, g, sl):
    """Max relative difference of output and q/k/v gradients on this rank's slice, against full attention."""
    full = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = sdpa_attention(*full)
    ref.backward(g)
    mine = [t.detach()[:, sl].clone().requires_grad_() for t in (q, k, v)]
    out = attn(*mine)
    out.backward(g[:, sl])
    return max([rel(out, ref[:, sl])] + [rel(m.grad, f.grad[:, sl]) for m, f in zip(mine, full)])


def main(argv=None, standalone: bool = False) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = out_path(argv)
    env = init_from_env("cpu")
    r = env.rank
    groups = {P: dist.new_group(list(range(P))) for P in (2, 3)}
    groups[4] = None
    c = {}
    B, H, D = 2, 4, 8
    for P in (2, 3, 4):
        for n in (12, 13):                       # a multiple of P = 2, 3, 4 and not (13)
            torch.manual_seed(n)
            q, k, v, g = (torch.randn(B, n, H, D) for _ in range(4))
            if r < P:
                e = compare(lambda *t: ring_attention(*t, group=groups[P]), q, k, v, g, bounds(n, P, r))
                c[f"ring P={P} n={n}"] = worst(e, groups[P])
    # USP: Ulysses 2 x Ring 2 on 4 ranks; inner rank = ring index x 2 + Ulysses index holds token slice r.
    ug = [dist.new_group([0, 1]), dist.new_group([2, 3])][r // 2]
    rg = [dist.new_group([0, 2]), dist.new_group([1, 3])][r % 2]
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(B, 16, H, D) for _ in range(4))
    c["usp 2x2 n=16"] = worst(compare(lambda *t: context_attention(*t, ug, rg), q, k, v, g, bounds(16, 4, r)), None)
    # Elements one rank sends round a ring of 4, one call, against the formula (blk: one rank's K, or V, block).
    torch.manual_seed(2)
    q, k, v = (torch.randn(B, 4, H, D, requires_grad=True) for _ in range(3))
    SENT["elements"] = 0
    o = ring_attention(q, k, v, equal=True)
    c["ring sent forward"] = SENT["elements"]
    o.sum().backward()
    c["ring sent backward"] = SENT["elements"] - c["ring sent forward"]
    blk, P = B * 4 * H * D, 4
    c["ring formula forward"], c["ring formula backward"] = 2 * blk * (P - 1), 2 * blk * (P - 1) + 2 * blk * P
    # Merging in bf16 (ring-flash-attention#22): the running max, sum and output rounded at every one of P steps,
    # on the same 64 tokens for rings of P = 2, 3 and 4 (a ring of 4 without suffix, as before).
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, 64, H, D, dtype=torch.float64) * 2 for _ in range(3))
    full = sdpa_attention(q, k, v)
    for P in (2, 3, 4):
        if r < P:
            ref = full[:, bounds(64, P, r)]
            mine = [t[:, bounds(64, P, r)].float() for t in (q, k, v)]
            at = "" if P == 4 else f" P={P}"
            with torch.no_grad():
                exact = ring_attention(*mine, group=groups[P])
                for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
                    e = rel(ring_attention(*mine, group=groups[P], merge_dtype=dt).double(), ref)
                    c[f"merge {name} error{at}"] = worst(e, groups[P])
                # the same output rounded to bf16 once, at the end: what bf16 storage alone costs
                c[f"bf16 output once error{at}"] = worst(rel(exact.to(torch.bfloat16).double(), ref), groups[P])
    report(c, out, r, standalone)


if __name__ == "__main__":
    main(standalone=True)
