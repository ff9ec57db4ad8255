"""The training loop every launcher reuses.

A launcher decides one thing: the strategy (`dit_core.strategy.Strategy`, or one of `dit_core.parallel`), which says
which slice of the global batch this rank trains on and builds the engine that does backward and the optimizer step.
Everything else is here, once, and the same for every strategy: the run folder's rules, the resume, the batches of
the determinism contract, the objective, the read-back of losses and gradient norms, the log, the divergence guard,
the EMA and the checkpoints. The loop never asks which strategy it runs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .batch import check_batch_split, global_batch, shard
from .checkpoint import ResumePoint, load_ema, resume_point, save_checkpoint, starts_from_weights
from .config import Config, ConfigError
from .data import MNIST, check_data_fits
from .engine import (EMA, autocast_ctx, build_optimizer, compiled, ema_decay, lr_factor,  # noqa: F401  (chapters
                     resolve_device, use_tf32)                                           # import them from here)
from .errors import first_error
from .fast import DeviceBatches, fast_enabled
from .guard import DivergenceGuard
from .logs import JsonlLogger
from .model import DiT
from .objective import MicroBatchLoss, Objective
from .rundir import RunFolder
from .scratch import write_atomic
from .sources import load_data
from .strategy import Engine, Strategy, TrainHooks


@dataclass
class TrainResult:
    model: nn.Module
    ema: EMA
    losses: list = field(default_factory=list)
    last_checkpoint: Path | None = None
    steps: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        loss = f"final loss {self.losses[-1]:.4f}; " if self.losses else "nothing left to train; "
        return f"trained to step {self.steps} in {self.seconds:.1f}s; {loss}checkpoint {self.last_checkpoint}"


def train(cfg: Config, strategy: Strategy | None = None, data: MNIST | None = None,
          quiet: bool = False, stop_at: int | None = None, hooks: TrainHooks | None = None,
          model_fn=None) -> TrainResult:
    """Train from scratch or from cfg.run.resume up to train.max_steps (or stop early at `stop_at`, as a job with a
    time limit would, keeping the schedule of the full run). `strategy`: None is one process. `hooks` (a TrainHooks)
    lets a measurement look inside a step on every rank. `model_fn` (ModelConfig -> module with the DiT's interface)
    trains a variant instead of `DiT`, for the chapters that compare designs."""
    strategy = strategy or Strategy()
    tc, run = cfg.train, cfg.run
    device = strategy.device or resolve_device(run.device)
    use_tf32(device, tc.precision)
    check_batch_split(tc.global_batch_size, strategy.data_world_size, tc.grad_accum)
    if tc.fast == "on" and not strategy.one_process:
        raise ConfigError(f"train.fast=on is the one-process path, but this launcher runs "
                          f"{type(strategy).__name__}; use --fast off (or auto) with parallel launchers.")
    Objective.check(cfg, strategy)
    fast = fast_enabled(tc.fast, device, strategy.one_process, tc.precision) and Objective.compiles_whole(cfg)
    resume = resume_point(cfg)
    data = data or load_data(cfg, "train", "cpu")
    check_data_fits(cfg, data)

    folder = RunFolder(cfg)
    strategy.agree(first_error(folder.lock) if strategy.is_main else None)   # rank 0 owns the folder from here
    try:
        guard = DivergenceGuard(cfg, Path(run.results_dir), resume.start, DivergenceGuard.history(resume.state),
                                run.resume, resume.changes, strategy.is_main)
        loop = Loop(cfg, strategy, hooks or TrainHooks(), device, fast, guard)
        loop.build(model_fn, data)
        loop.resume(resume, folder, model_fn is not None)
        return loop.run(resume, folder, quiet, stop_at)
    finally:
        folder.release()


class Loop:
    """One run of the loop on one rank: `build` the model, its engine, EMA and objective; `resume` them from a
    checkpoint (or keep the fresh ones); `run` the steps."""

    def __init__(self, cfg: Config, strategy: Strategy, hooks: TrainHooks, device: torch.device, fast: bool,
                 guard: DivergenceGuard):
        self.cfg, self.strategy, self.hooks, self.device, self.fast, self.guard = cfg, strategy, hooks, device, fast, guard

    def weights(self) -> list:
        """[non-finite weights, the weights' sum of squares], over every rank: what the divergence guard judges."""
        return self.strategy.all_reduce_sum(self.engine.weight_stats().to(self.device)).tolist()

    def build(self, model_fn, data: MNIST) -> None:
        cfg, tc, strategy = self.cfg, self.cfg.train, self.strategy
        torch.manual_seed(tc.seed)  # same initial weights on every rank and every run
        self.model = (model_fn or DiT)(cfg.model).to(self.device)
        if tc.recompute != "none":
            self.model.set_recompute(tc.recompute, tc.recompute_blocks)
        self.data = data.to(self.device)
        self.engine: Engine = strategy.make_engine(self.model, cfg, self.device)
        if cfg.run.dump_grads:
            self.engine.grad_probe = GradDump(self.engine, cfg, strategy, self.fast, self.guard.start)
        self.ema = self.engine.make_ema()
        self.objective = Objective(cfg, self.device, self.model)
        shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        if self.fast:
            # The fast path: batches drawn on the GPU, the whole loss compiled, losses read back only at log steps
            # (each read makes the host wait for the GPU).
            self.draw = DeviceBatches(self.data, tc.seed, tc.global_batch_size, cfg.diffusion.timesteps,
                                      cfg.diffusion.label_dropout, shape)
            self.loss_fn = MicroBatchLoss(strategy, self.objective, self.engine.wrapped,
                                          compile_with=lambda fn: compiled(fn, tc.compile_mode))
        else:
            # the determinism contract's global batch of a step (CPU generators, equal on every rank)
            self.draw = lambda step: global_batch(tc.seed, step, tc.global_batch_size, len(self.data),
                                                  cfg.diffusion.timesteps, cfg.diffusion.label_dropout, shape)
            self.loss_fn = MicroBatchLoss(strategy, self.objective, self.engine.forward)
        self.guard.baseline(self.weights())     # the freshly initialised weights' norm: what divergence is judged by

    def resume(self, resume: ResumePoint, folder: RunFolder, variant: bool) -> None:
        """Load the checkpoint (whatever the engine's files: DeepSpeed's partitions, one optimizer file per stage),
        refuse it if its weights are non-finite or far from a healthy run's; then, everything checked, let the run
        folder drop what a resume replaces. run.init_from: only the weights of a checkpoint folder (e.g. Meta's DiT,
        python -m dit_core.convert meta), into the model and the EMA, at step 0 with a fresh optimizer; the divergence
        guard keeps the freshly initialised weights' norm as its baseline."""
        run = self.cfg.run
        if starts_from_weights(self.cfg, resume.state):
            path = Path(run.init_from)
            like = self.model if variant else None
            self.engine.load_weights(load_ema(path, "cpu", like, name="model.pt"))
            self.ema.load_state_dict(load_ema(path, self.device, like))
            self.guard.check_loaded(self.weights(), run.init_from)
        if run.resume:
            self.engine.load(Path(run.resume), self.device)
            self.ema.load_state_dict(load_ema(Path(run.resume), self.device, self.model if variant else None))
            self.guard.check_loaded(self.weights(), run.resume)
        # Only now may the folder's old contents change (truncate, discard).
        self.strategy.agree(first_error(folder.prepare, resume.start) if self.strategy.is_main else None)

    def run(self, resume: ResumePoint, folder: RunFolder, quiet: bool, stop_at: int | None) -> TrainResult:
        cfg, tc, strategy, engine, hooks = self.cfg, self.cfg.train, self.strategy, self.engine, self.hooks
        accum, W = tc.grad_accum, strategy.data_world_size
        results = Path(cfg.run.results_dir)
        start, samples_seen = resume.start, resume.samples_seen
        if strategy.is_main and resume.changes:
            print(f"[resume] from the command line: {'; '.join(resume.changes)}; the schedule is recomputed at step "
                  f"{start} (lr now {engine.lr():.3g})", file=sys.stderr, flush=True)
        out = TrainResult(model=self.model, ema=self.ema, steps=start)
        log = StepLog(self, folder, start, quiet, out)
        end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        try:
            for step in range(start, end):
                gb = self.draw(step)
                hooks.step_begin(step, engine)
                micro_batches = []
                for micro in range(accum):          # this rank's slice of the global batch, in accum pieces
                    b = shard(gb, strategy.data_rank, W, micro, accum).to(self.device)
                    micro_batches.append((*self.data.gather(b.indices, b.flip), b))
                loss_sum = engine.run_step(step, micro_batches, self.loss_fn, hooks)
                lr = engine.lr()
                grad_norm = engine.step()
                hooks.step_end(step, engine)
                engine.update_ema(self.ema, tc.ema_decay, step)
                samples_seen += tc.global_batch_size
                # The logged loss is the mean over the whole global batch (all ranks).
                log.add({"step": step, "loss": strategy.all_reduce_mean(loss_sum / accum), "grad_norm": grad_norm,
                         "lr": lr, "samples_seen": samples_seen, **self.objective.record(strategy, accum)})
                done = step + 1
                if done % log.every == 0 or done == end:
                    log.read_back()
                if tc.ckpt_every and done % tc.ckpt_every == 0 and done != end:
                    log.read_back()                  # the weights about to be saved were just checked finite
                    save_checkpoint(results, done, engine, self.ema, cfg, samples_seen, strategy, self.guard.state())
            out.seconds = time.perf_counter() - log.t0
            out.steps = end
            if not cfg.run.save_final:
                out.last_checkpoint = None       # a measurement: its log (and report) is what it leaves
            elif end > start or not cfg.run.resume:
                out.last_checkpoint = save_checkpoint(results, end, engine, self.ema, cfg, samples_seen, strategy,
                                                      self.guard.state())
            elif strategy.is_main:
                out.last_checkpoint = Path(cfg.run.resume)      # nothing trained: the resumed checkpoint is the last
        finally:
            log.close()
        return out


class StepLog:
    """The steps of one interval, their loss and gradient norm still on the GPU, read back with one wait; then judged
    by the divergence guard (with the weights' count of non-finite entries and norm: a NaN weight stays NaN, so one
    look per interval suffices) and written by rank 0 to the log, TensorBoard and the progress bar."""

    def __init__(self, loop: Loop, folder: RunFolder, start: int, quiet: bool, out: TrainResult):
        tc = loop.cfg.train
        self.loop, self.out, self.tc = loop, out, tc
        self.every = tc.log_every if loop.fast else 1
        self.pending: list[dict] = []
        self.logger = self.tb = self.bar = None
        if loop.strategy.is_main:
            self.logger = JsonlLogger(folder.log, append=True)      # prepare() left only the steps before `start`
            if tc.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(loop.cfg.run.results_dir) / "tb"))
            if not quiet:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=tc.max_steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
        self.t0 = time.perf_counter()

    def add(self, record: dict) -> None:
        self.pending.append(record)

    def read_back(self) -> None:
        pending, loop = self.pending, self.loop
        if not pending:
            return
        n = len(pending)
        # float64 holds every float32 loss and norm exactly, and a norm an engine computed in float64 as it is
        values = torch.stack([v.double().reshape(()) for v in [r["loss"] for r in pending] +
                              [r["grad_norm"] for r in pending]]).tolist()
        for i, r in enumerate(pending):
            r["loss"], r["grad_norm"] = values[i], values[n + i]
        stats = loop.weights()
        if self.logger is not None:
            for r in pending:
                self.logger.write(r)      # the log keeps the step that diverged: the evidence
        for r in pending:
            loop.guard.step(r["step"], r["loss"], r["grad_norm"], r["lr"])
            self.out.losses.append(r["loss"])
        loop.guard.weights(stats, pending[-1]["step"], pending[-1]["lr"])
        if loop.strategy.is_main:
            for r in pending:
                if self.tb is not None and (r["step"] % self.tc.log_every == 0 or r["step"] == self.tc.max_steps - 1):
                    for k in ("loss", "grad_norm", "lr"):
                        self.tb.add_scalar(f"train/{k}", r[k], r["step"])
            if self.bar is not None:
                self.bar.update(len(pending))
                self.bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}", refresh=False)
            loop.hooks.logged(list(pending), loop.ema, time.perf_counter() - self.t0)
        pending.clear()

    def close(self) -> None:
        for thing in (self.logger, self.tb, self.bar):
            if thing is not None:
                thing.close()


class GradDump:
    """Writes every parameter's gradient of step run.dump_grads_step (synchronised across ranks, unscaled, before
    clipping) to run.dump_grads, once: `python -m dit_core.parity grads A B` compares two runs layer by layer, the
    first place a bug shows."""

    def __init__(self, engine: Engine, cfg: Config, strategy: Strategy, fast: bool, start: int):
        run = cfg.run
        if not engine.gradients_are_whole:
            raise ConfigError(f"--dump-grads needs every parameter's whole gradient on one rank, but this launcher's "
                              f"engine ({type(engine).__name__}) holds only this rank's slices of them; dump from "
                              f"launchers/single.py or a data-parallel launcher instead.")
        if fast:
            raise ConfigError("--dump-grads compares runs of the determinism contract, but the fast path is on; "
                              "add --fast off.")
        if not start <= run.dump_grads_step < cfg.train.max_steps:
            raise ConfigError(f"run.dump_grads_step={run.dump_grads_step} is not a step this run trains "
                              f"({start} to {cfg.train.max_steps - 1}); choose one of them.")
        self.path, self.at, self.main, self.step = Path(run.dump_grads), run.dump_grads_step, strategy.is_main, start

    def __call__(self, engine: Engine) -> None:
        step, self.step = self.step, self.step + 1
        if step != self.at:
            return
        grads = engine.named_gradients()          # every rank calls it (ZeRO-3 gathers)
        if self.main:
            write_atomic(self.path, lambda tmp: torch.save(
                {"step": step, "grads": {n: g.detach().float().cpu().clone() for n, g in grads.items()}}, tmp))
