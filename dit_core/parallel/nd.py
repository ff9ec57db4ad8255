"""N-D parallelism: data x pipeline x context x tensor parallelism at once, from the project's own pieces.

One `DeviceMesh` of shape (dp, pp, cp, tp) holds every rank; rank = ((d·P + p)·C + c)·T + t, so the axes sit on
ranks from the innermost (consecutive ranks) outwards:

  tp  consecutive ranks: it talks inside every block, twice in forward and twice in backward, the whole activation
      each time (dit_core.parallel.tensor); with one process per GPU its group stays inside one node, on NVLink.
  cp  next: a ring of K/V blocks per attention layer (dit_core.parallel.context), overlappable with the attention
      it feeds, so it tolerates a slower link than tp.
  pp  next: one activation per micro-batch and stage boundary, point to point (dit_core.parallel.pipeline): little
      traffic, so its stages may sit on different nodes.
  dp  outermost: one all-reduce of the gradients per step, off the critical path until the step's end.

picotron orders its grid the same way, (dp, pp, cp, tp). Megatron-LM (Narayanan et al., 2021) and torchtitan also
keep tensor parallelism innermost, inside a node, but put the pipeline outermost.

Each rank is one stage (its coordinate p) of one pipeline; the stage holds the blocks `split_blocks` gives it, with
those blocks' big linear layers sliced over the tp group and their attention run as ring attention over the cp
group on this rank's slice of every image's tokens (its coordinate c). The pipeline's schedule moves the packed
activations of those tokens between stages along the pp axis. Gradients: the cp ranks hold partial gradients (each
of its own tokens' share of the loss) and the dp ranks gradients of different data, so one all-reduce over the
dp x cp group, divided by dp, makes every rank's gradient the single-process one.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..engine import clip_by_norm_
from ..model import DiT, patch_tokens
from .context import ContextAttention
from .dist import DistEnv, DistStrategy
from .pipeline import RankStages, check_pipeline
from .pipeline_train import PipelineEMA, PipelineEngine, PipelineStrategy, all_reduce_gradients
from .tensor import check_tensor_parallel, gather_state_dict, load_full_state_dict, parallelize
from .ulysses import check_token_split, token_slice

AXES = ("dp", "pp", "cp", "tp")          # outermost to innermost
FLAGS = {a: f"--{a}" for a in AXES}


@dataclass(frozen=True)
class Layout:
    dp: int
    pp: int
    cp: int
    tp: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    def grid(self) -> torch.Tensor:
        """grid[d, p, c, t] = the global rank at those coordinates."""
        return torch.arange(self.world_size).view(*self.sizes)

    def coords(self, rank: int) -> dict:
        out, r = {}, rank
        for a, n in reversed(list(zip(AXES, self.sizes))):
            r, out[a] = divmod(r, n)
        return {a: out[a] for a in AXES}

    def lines(self, *axes: str) -> list[list[int]]:
        """The groups of ranks that differ only along `axes` (every other coordinate fixed), in rank order."""
        keep = [AXES.index(a) for a in axes]
        rest = [i for i in range(len(AXES)) if i not in keep]
        n = 1
        for i in keep:
            n *= self.sizes[i]
        return self.grid().permute(*rest, *keep).reshape(-1, n).tolist()

    def flags(self) -> str:
        return " ".join(f"--{a} {n}" for a, n in zip(AXES, self.sizes))

    def __str__(self) -> str:
        return " x ".join(f"{a.upper()} {n}" for a, n in zip(AXES, self.sizes)) + f" = {self.world_size} ranks"


def resolve_layout(world_size: int, dp: int | None, pp: int, cp: int, tp: int) -> Layout:
    """The layout the flags ask for; --dp left out is the world size over the other three degrees."""
    for a, n in (("pp", pp), ("cp", cp), ("tp", tp), ("dp", dp)):
        if n is not None and n < 1:
            raise ConfigError(f"--{a} {n} must be at least 1 (1 leaves that axis out).")
    inner = pp * cp * tp
    if dp is None:
        if world_size % inner:
            raise ConfigError(f"--pp {pp} x --cp {cp} x --tp {tp} = {inner} ranks per data-parallel replica does not "
                              f"divide the world size {world_size}; start a multiple of {inner} processes or lower "
                              f"one of those degrees.")
        dp = world_size // inner
    if dp * inner != world_size:
        raise ConfigError(f"--dp {dp} x --pp {pp} x --cp {cp} x --tp {tp} = {dp * inner} is not the world size "
                          f"{world_size}; the four degrees must multiply to the number of processes: start "
                          f"{dp * inner} processes, or leave --dp out (it then becomes the world size / {inner}).")
    return Layout(dp, pp, cp, tp)


def check_nd(cfg: Config, layout: Layout, world_size: int, microbatches: int, schedule: str) -> None:
    """Every reason the model cannot be split this way, as one sentence naming the axis, before any process
    waits on another."""
    if layout.world_size != world_size:
        raise ConfigError(f"{layout} is not the world size {world_size}; start {layout.world_size} processes.")
    check_tensor_parallel(cfg.model, layout.tp, world_size, flag="--tp")
    check_token_split(cfg.model, layout.cp, "--cp")
    check_pipeline(cfg, layout.pp, world_size, microbatches, schedule, layout.dp, flag="--pp")
    # (a mixture-of-experts DiT is refused by dit_core.train with its own sentence: trains_moe is False)


@dataclass
class NDMesh:
    """This rank's place in the (dp, pp, cp, tp) grid: its coordinates, the group and ranks along each axis, the
    two combined groups the step needs, and torch's DeviceMesh over the same groups."""
    layout: Layout
    coords: dict
    groups: dict            # axis -> group along it; "dp_cp" (gradients), "pp_tp" (the gradient norm)
    ranks: dict             # axis -> the global ranks along it, in order
    device_mesh: object


def build_nd_mesh(env: DistEnv, layout: Layout) -> NDMesh:
    """Every rank creates every group, in the same order (new_group is a collective call), each with
    run.dist_timeout (new_group's own default is 30 minutes). torch's DeviceMesh is then built *from* these groups
    (DeviceMesh.from_group), so both name the same communicators: mesh["tp"].get_group() is groups["tp"]."""
    from torch.distributed.device_mesh import DeviceMesh
    timeout = datetime.timedelta(seconds=env.timeout)
    groups, ranks = {}, {}
    for name in (*AXES, "dp_cp", "pp_tp"):
        for line in layout.lines(*name.split("_")):
            g = dist.new_group(line, timeout=timeout)
            if env.rank in line:
                groups[name], ranks[name] = g, line
    device_type = "cuda" if env.device.type == "cuda" else "cpu"
    mesh = DeviceMesh.from_group([groups[a] for a in AXES], device_type, mesh=layout.grid(), mesh_dim_names=AXES)
    return NDMesh(layout, layout.coords(env.rank), groups, ranks, mesh)


class NDStrategy(PipelineStrategy):
    """DP x PP x CP x TP for `dit_core.train`. The pipeline's engine and schedules run each pipeline (the ranks
    along pp, every other coordinate fixed); what changes is what a stage holds (sliced layers, a slice of the
    tokens), how its loss is normalised, and over which groups gradients, norms and losses are summed."""

    # (teaching) two reductions done the wrong way, each a single change of the right one:
    #   norm-every-tp-rank: the replicated parameters' squares summed on every tp rank (counted tp times), so the
    #                       clipping factor is wrong and the curve leaves the single-process one
    #   cp-average:         the cp ranks' partial gradients averaged (/ dp x cp) instead of summed: every gradient is
    #                       cp times too small; clipping at every step rescales it back, so only the norm shows it
    BROKEN = ("norm-every-tp-rank", "cp-average")

    def __init__(self, env: DistEnv, layout: Layout, microbatches: int, schedule_name: str = "1f1b",
                 broken: str | None = None):
        if broken not in (None, *self.BROKEN):
            raise ConfigError(f"--break {broken} is not one of {', '.join(self.BROKEN)}.")
        DistStrategy.__init__(self, env)
        self.layout = layout
        self.nd = build_nd_mesh(env, layout)
        self.stages, self.microbatches, self.schedule = layout.pp, microbatches, schedule_name
        self.broken, self.chunks, self.timeline = broken, 1, False
        self.coords = self.nd.coords
        self.stage_index = self.coords["pp"]
        self.pp_group, self.pp_ranks = self.nd.groups["pp"], self.nd.ranks["pp"]
        self.tp_group, self.cp_group = self.nd.groups["tp"], self.nd.groups["cp"]

    @property
    def data_rank(self) -> int:
        return self.coords["dp"]

    @property
    def data_world_size(self) -> int:
        return self.layout.dp

    @property
    def tokens(self) -> slice:
        """This rank's contiguous slice of every image's tokens (all of them when cp = 1)."""
        return self._tokens

    def make_stage(self, model: DiT) -> RankStages:
        if self.layout.tp > 1:
            parallelize(model, self.tp_group)              # before the optimizer sees the parameters
        if self.layout.cp > 1:
            model.set_attention(ContextAttention(None, self.cp_group))   # ring attention over the cp ranks
        self._tokens = (token_slice(model.num_tokens, self.coords["cp"], self.layout.cp) if self.layout.cp > 1
                        else slice(None))
        return RankStages(model, self.stage_index, self.stages, 1, tokens=self._tokens)

    def make_engine(self, model, cfg, device):
        return NDEngine(model, self, cfg, device)

    def finish_gradient_sync(self, model) -> None:
        """One all-reduce over the dp x cp group: the cp ranks' partial gradients (each its tokens' share of the
        loss) add up, the dp ranks' gradients of different data are averaged (/ dp)."""
        if self.layout.dp * self.layout.cp > 1:
            all_reduce_gradients(model, self.nd.groups["dp_cp"],
                                 self.layout.dp * (self.layout.cp if self.broken == "cp-average" else 1))

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """The whole model's gradient norm in one all-reduce over the pp x tp group: a stage's tensor-parallel
        slices counted on every tp rank, its replicated parameters once (tp rank 0), every stage's squares summed.
        (After finish_gradient_sync the cp and dp ranks hold the same gradients: they are not summed again.)"""
        grads = [p.grad for p in params if p.grad is not None]
        mine = self.coords["tp"] == 0 or self.broken == "norm-every-tp-rank"
        sq = sum((p.grad.float().square().sum() for p in params
                  if p.grad is not None and (mine or hasattr(p, "tensor_parallel"))),
                 torch.zeros((), device=self.device))
        dist.all_reduce(sq, group=self.nd.groups["pp_tp"])
        return clip_by_norm_(grads, sq.sqrt(), max_norm)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """A loss lives on the last stage; its cp ranks hold shares of it (summed), its tp ranks copies (counted
        once); the sum over all ranks / dp is the mean over the data-parallel replicas."""
        holds = self.is_last_stage and self.coords["tp"] == 0
        t = (t.detach().float() if holds else torch.zeros_like(t, dtype=torch.float32)).clone()
        dist.all_reduce(t)
        return t / self.layout.dp

    def gather(self, module: RankStages) -> dict:
        """The whole model's weights under the single-process names: the tp slices joined inside each stage, then
        the stages' pieces gathered along the pipeline (every rank calls it; off the hot path: a checkpoint)."""
        return self.gather_stages(module, gather_state_dict(module, self.tp_group) if self.layout.tp > 1
                                  else module.state_dict())

    def load_stage(self, module: RankStages, sd: dict) -> None:
        """A whole (single-process) state dict into this rank's stage: its blocks, each tp rank its slices."""
        load_full_state_dict(module, module.local_state(sd))


class NDEMA(PipelineEMA):
    def load_state_dict(self, sd: dict) -> None:
        self.strategy.load_stage(self.module, sd)


class NDEngine(PipelineEngine):
    """The pipeline engine with the N-D strategy's stages; whole weights in model.pt, one optimizer file per rank."""

    name = "nd"

    def micro_loss(self, objective, pred, x0, t, noise) -> torch.Tensor:
        """cp = 1: the pipeline's loss. cp > 1: the last stage holds only its tokens of the prediction; its share
        of the micro-batch's mean loss is its tokens' error over the whole micro-batch's element count."""
        if self.strategy.layout.cp == 1:
            return super().micro_loss(objective, pred, x0, t, noise)
        target = patch_tokens(objective.target(x0, t, noise), self.cfg.model.patch_size)
        return objective.token_share(pred, target[:, self.strategy.tokens], t, noise.numel())

    def load_whole_state_dict(self, sd):
        self.strategy.load_stage(self.stage, sd)

    def make_ema(self):
        return NDEMA(self.stage, self.strategy)

    def state_info(self) -> dict:
        return {"nd_flags": self.strategy.layout.flags(), "world_size": self.strategy.world_size}

    launcher, split, layout_defaults = "launchers/nd.py", "one file per rank, sliced for that layout", {}

    def wrote(self, state):                        # not the pipeline's: an N-D checkpoint names its own engine
        return state.get("engine") == self.name

    def layout_flags(self, d):
        return d["nd_flags"]

    def resume_flags(self, d):
        return d["nd_flags"]


def mesh_record(strategy: NDStrategy) -> list[dict] | None:
    """Every rank's place twice, gathered (a collective): as the project computes it (its coordinates from the rank
    formula, and the ranks each of its process groups really holds), and as torch's own `init_device_mesh` of shape
    (dp, pp, cp, tp) places it, built here independently of Layout (its own grid, its own new groups). Chapter 16 and
    tests/test_nd.py compare the two, so a wrong rank formula or a group built from the wrong line shows. Rank 0 gets
    the list (launchers/nd.py writes it to mesh.json); the others None."""
    from torch.distributed.device_mesh import init_device_mesh
    L, names = strategy.layout, ("dp", "pp", "cp", "tp")
    theirs = init_device_mesh("cuda" if strategy.device.type == "cuda" else "cpu", (L.dp, L.pp, L.cp, L.tp),
                              mesh_dim_names=names)
    mine = {"rank": strategy.rank, "coords": dict(strategy.coords),
            "groups": {a: dist.get_process_group_ranks(strategy.nd.groups[a]) for a in AXES},
            "torch_coords": dict(zip(names, theirs.get_coordinate())),
            "torch_groups": {a: dist.get_process_group_ranks(theirs.get_group(a)) for a in names}}
    out = [None] * strategy.world_size
    dist.all_gather_object(out, mine)
    return out if strategy.rank == 0 else None


def mesh_picture(layout: Layout) -> str:
    """Each rank's coordinates, one line per (dp, pp) pair: the cp x tp ranks that share its blocks side by side."""
    lines = [f"{layout}; rank = ((dp*{layout.pp} + pp)*{layout.cp} + cp)*{layout.tp} + tp"]
    for d in range(layout.dp):
        for p in range(layout.pp):
            cells = [f"r{int(layout.grid()[d, p, c, t])}(cp{c},tp{t})" for c in range(layout.cp)
                     for t in range(layout.tp)]
            lines.append(f"  dp{d} pp{p}: " + " ".join(cells))
    return "\n".join(lines)
