"""Checks of expert parallelism that need real processes: a row of the suite's 4-process job (dit_core.many calls
main(argv) with --log-jsonl OUT); by hand: torchrun --standalone --nproc_per_node 4 tests/expert_checks.py OUT.
EP groups of P = 2 (ranks 0-1) and P = 4 run on the 4 ranks. Rank 0 writes {check: value} as one JSON line to OUT."""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))     # dist_checks, also when dit_core.many loads this file

from dit_core.moe import MoEMlp  # noqa: E402
from dit_core.parallel import expert  # noqa: E402
from dist_checks import out_path, rel, report, worst  # noqa: E402
from dit_core.parallel.dist import init_from_env  # noqa: E402
from dit_core.parallel.measure import CommCounter  # noqa: E402

E, K, H, M, T = 4, 2, 8, 12, 10          # experts, top-k, hidden, expert width, tokens per rank


def layer(seed=0):
    torch.manual_seed(seed)
    m = MoEMlp(H, M, E, K, group=1)
    torch.nn.init.normal_(m.router.weight)
    m.reset_experts()
    for b in (m.b1, m.b2):
        torch.nn.init.normal_(b, std=0.1)         # nonzero biases: their gradients are checked too
    return m


def compare(P, group, routing=None):
    """EP layer vs the whole layer in one process: every output row, and the gradients of the tokens, the router,
    the routing weights and every expert parameter (this rank's experts), relative."""
    r = dist.get_rank(group)
    torch.manual_seed(1)
    x, g = torch.randn(P * T, H), torch.randn(P * T, H)
    full = layer()
    mine = copy.deepcopy(full)
    expert.shard_experts(mine, r, P, group)
    sl = slice(r * T, (r + 1) * T)
    xf, xm = x.clone().requires_grad_(), x[sl].clone().requires_grad_()
    if routing is None:                           # through the routers: the whole layer
        ref, out = full(xf.unsqueeze(0)).squeeze(0), mine(xm.unsqueeze(0)).squeeze(0)
        (ref * g).sum().backward()
        (out * g[sl]).sum().backward()
        router = mine.router.weight.grad.clone()
        dist.all_reduce(router, group=group)      # each rank's router saw only its tokens
        errs = [rel(out, ref[sl]), rel(xm.grad, xf.grad[sl]), rel(router, full.router.weight.grad)]
    else:                                         # a given routing: the dispatch alone
        top_i, w = routing
        wf, wm = w.clone().requires_grad_(), w[sl].clone().requires_grad_()
        ref = full.dispatch(full, xf, top_i, wf)
        out = mine.dispatch(mine, xm, top_i[sl], wm)
        (ref * g).sum().backward()
        (out * g[sl]).sum().backward()
        errs = [rel(out, ref[sl]), rel(xm.grad, xf.grad[sl]), rel(wm.grad, wf.grad[sl])]
    local = slice(r * E // P, (r + 1) * E // P)
    for name in expert.EXPERT_PARAMS:
        a, b = getattr(mine, name).grad, getattr(full, name).grad[local]
        a = torch.zeros_like(b) if a is None else a   # an expert that received no token: no gradient at all
        errs.append(0.0 if not b.abs().max() and not a.abs().max() else rel(a, b))
    return max(errs)


def main(argv=None, standalone: bool = False) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = out_path(argv)
    env = init_from_env("cpu")
    r = env.rank
    groups = {2: [dist.new_group([0, 1]), dist.new_group([2, 3])][r // 2], 4: None}
    c = {}
    # An unbalanced routing: no token chooses expert 1 (P = 4: rank 1 receives nothing), half choose expert 0.
    torch.manual_seed(2)
    n = 4 * T
    first = torch.where(torch.rand(n) < 0.5, 0, 2 + torch.randint(0, 2, (n,)))
    second = torch.where(first == 0, 3, 0)
    unbalanced = (torch.stack([first, second], 1), torch.softmax(torch.randn(n, K), -1))
    for P in (2, 4):
        c[f"layer P={P}"] = worst(compare(P, groups[P]), groups[P])
        top_i, w = unbalanced
        sub = (top_i[:P * T], w[:P * T])
        c[f"unbalanced P={P}"] = worst(compare(P, groups[P], sub), groups[P])
        c[f"unbalanced P={P} tokens of expert 1"] = int((sub[0] == 1).sum())
    # What one layer's all-to-alls carry (P = 4, one expert per rank), counted at the collective: CommCounter wraps
    # torch.distributed.all_to_all_single and adds up the bytes of every call's output, what this rank receives (its
    # own rows included). Against the routing's counts, gathered from every rank's MoE statistics (a one-hot count of
    # its choices, not the split lists the dispatch builds): forward, the sizes exchange (E counts), the dispatch
    # bringing the pairs routed to this rank's expert from every rank, and the combine bringing this rank's own pairs
    # back; backward, the same two exchanges reversed.
    m = layer()
    expert.shard_experts(m, r, 4, None)
    torch.manual_seed(3 + r)
    x = torch.randn(1, T, H, requires_grad=True)
    with CommCounter() as fwd:
        y = m(x)
    with CommCounter() as bwd:
        y.sum().backward()
    counts = [torch.zeros(E, dtype=torch.long) for _ in range(4)]
    dist.all_gather(counts, m.stats[0].sum(0))
    mine = int(counts[r].sum())                         # the pairs this rank routed (T x K)
    here = sum(int(counts[s][r]) for s in range(4))     # the pairs every rank routed to this rank's expert
    row, sizes = H * x.element_size(), E * counts[r].element_size()
    a2a = "all_to_all_single"
    ok = (fwd.calls[a2a] == 3 and fwd.bytes[a2a] == sizes + (here + mine) * row
          and bwd.calls[a2a] == 2 and bwd.bytes[a2a] == (here + mine) * row)
    c["all-to-all bytes == routing counts, every rank"] = bool(worst(float(not ok)) == 0)
    c["all-to-all bytes forward, rank 0"], c["pairs routed to rank 0's expert"] = fwd.bytes[a2a], here
    report(c, out, r, standalone)


if __name__ == "__main__":
    main(standalone=True)
