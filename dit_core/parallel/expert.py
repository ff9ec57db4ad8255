"""Expert parallelism (专家并行) by hand: E experts over P ranks, tokens routed with two all-to-alls.

Every rank holds the whole non-expert model (attention, embeddings, the routers) and trains on its own slice of the
global batch, as under data parallelism, but only E/P of every MoE layer's experts: rank q of an EP group holds
experts [q*E/P, (q+1)*E/P). In each MoE layer:

    route     every rank scores its own tokens (the router is data-parallel) and picks each token's top-k experts
    sizes     an all-to-all of E counts: how many rows each rank will send to each expert (the splits are uneven
              and change every step, so the receivers must learn them first)
    dispatch  all-to-all of the rows (token copies, sorted by expert, so by destination rank)
    compute   each rank runs its E/P experts on the rows it received, from every rank of the group
    combine   all-to-all back (the inverse splits), then each token's k results weighted by its router weights

Gradients: non-expert parameters are averaged over every rank (data parallelism). An expert's gradient already
sums its whole EP group's tokens (the backward all-to-all brings every rank's contribution home), so it is summed
only over the ranks that hold a replica of the same experts (one per EP group; none at EP = world size) and divided
by the world size: the mean over the global batch, as for every other parameter.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import CheckpointError
from ..config import ConfigError, ModelConfig
from ..engine import EMA, RankFilesEngine, clip_by_norm_
from ..moe import MoEMlp, combine, moe_layers
from .dist import DistEnv, DistStrategy, check_degree

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")

# Elements this process sent to other ranks in the dispatch and combine all-to-alls (forward and backward).
SENT = {"elements": 0}


class RouteRowsAllToAll(torch.autograd.Function):
    """Rows routed to the ranks that hold their experts (dispatch) or back to the ranks they came from (combine):
    `all_to_all_single` with uneven splits along dim 0: rows[sum(send[:j]) : sum(send[:j+1])] go to rank j,
    and `recv[j]` rows come from rank j. Backward sends the gradients back along the same routes, reversed."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    SENT["elements"] += (sum(send) - send[dist.get_rank(group)]) * x[0].numel() if len(x) else 0
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class ExpertDispatch:
    """The `MoEMlp.dispatch` of expert parallelism (swapped into every MoE layer by `shard_experts`)."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def __call__(self, moe: MoEMlp, x: torch.Tensor, top_i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        P, k = self.size, top_i.shape[1]
        E = moe.num_experts
        local = E // P
        order = top_i.flatten().argsort(stable=True)                  # pairs sorted by expert = by destination
        counts = torch.bincount(top_i.flatten(), minlength=E)
        # sizes: rank j receives the counts of its own experts from every rank, a (P, E/P) table
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=self.group)
        mine, theirs = counts.view(P, local).tolist(), got.view(P, local).tolist()   # the host's only two waits
        send, recv = [sum(r) for r in mine], [sum(r) for r in theirs]
        rows = RouteRowsAllToAll.apply(x[order // k], send, recv, self.group)   # dispatch: (sum(recv), h)
        # rows arrive by source rank, then expert; the experts want them by expert: a stable sort on the key
        # (expert, source) of each row's segment regroups them, its inverse puts the results back
        seg = torch.arange(P * local, device=x.device).view(P, local)          # segment (s, j), arrival order
        key = torch.repeat_interleave((seg % local) * P + seg // local, got.flatten().to(x.device))
        by_expert = key.argsort(stable=True)
        out = moe.experts(rows[by_expert], [sum(theirs[s][j] for s in range(P)) for j in range(local)])
        out = out[torch.argsort(by_expert)]                           # back to arrival order
        back = RouteRowsAllToAll.apply(out, recv, send, self.group)             # combine: each row to the rank it came from
        return combine(back, order, w)

    def __deepcopy__(self, memo):
        return self                                                   # the EMA's copy shares the groups


def dispatch_elements(tokens: int, top_k: int, hidden: int, degree: int) -> float:
    """Rows one rank sends to other ranks in one MoE layer's forward if routing is uniform: its tokens x top_k
    pairs, (P-1)/P of which live elsewhere, once in the dispatch and once back in the combine."""
    return 2 * tokens * top_k * hidden * (degree - 1) / degree


def shard_experts(model: nn.Module, ep_rank: int, ep_size: int, group) -> None:
    """Keep this rank's E/P experts of every MoE layer (under their single-process names, dim 0 sliced) and
    route through the all-to-alls. Called after the whole model was initialised from the shared seed, so each
    rank's experts are the single-process model's."""
    for moe in moe_layers(model):
        local = moe.num_experts // ep_size
        keep = slice(ep_rank * local, (ep_rank + 1) * local)
        for name in EXPERT_PARAMS:
            p = nn.Parameter(getattr(moe, name).data[keep].clone())
            p.expert_parallel = True
            setattr(moe, name, p)
        moe.dispatch = ExpertDispatch(group, ep_rank, ep_size)


def expert_names(model: nn.Module) -> set[str]:
    """The state-dict names of every MoE layer's expert tensors (the ones expert parallelism slices)."""
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, MoEMlp) for p in EXPERT_PARAMS}


@torch.no_grad()
def gather_state_dict(model: nn.Module, group) -> dict:
    """The single-process state dict: every expert tensor all-gathered along dim 0 over the EP group."""
    P = dist.get_world_size(group)
    out, experts = {}, expert_names(model)
    for name, t in model.state_dict().items():
        if name in experts:
            parts = [torch.empty_like(t) for _ in range(P)]
            dist.all_gather(parts, t.contiguous(), group=group)
            out[name] = torch.cat(parts)
        else:
            out[name] = t.detach().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, sd: dict, ep_rank: int, ep_size: int) -> None:
    experts = expert_names(model)
    for name, t in model.state_dict().items():
        if name not in sd:
            raise CheckpointError(f"the checkpoint has no '{name}'; use the config it was trained with.")
        src = sd[name]
        if name in experts:
            src = src[ep_rank * t.shape[0]:(ep_rank + 1) * t.shape[0]]
        if src.shape != t.shape:
            raise CheckpointError(f"'{name}' has shape {tuple(src.shape)} in the checkpoint, {tuple(t.shape)} here; "
                                  f"use the config it was trained with.")
        t.copy_(src)


class ExpertParallelEMA(EMA):
    """Each rank averages its own experts (and the shared weights); gathered whole when saved."""

    def __init__(self, model: nn.Module, strategy: "ExpertStrategy"):
        super().__init__(model)
        self.strategy = strategy

    def state_dict(self) -> dict:
        return gather_state_dict(self.module, self.strategy.ep_group)

    def load_state_dict(self, sd: dict) -> None:
        load_full_state_dict(self.module, sd, self.strategy.ep_rank, self.strategy.ep_size)


class ExpertParallelEngine(RankFilesEngine):
    """Whole (gathered) weights in model.pt and one optimizer file per rank (its experts' moments): resumed by the
    same --ep-degree on the same number of processes."""

    name = "expert_parallel"

    def make_ema(self):
        return ExpertParallelEMA(self.model, self.strategy)

    def whole_state_dict(self):
        return gather_state_dict(self.model, self.strategy.ep_group)

    def load_whole_state_dict(self, sd):
        load_full_state_dict(self.model, sd, self.strategy.ep_rank, self.strategy.ep_size)

    launcher, split = "launchers/moe.py", "split by expert per rank"

    def wrote(self, state):
        return "ep_degree" in state

    def layout_flags(self, d):
        return f"--ep-degree {d['ep_degree']}"

    def state_info(self) -> dict:
        return {"ep_degree": self.strategy.ep_size, "world_size": self.strategy.world_size}


def check_expert_parallel(model: ModelConfig, degree: int, world_size: int) -> None:
    """Every reason an EP layout cannot run, as one sentence, before any step."""
    if not model.num_experts:
        raise ConfigError("launchers/moe.py trains a mixture-of-experts DiT, but model.num_experts=0; use "
                          "--config configs/moe.yaml or --set model.num_experts=4.")
    check_degree(world_size, degree, "--ep-degree")
    if model.num_experts % degree:
        raise ConfigError(f"model.num_experts={model.num_experts} is not divisible by --ep-degree {degree}: each "
                          f"rank holds the same number of experts; use a degree that divides {model.num_experts}.")


class ExpertStrategy(DistStrategy):
    """DP x EP for `dit_core.train`: every rank its own data; ranks [d*P, (d+1)*P) form EP group d and share the
    experts of one model; ranks with the same place in their groups hold the same experts (the expert-data-
    parallel group)."""

    trains_moe = True
    # (teaching) expert-average: an expert's gradient divided by the size of the group it was all-reduced over (its
    # replicas, dp) instead of by N: each expert has gradients from the tokens of all ep ranks, so ep times too large
    BROKEN = ("expert-average",)

    def __init__(self, env: DistEnv, degree: int, broken: str | None = None):
        if broken not in (None, *self.BROKEN):
            raise ConfigError(f"--break {broken} is not one of {', '.join(self.BROKEN)}.")
        super().__init__(env)
        self.broken = broken
        timeout = datetime.timedelta(seconds=env.timeout)
        P, D = degree, env.world_size // degree
        mine = {}
        for d in range(D):                                 # every rank builds every group, in the same order
            ranks = [d * P + i for i in range(P)]
            g = dist.new_group(ranks, timeout=timeout)
            if env.rank in ranks:
                mine["ep"] = g
        for i in range(P):
            ranks = [d * P + i for d in range(D)]
            g = dist.new_group(ranks, timeout=timeout) if D > 1 else None
            if env.rank in ranks:
                mine["replicas"] = g
        self.ep_group, self.replica_group = mine["ep"], mine["replicas"]
        self.ep_size, self.ep_rank, self.dp_size = P, env.rank % P, D

    def make_engine(self, model, cfg, device):
        shard_experts(model, self.ep_rank, self.ep_size, self.ep_group)    # before the optimizer sees them
        return ExpertParallelEngine(model, self, cfg, device)

    def finish_gradient_sync(self, model: nn.Module) -> None:
        """Shared gradients: one flat all-reduce over every rank; experts: over their replicas only. Both / N."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:         # an expert slice that received no token this step: a zero gradient
                p.grad = torch.zeros_like(p)
        for experts, group in ((False, None), (True, self.replica_group)):
            part = [p for p in params if getattr(p, "expert_parallel", False) == experts]
            if not part:
                continue
            flat = torch.cat([p.grad.reshape(-1) for p in part])
            if not experts or group is not None:
                dist.all_reduce(flat, group=group)
            flat.div_(self.dp_size if experts and self.broken == "expert-average" else self.world_size)
            offset = 0
            for p in part:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """The whole model's norm: shared gradients (equal on every rank) once, expert squares summed over the
        EP group (each rank holds different experts)."""
        grads = [p.grad for p in params if p.grad is not None]

        def squares(experts):
            return sum((p.grad.float().square().sum() for p in params
                        if p.grad is not None and getattr(p, "expert_parallel", False) == experts),
                       torch.zeros((), device=grads[0].device))
        sq = squares(True)
        dist.all_reduce(sq, group=self.ep_group)
        return clip_by_norm_(grads, (sq + squares(False)).sqrt(), max_norm)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size
