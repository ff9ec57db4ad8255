"""The training loop every launcher reuses.

A launcher decides only two things, through a `Parallel` object (dit_core.engine): how the model
is wrapped (and its gradients synchronised) and which slice of the global batch this rank trains
on. Everything else, the loss, AMP, clipping, LR schedule, EMA, accumulation, checkpoints, logs and
the guards (one run per results folder, no diverged state saved or trained on), is here, once.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .batch import global_batch, shard
from .checkpoint import (CheckpointError, check_model_config, check_resume, checkpoint_steps,  # noqa: F401
                         load_model_weights, model_from_checkpoint, read_training_state, save_checkpoint,
                         torch_load)
from .config import Config, ConfigError
from .data import MNIST, load_mnist
from .diffusion import Diffusion
from .engine import (EMA, Parallel, TorchEngine, apply_schedule, autocast_ctx, build_optimizer,  # noqa: F401
                     build_scheduler, compiled, ema_decay, ema_update, lr_factor, resolve_device, unwrap)
from .fast import DeviceBatches, fast_enabled
from .model import DiT, balance_loss, moe_layers
from .parallel.dist import check_batch_split
from .logs import JsonlLogger
from .rundir import RunFolder


class DivergenceError(RuntimeError):
    """The loss or the weights stopped being finite: the run stops and saves nothing after it."""


class DivergenceGuard:
    """Stops a run whose loss, gradients or weights are no longer finite, before anything is saved from it.

    fp32 and bf16: the first non-finite loss or gradient norm stops the run (the step it produced would
    put NaN into the weights). fp16: the loss scaler skips a step whose gradients overflow and halves its
    scale, so a few skipped steps are the scaler working; `train.max_nonfinite_steps` skipped steps in a
    row mean no scale helps any more, and stop it. Any non-finite weight stops every precision."""

    def __init__(self, cfg: Config, results_dir: Path):
        self.t, self.results = cfg.train, Path(results_dir)
        self.allowed = self.t.max_nonfinite_steps if self.t.precision == "fp16" else 1
        self.run_of: list[int] = []

    def _stop(self, what: str, step: int, lr: float) -> DivergenceError:
        t = self.t
        kept = checkpoint_steps(self.results)
        after = (f"resume from {self.results / f'checkpoint-{kept[-1]}'}" if kept else "start again")
        fix = (f"lower train.lr (the rate at that step was {lr:.3g}, train.lr={t.lr:g})" if t.grad_clip > 0 else
               f"turn on clipping (train.grad_clip=0 now, e.g. --set train.grad_clip=1.0) or lower train.lr "
               f"(the rate at that step was {lr:.3g})")
        return DivergenceError(f"{what}, in {t.precision} with train.grad_clip={t.grad_clip:g}; the run stopped and "
                               f"saved nothing from it: {fix}, then {after}.")

    def step(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.run_of.clear()
            return
        self.run_of.append(step)
        if len(self.run_of) >= self.allowed:
            what = (f"the {'loss' if not math.isfinite(loss) else 'gradient norm'} became "
                    f"{loss if not math.isfinite(loss) else grad_norm} at step {step}" if self.allowed == 1 else
                    f"the fp16 loss scaler skipped {len(self.run_of)} steps in a row (non-finite loss or gradients "
                    f"at steps {self.run_of[0]}-{step}; train.max_nonfinite_steps={self.allowed})")
            raise self._stop(what, step, lr)

    def weights(self, bad: float, step: int, lr: float) -> None:
        if bad > 0:
            raise self._stop(f"{int(bad)} weights became non-finite by step {step}", step, lr)


def check_data_fits(cfg: Config, data: MNIST) -> None:
    """The model's data-facing settings must describe the images it will be given."""
    m = cfg.model
    for key, want, have in (("in_channels", data.channels, m.in_channels), ("image_size", data.images.shape[-1],
                            m.image_size), ("num_classes", data.num_classes, m.num_classes)):
        if want != have:
            raise ConfigError(f"model.{key}={have} does not fit the data (MNIST has {key.replace('_', ' ')} "
                              f"{want}); use {want}.")


class MoEObjective:
    """For a mixture-of-experts DiT: the loss trained is the diffusion loss plus model.aux_loss_weight x the
    load-balancing loss (the mean over MoE layers of each layer's mean over routing groups). Each group lies
    inside one micro-batch of one rank, so every rank's term is a mean over its own groups, and the mean over
    ranks and micro-steps is the mean over every group of the global batch: the same on one process and on N,
    with no collective. The log keeps both parts and the tokens each expert received."""

    def __init__(self, model: nn.Module, cfg: Config):
        self.layers, self.weight = moe_layers(model), cfg.model.aux_loss_weight
        self.reset()

    def reset(self) -> None:
        self.aux = self.diffusion = self.counts = 0

    def wrap(self, loss_fn):
        def loss_with_balance(*args):
            loss = loss_fn(*args)
            aux = torch.stack([balance_loss(m) for m in self.layers]).mean()
            self.aux, self.diffusion = self.aux + aux.detach(), self.diffusion + loss.detach()
            self.counts = self.counts + torch.stack([m.stats[0].sum(0) for m in self.layers])
            return loss + self.weight * aux
        return loss_with_balance

    def record(self, par, accum: int) -> dict:
        """This step's share of the log: means over the global batch, tokens per expert summed over it."""
        out = {"diffusion_loss": float(par.all_reduce_mean(self.diffusion / accum)),
               "aux_loss": float(par.all_reduce_mean(self.aux / accum)),
               "expert_tokens": par.all_reduce_sum(self.counts).long().tolist()}     # [layer][expert]
        self.reset()
        return out


def check_moe(cfg: Config, par) -> None:
    """A mixture-of-experts DiT needs a strategy that knows it, and routing groups that tile each micro-batch."""
    m, t = cfg.model, cfg.train
    if not m.num_experts:
        return
    if not getattr(par, "trains_moe", False):
        raise ConfigError(f"model.num_experts={m.num_experts} (a mixture-of-experts DiT) trains with python "
                          f"launchers/single.py or torchrun launchers/moe.py, not with {type(par).__name__}; use "
                          f"one of those, or model.num_experts=0 for the dense DiT.")
    micro = t.global_batch_size // (par.data_world_size * t.grad_accum)
    if micro % m.moe_aux_group:
        raise ConfigError(f"model.moe_aux_group={m.moe_aux_group} images per load-balancing group does not divide "
                          f"a micro-batch of {micro} images (train.global_batch_size={t.global_batch_size} / "
                          f"{par.data_world_size} ranks / train.grad_accum={t.grad_accum}); use a divisor of "
                          f"{micro}, e.g. --set model.moe_aux_group=1.")
    if t.fast == "on":
        raise ConfigError("train.fast=on compiles the whole loss, but the mixture of experts routes a different "
                          "number of tokens to each expert at every step; use --fast off (or auto).")


# ---------------------------------------------------------------- the loop

class TrainHooks:
    """Points inside a step where a measurement may look (every rank calls them)."""

    def step_begin(self, step: int, engine) -> None: ...

    def after_backward(self, step: int, micro: int, engine) -> None: ...

    def step_end(self, step: int, engine) -> None: ...

    def logged(self, records: list, ema: "EMA", seconds: float) -> None:
        """Rank 0, after `records` (one per step) were read back and written; `seconds` since the
        loop started, the GPU's work included (reading the loss waited for it)."""


class GradDump:
    """Writes every parameter's gradient of step run.dump_grads_step (synchronised across ranks, unscaled,
    before clipping) to run.dump_grads, once: `python -m dit_core.parity grads A B` compares two runs layer by
    layer, the first place a bug shows."""

    def __init__(self, engine, cfg: Config, par, fast: bool, start: int):
        run = cfg.run
        if not getattr(engine, "gradients_are_whole", False):
            raise ConfigError(f"--dump-grads needs every parameter's whole gradient on one rank, but the "
                              f"{type(engine).__name__} holds slices of them (tensor or pipeline parallelism); "
                              f"dump from launchers/single.py or a data-parallel launcher instead.")
        if fast:
            raise ConfigError("--dump-grads compares runs of the determinism contract, but the fast path is on; "
                              "add --fast off.")
        if not start <= run.dump_grads_step < cfg.train.max_steps:
            raise ConfigError(f"run.dump_grads_step={run.dump_grads_step} is not a step this run trains "
                              f"({start} to {cfg.train.max_steps - 1}); choose one of them.")
        self.path, self.at, self.main, self.step = Path(run.dump_grads), run.dump_grads_step, par.is_main, start
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, engine) -> None:
        step, self.step = self.step, self.step + 1
        if step != self.at:
            return
        grads = engine.named_gradients()          # every rank calls it (ZeRO-3 gathers)
        if self.main:
            tmp = self.path.with_name(self.path.name + ".tmp")
            torch.save({"step": step, "grads": {n: g.detach().float().cpu().clone() for n, g in grads.items()}}, tmp)
            tmp.replace(self.path)


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


def _contract_batch(cfg: Config, n_data: int, shape, step: int):
    """The determinism contract's global batch of `step` (CPU generators, equal on every rank)."""
    t = cfg.train
    return global_batch(t.seed, step, t.global_batch_size, n_data, cfg.diffusion.timesteps,
                        cfg.diffusion.label_dropout, shape)


def train(cfg: Config, parallel: Parallel | None = None, data: MNIST | None = None,
          quiet: bool = False, stop_at: int | None = None, hooks: "TrainHooks | None" = None,
          model_fn=None) -> TrainResult:
    """Train from scratch or from cfg.run.resume up to train.max_steps (or stop early at
    `stop_at`, as a job with a time limit would, keeping the schedule of the full run).
    `hooks` (a TrainHooks) lets a measurement look inside a step on every rank. `model_fn`
    (ModelConfig -> module with the DiT's interface) trains a variant instead of `DiT`, for the
    chapters that compare designs."""
    par = parallel or Parallel()
    hooks = hooks or TrainHooks()
    t, run = cfg.train, cfg.run
    device = par.device or resolve_device(run.device)
    if device.type == "cuda":
        # fp32 parity runs compare exact float32 math: no TF32 shortcuts.
        torch.backends.cuda.matmul.allow_tf32 = t.precision != "fp32"
        torch.backends.cudnn.allow_tf32 = t.precision != "fp32"
    accum, W = t.grad_accum, par.data_world_size
    check_batch_split(t.global_batch_size, W, accum)
    alone = type(par) is Parallel
    if t.fast == "on" and not alone:
        raise ConfigError(f"train.fast=on is the one-process path, but this launcher runs "
                          f"{type(par).__name__}; use --fast off (or auto) with parallel launchers.")
    check_moe(cfg, par)
    fast = fast_enabled(t.fast, device, alone, t.precision) and not cfg.model.num_experts

    start, samples_seen, changes = 0, 0, []
    if run.resume:
        state = read_training_state(run.resume)
        changes = check_resume(state, cfg, Path(run.resume))
        start, samples_seen = state["step"], state["samples_seen"]
        if start > t.max_steps:
            raise ConfigError(f"--resume '{run.resume}' is at step {start}, past train.max_steps={t.max_steps}; "
                              f"raise --max-steps.")
    data = data or load_mnist("train", "cpu", t.train_subset)
    check_data_fits(cfg, data)

    folder = RunFolder(cfg)
    par.agree(_first_error(folder.lock) if par.is_main else None)   # rank 0 owns the folder from here
    try:
        return _train(cfg, par, hooks, device, fast, start, samples_seen, changes, data, folder, quiet, stop_at,
                      model_fn)
    finally:
        folder.release()


def _first_error(fn, *args) -> Exception | None:
    from .errors import user_errors
    try:
        fn(*args)
    except user_errors() as e:
        return e
    return None


def _train(cfg, par, hooks, device, fast, start, samples_seen, changes, data, folder, quiet, stop_at, model_fn):
    t, run = cfg.train, cfg.run
    accum, W = t.grad_accum, par.data_world_size
    torch.manual_seed(t.seed)  # same initial weights on every rank and every run
    model = (model_fn or DiT)(cfg.model).to(device)
    if t.recompute != "none":
        model.set_recompute(t.recompute, t.recompute_blocks)
    diffusion = Diffusion(cfg.diffusion, device)
    data = data.to(device)
    engine = par.make_engine(model, cfg, device)
    if run.dump_grads:
        engine.grad_probe = GradDump(engine, cfg, par, fast, start)
    ema = engine.make_ema()
    if run.resume:
        engine.load(Path(run.resume), device)
        ema.load_state_dict(_load_ema(Path(run.resume), device))
        # whatever the engine's files (DeepSpeed's partitions, one optimizer file per stage): finite, or refused
        if float(par.all_reduce_sum(engine.nonfinite().to(device))) > 0:
            raise CheckpointError(f"Checkpoint '{run.resume}' holds non-finite weights: that run had diverged; "
                                  f"resume from an earlier checkpoint.")
    # Everything checked: only now may the folder's old contents change (truncate, discard).
    par.agree(_first_error(folder.prepare, start) if par.is_main else None)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    if fast:
        # The fast path: batches drawn on the GPU, the whole loss compiled, losses read back only
        # at log steps (each read makes the host wait for the GPU).
        draw = DeviceBatches(data, t.seed, t.global_batch_size, cfg.diffusion.timesteps,
                             cfg.diffusion.label_dropout, shape)
        loss_fn = compiled(functools.partial(par.loss, diffusion, engine.wrapped), t.compile_mode)
    else:
        draw = functools.partial(_contract_batch, cfg, len(data), shape)
        loss_fn = functools.partial(par.loss, diffusion, engine.forward)
    moe = MoEObjective(model, cfg) if cfg.model.num_experts else None
    if moe is not None:
        loss_fn = moe.wrap(loss_fn)
    read_every = t.log_every if fast else 1

    results = Path(run.results_dir)
    guard = DivergenceGuard(cfg, results)
    logger = tb = bar = None
    if par.is_main:
        if changes:
            print(f"[resume] from the command line: {'; '.join(changes)}; the schedule is recomputed at step "
                  f"{start} (lr now {engine.lr():.3g})", file=sys.stderr, flush=True)
        logger = JsonlLogger(folder.log, append=True)      # prepare() left only the steps before `start`
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(results / "tb"))
        if not quiet:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.max_steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    out = TrainResult(model=model, ema=ema, steps=start)
    pending: list[dict] = []          # this interval's steps; their loss and norm still on the GPU
    t0 = time.perf_counter()

    def read_back() -> None:
        """One wait for the GPU per interval: every pending step's loss and gradient norm at once,
        and the count of non-finite weights (a NaN weight stays NaN, so one look per interval suffices)."""
        if not pending:
            return
        n = len(pending)
        values = [r["loss"] for r in pending]
        norms_on_device = isinstance(pending[0]["grad_norm"], torch.Tensor)   # DeepSpeed returns a float
        if norms_on_device:
            values += [r["grad_norm"] for r in pending]
        values = torch.stack([v.float().reshape(()) for v in values]).tolist()
        for i, r in enumerate(pending):
            r["loss"] = values[i]
            if norms_on_device:
                r["grad_norm"] = values[n + i]
        bad = float(par.all_reduce_sum(engine.nonfinite().to(device)))
        if par.is_main:
            for r in pending:
                logger.write(r)      # the log keeps the step that diverged: the evidence
        for r in pending:
            guard.step(r["step"], r["loss"], r["grad_norm"], r["lr"])
            out.losses.append(r["loss"])
        guard.weights(bad, pending[-1]["step"], pending[-1]["lr"])
        if par.is_main:
            for r in pending:
                if tb is not None and (r["step"] % t.log_every == 0 or r["step"] == t.max_steps - 1):
                    for k in ("loss", "grad_norm", "lr"):
                        tb.add_scalar(f"train/{k}", r[k], r["step"])
            if bar is not None:
                bar.update(len(pending))
                bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}", refresh=False)
            hooks.logged(list(pending), ema, time.perf_counter() - t0)
        pending.clear()

    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    try:
        for step in range(start, end):
            gb = draw(step)
            hooks.step_begin(step, engine)
            micro_batches = []
            for micro in range(accum):          # this rank's slice of the global batch, in accum pieces
                b = shard(gb, par.data_rank, W, micro, accum).to(device)
                micro_batches.append((*data.gather(b.indices), b))
            loss_sum = engine.run_step(step, micro_batches, loss_fn, hooks)
            lr = engine.lr()
            grad_norm = engine.step()
            hooks.step_end(step, engine)
            engine.update_ema(ema, t.ema_decay, step)
            samples_seen += t.global_batch_size
            # The logged loss is the mean over the whole global batch (all ranks).
            pending.append({"step": step, "loss": par.all_reduce_mean(loss_sum / accum), "grad_norm": grad_norm,
                            "lr": lr, "samples_seen": samples_seen, **(moe.record(par, accum) if moe else {})})
            done = step + 1
            if done % read_every == 0 or done == end:
                read_back()
            if t.ckpt_every and done % t.ckpt_every == 0 and done != end:
                read_back()                  # the weights about to be saved were just checked finite
                save_checkpoint(results, done, engine, ema, cfg, samples_seen, par)
        out.seconds = time.perf_counter() - t0
        out.steps = end
        if not run.save_final:
            out.last_checkpoint = None       # a measurement: its log (and report) is what it leaves
        elif end > start or not run.resume:
            out.last_checkpoint = save_checkpoint(results, end, engine, ema, cfg, samples_seen, par)
        elif par.is_main:
            out.last_checkpoint = Path(run.resume)      # nothing trained: the resumed checkpoint is the last
    finally:
        if par.is_main:
            logger.close()
            if tb is not None:
                tb.close()
            if bar is not None:
                bar.close()
    return out


def _load_ema(folder: Path, device) -> dict:
    from .checkpoint import check_finite
    return check_finite(torch_load(folder / "ema.pt", device), folder / "ema.pt")
