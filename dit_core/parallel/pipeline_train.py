"""Pipeline parallelism in the training loop: DP x PP as one `DistStrategy` (ranks grouped into pipelines, the
gradients averaged over the pipelines, the norm summed over stages), its engine (a step is one pass of the schedule
over the micro-batches per accumulation piece, each micro-batch's mean loss divided by M x accumulation before its
backward, so the summed gradient is the single process's; one optimizer file per stage) and per-stage EMA, the
reference engine on torch.distributed.pipelining over the same stages, and `--timeline`: when every stage computed
and waited, measured. The stages and the executor they run on are `dit_core.parallel.pipeline`.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config, ConfigError
from ..engine import EMA, RankFilesEngine, autocast_ctx, clip_by_norm_
from ..model import DiT, sdpa_attention
from .dist import DistEnv, DistStrategy, build_mesh
from .pipeline import Executor, RankStages, Stage, schedule, split_blocks


# ---------------------------------------------------------------- the strategy and its engine

class PipelineEMA(EMA):
    """Each stage averages its own weights; saved under the single-process DiT's names, gathered."""

    def __init__(self, stage: RankStages, strategy: "PipelineStrategy"):
        self.module = copy.deepcopy(stage).requires_grad_(False).eval()
        for chunk in self.module.chunks:
            for blk in chunk.blocks:
                blk.attn.attn_fn = sdpa_attention
        self.strategy = strategy

    def state_dict(self) -> dict:
        return self.strategy.gather(self.module)

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(self.module.local_state(sd))


class PipelineEngine(RankFilesEngine):
    """TorchEngine whose step runs a pipeline schedule over every micro-batch of the step at once; whole weights
    in model.pt, one optimizer file per stage."""

    name = "pipeline"

    def __init__(self, model, strategy: "PipelineStrategy", cfg: Config, device):
        self.stage = strategy.make_stage(model)
        super().__init__(self.stage, strategy, cfg, device)
        self.executor = Executor(self.stage, strategy.pp_group, strategy.pp_ranks, device, timeline=strategy.timeline)
        self.actions = schedule(strategy.schedule, strategy.stages, strategy.microbatches, strategy.chunks)[strategy.stage_index]
        dist.barrier(group=strategy.pp_group)     # NCCL: every stage's communicator exists before any send

    def run_step(self, step, micro_batches, loss_fn, hooks):
        """Each accumulation piece is one pass of the schedule over M micro-batches (contiguous slices of the
        piece, so of this pipeline's slice of the global batch: the determinism contract's order)."""
        strategy, M, A = self.strategy, self.strategy.microbatches, len(micro_batches)
        objective = loss_fn.objective           # the first stage noises, the last computes the error
        total = torch.zeros((), device=micro_batches[0][0].device)
        for a, (x0, y, b) in enumerate(micro_batches):
            n = x0.shape[0] // M
            cut = [slice(m * n, (m + 1) * n) for m in range(M)]
            inputs = [(objective.noised(x0[c], b.t[c], b.noise[c]), b.t[c], y[c], b.drop[c]) for c in cut]

            def forward_last(m, pred, x0=x0, b=b, cut=cut):
                return self.micro_loss(objective, pred, x0[cut[m]], b.t[cut[m]], b.noise[cut[m]])

            # the mean over the step's M x A micro-batches; rescale-grads rescales after each piece instead, and
            # sum-microbatches forgets the M (each micro-batch's mean counted whole: M times the gradient)
            scale = 1.0 / (A if strategy.broken in ("rescale-grads", "sum-microbatches") else M * A)
            losses = self.executor.run(self.actions, inputs, forward_last, scale, self.autocast)
            if strategy.broken == "rescale-grads":
                for p in self.params:               # torchtitan#1733: the schedule divides the whole .grad by M
                    if p.grad is not None:          # after every piece, shrinking earlier pieces again
                        p.grad.div_(M)
            if losses:
                total = total + torch.stack(losses).sum() / M
            hooks.after_backward(step, a, self)
        return total

    def micro_loss(self, objective, pred, x0, t, noise) -> torch.Tensor:
        """The last stage's loss of one micro-batch: the mean error over it."""
        return objective.error(pred, x0, t, noise)

    def whole_state_dict(self):
        return self.strategy.gather(self.stage)

    def load_whole_state_dict(self, sd):
        self.stage.load_state_dict(self.stage.local_state(sd))

    launcher, split, layout_defaults = "launchers/pipeline.py", "one file per stage", {"virtual_stages": 1}

    def wrote(self, state):
        return state.get("engine") == "pipeline"

    def layout_flags(self, d):
        return f"--pp-degree {d['pp_degree']}" + (f" --virtual-stages {d['virtual_stages']}"
                                                  if d["virtual_stages"] != 1 else "")

    def resume_flags(self, d):
        return f"--pp-degree {d['pp_degree']}" + (f" --schedule interleaved --virtual-stages {d['virtual_stages']}"
                                                  if d["virtual_stages"] != 1 else "")

    def make_ema(self):
        return PipelineEMA(self.stage, self.strategy)

    def state_info(self) -> dict:
        return {"pp_degree": self.strategy.stages, "virtual_stages": self.strategy.chunks, "world_size": self.strategy.world_size}


def all_reduce_gradients(model, group, divisor: float) -> None:
    """Sum every gradient of `model` over `group` in one flat all-reduce, then divide by `divisor`."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= divisor
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


class PipelineStrategy(DistStrategy):
    """DP x PP for `dit_core.train`: ranks [d*P, (d+1)*P) are pipeline d (stage s on rank d*P + s) and train
    on data-parallel slice d of the global batch; the gradients are averaged over the data-parallel group."""

    BROKEN = ("rescale-grads", "sum-microbatches")

    def __init__(self, env: DistEnv, stages: int, microbatches: int, schedule_name: str = "1f1b",
                 broken: str | None = None, timeline: bool = False, chunks: int = 1):
        if broken not in (None, *self.BROKEN):
            raise ConfigError(f"--break {broken} is not one of {', '.join(self.BROKEN)}.")
        super().__init__(env)
        self.mesh = build_mesh(env, stages, "--pp-degree")
        self.stages, self.microbatches, self.schedule, self.broken = stages, microbatches, schedule_name, broken
        self.chunks = chunks                      # virtual stages per rank (interleaved)
        self.timeline = timeline
        d = self.mesh.dp_rank
        self.pp_ranks = [d * stages + s for s in range(stages)]
        self.stage_index = self.mesh.inner_rank
        self.pp_group = self.mesh.inner_group     # the stages of this rank's pipeline

    @property
    def data_rank(self) -> int:
        return self.mesh.dp_rank

    @property
    def data_world_size(self) -> int:
        return self.mesh.dp_size

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.stages - 1

    def make_stage(self, model: DiT) -> RankStages:
        return RankStages(model, self.stage_index, self.stages, self.chunks)

    def make_engine(self, model, cfg, device):
        return PipelineEngine(model, self, cfg, device)

    def finish_gradient_sync(self, model) -> None:
        """Data parallelism across pipelines: one all-reduce of this stage's flattened gradients, then / dp
        (after the schedule, not overlapped: the hand-written DDP's buckets would fire once per micro-batch)."""
        if self.mesh.dp_size > 1:
            all_reduce_gradients(model, self.mesh.dp_group, self.mesh.dp_size)

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """The norm of the whole model's gradient: each stage holds different parameters, so the squares
        are summed over the pipeline's stages; every stage then clips by the same factor."""
        grads = [p.grad for p in params if p.grad is not None]
        sq = sum((g.float().square().sum() for g in grads), torch.zeros((), device=self.device))
        dist.all_reduce(sq, group=self.pp_group)
        return clip_by_norm_(grads, sq.sqrt(), max_norm)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Only last stages hold a loss: their sum over all ranks, divided by the number of pipelines."""
        t = (t.detach().float() if self.is_last_stage else torch.zeros_like(t, dtype=torch.float32)).clone()
        dist.all_reduce(t)
        return t / self.mesh.dp_size

    def gather(self, module: RankStages) -> dict:
        """A stage's weights under the single-process names, gathered from the pipeline's stages (off the hot
        path: a checkpoint). Every rank calls it; the first pipeline's rank 0 gets the whole state dict."""
        return self.gather_stages(module, module.state_dict())

    def gather_stages(self, module: RankStages, local: dict) -> dict:
        """`local` (this stage's state dict, under its own names) from every stage of the pipeline, renamed to the
        single-process DiT's names and merged."""
        mine = {module.global_name(k): v.detach().cpu() for k, v in local.items()}
        parts = [None] * self.stages
        dist.all_gather_object(parts, mine, group=self.pp_group)
        out = {}
        for p in parts:
            out.update(p)
        return out


# ---------------------------------------------------------------- the reference: torch.distributed.pipelining

class _TorchStageModule(nn.Module):
    """The same Stage with the positional signature torch's PipelineStage passes micro-batches through."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.stage = stage

    def forward(self, *args):
        return self.stage(args if self.stage.first else args[0])


class TorchPipelineEngine(PipelineEngine):
    """`--impl torch`: the same stages run by PyTorch's own PipelineStage and ScheduleGPipe / Schedule1F1B.

    `scale_grads=False` and the loss divided by M x accumulation: with the default scale_grads=True the
    schedule divides every .grad by M after each step() call, which is right once but wrong under gradient
    accumulation (torchtitan#1733; `--break rescale-grads` shows it with the hand-written schedules)."""

    name = "pipeline"

    def __init__(self, model, strategy, cfg, device):
        if cfg.diffusion.weighting != "none":
            raise ConfigError(f"--impl torch hands its loss function only a prediction and a target, so it cannot "
                              f"weight samples by their t (diffusion.weighting={cfg.diffusion.weighting}); use --impl "
                              f"hand or weighting none.")
        super().__init__(model, strategy, cfg, device)
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
        C = strategy.stages * strategy.chunks
        self.pstages = [PipelineStage(_TorchStageModule(chunk), chunk.stage, C, device, group=strategy.pp_group)
                        for chunk in self.stage.chunks]
        self.schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
                             "interleaved": ScheduleInterleaved1F1B}[strategy.schedule]
        self.holds_first = any(c.first for c in self.stage.chunks)
        self.holds_last = any(c.last for c in self.stage.chunks)
        self.schedules: dict = {}

    def run_step(self, step, micro_batches, loss_fn, hooks):
        M, A = self.strategy.microbatches, len(micro_batches)
        objective = loss_fn.objective
        if A not in self.schedules:
            def loss(pred, target):
                return objective.error_on_target(pred, target) / (M * A)
            stages = self.pstages if self.strategy.schedule == "interleaved" else self.pstages[0]
            self.schedules[A] = self.schedule_cls(stages, n_microbatches=M, loss_fn=loss, scale_grads=False)
        sched = self.schedules[A]
        total = torch.zeros((), device=micro_batches[0][0].device)
        for a, (x0, y, b) in enumerate(micro_batches):
            losses: list = []
            kw = {"target": objective.target(x0, b.t, b.noise), "losses": losses} if self.holds_last else {}
            with autocast_ctx(self.autocast, x0.device):
                if self.holds_first:
                    sched.step(objective.noised(x0, b.t, b.noise), b.t, y, b.drop, **kw)
                else:
                    sched.step(**kw)
            if losses:
                total = total + torch.stack([l.detach() for l in losses]).sum() * (M * A) / M
            hooks.after_backward(step, a, self)
        return total


# ---------------------------------------------------------------- measuring: the timeline of every stage

class TimelineHooks:
    """`--timeline R.json`: per step, when each stage computed (F, B) and waited (sends and receives),
    in seconds from a barrier at the step's start; the peak number of micro-batches in flight and of
    saved activation bytes, and the bytes this stage sent. Gathered to rank 0 at the end (off the hot path)."""

    def __init__(self, strategy: PipelineStrategy):
        self.strategy, self.steps = strategy, []

    def step_begin(self, step, engine):
        ex = engine.executor
        ex.events.clear()
        ex.peak_in_flight = ex.peak_saved_bytes = ex.bytes_sent = 0
        dist.barrier()                       # every stage starts the step together
        self.t0 = time.perf_counter()

    def after_backward(self, step, micro, engine):
        pass

    def step_end(self, step, engine):
        ex = engine.executor
        self.steps.append({"step": step, "seconds": time.perf_counter() - self.t0,
                           "events": [{**e, "start": e["start"] - self.t0, "end": e["end"] - self.t0}
                                      for e in ex.events],
                           "peak_in_flight": ex.peak_in_flight, "peak_saved_bytes": ex.peak_saved_bytes,
                           "bytes_sent": ex.bytes_sent})

    def logged(self, records, ema, seconds):
        pass

    def write(self, path, cfg: Config) -> None:
        import json
        strategy = self.strategy
        mine = {"rank": strategy.rank, "stage": strategy.stage_index, "pipeline": strategy.mesh.dp_rank, "steps": self.steps}
        everyone = [None] * strategy.world_size
        dist.all_gather_object(everyone, mine)
        if strategy.is_main:
            import pathlib
            info = {"pp_degree": strategy.stages, "microbatches": strategy.microbatches, "schedule": strategy.schedule,
                    "virtual_stages": strategy.chunks, "world_size": strategy.world_size,
                    "blocks": split_blocks(cfg.model.depth, strategy.stages * strategy.chunks),
                    "micro_batch": cfg.train.global_batch_size // strategy.mesh.dp_size // cfg.train.grad_accum
                    // strategy.microbatches,
                    "packed_width": (cfg.model.image_size // cfg.model.patch_size) ** 2 * cfg.model.hidden_size
                    + cfg.model.hidden_size, "ranks": everyone}
            pathlib.Path(path).write_text(json.dumps(info))
