"""The training loop every launcher reuses.

A launcher decides only two things, through a `Parallel` object (dit_core.engine): how the model
is wrapped (and its gradients synchronised) and which slice of the global batch this rank trains
on. Everything else, the loss, AMP, clipping, LR schedule, EMA, accumulation, checkpoints, logs and
the guards (one run per results folder, no diverged state saved or trained on), is here, once.
"""
from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .batch import check_batch_split, global_batch, shard
from .checkpoint import (CheckpointError, check_model_config, check_resume, checkpoint_steps,  # noqa: F401
                         load_model_weights, model_from_checkpoint, read_training_state, save_checkpoint,
                         torch_load)
from .config import Config, ConfigError
from .data import MNIST, load_mnist
from .diffusion import Diffusion
from .engine import (EMA, Parallel, TorchEngine, TrainHooks, apply_schedule, autocast_ctx, build_optimizer,  # noqa: F401
                     build_scheduler, compiled, ema_decay, ema_update, lr_factor, resolve_device, unwrap)
from .fast import DeviceBatches, fast_enabled
from .model import DiT, balance_loss, moe_layers
from .logs import JsonlLogger
from .rundir import RunFolder
from .errors import DivergenceError  # noqa: F401  (its name stays importable from here)


class DivergenceGuard:
    """Stops a diverging run before anything is saved from it, and says which checkpoint is still safe.

    Non-finite: fp32 and bf16 stop at the first non-finite loss or gradient norm (the step it produced would put
    NaN into the weights). fp16: the loss scaler skips a step whose gradients overflow and halves its scale, so a
    few skipped steps are the scaler working; `train.max_nonfinite_steps` skipped steps in a row mean no scale
    helps any more. Any non-finite weight stops every precision.

    Finite but diverged, as users meet it: a loss above `train.diverge_loss` times its running level (the median
    of the last WINDOW finite losses, checked once SETTLE are known, so the first steps' fall is not judged), or
    weights whose norm is above `train.diverge_weights` times their norm at initialisation.

    Where it began: walking back from the step that stopped the run while the loss stays above CLIMB x the level
    gives the first step of the climb, s. The loss at step s was computed with checkpoint-s's weights, so the
    checkpoints from s on are unsafe: they are renamed diverged-checkpoint-N (kept for a look, never resumed by
    --resume auto) and the message names the last one before s. The last WINDOW losses travel in each checkpoint
    (training_state.json), so a resumed run judges its first steps against the level before it."""

    WINDOW, SETTLE, CLIMB = 50, 20, 2.0

    def __init__(self, cfg: Config, results_dir: Path, start: int = 0, history=(), resumed: str = "",
                 changes=(), is_main: bool = True):
        self.t, self.results = cfg.train, Path(results_dir)
        self.allowed = self.t.max_nonfinite_steps if self.t.precision == "fp16" else 1
        self.run_of: list[int] = []
        self.losses: list[tuple[int, float]] = [(int(s), float(v)) for s, v in history][-self.WINDOW:]
        self.start, self.resumed, self.is_main = start, resumed, is_main
        self.lr_changed = any(c.startswith(("train.lr ", "train.warmup_steps ")) for c in changes)
        self.norm0 = None                # the weights' norm at initialisation (all ranks' pieces)

    # ---------------------------------------------------------------- what a checkpoint carries
    def state(self) -> dict:
        return {"recent_losses": [[s, v] for s, v in self.losses[-self.WINDOW:]]}

    @staticmethod
    def history(training_state: dict) -> list:
        got = (training_state.get("guard") or {}).get("recent_losses") or []
        return [(s, v) for s, v in got if isinstance(s, int) and isinstance(v, (int, float))]

    # ---------------------------------------------------------------- the weights
    def baseline(self, stats) -> None:
        """`stats`: weight_stats of the freshly initialised model, summed over ranks."""
        sq = float(stats[1])
        self.norm0 = math.sqrt(sq) if sq > 0 else None

    def ratio(self, stats) -> float | None:
        if self.norm0 is None:
            return None
        return math.sqrt(max(float(stats[1]), 0.0)) / self.norm0 if math.isfinite(float(stats[1])) else math.inf

    def check_loaded(self, stats, path: str) -> None:
        """A checkpoint whose weights are non-finite, or far from any healthy run's, is refused before training."""
        folder = Path(path)
        earlier = [n for n in checkpoint_steps(folder.parent) if n < read_training_state(folder)["step"]]

        def instead() -> str:
            return (f"resume from the checkpoint before it, '{folder.parent / f'checkpoint-{earlier[-1]}'}'" if earlier
                    else f"no earlier checkpoint is in '{folder.parent}': start the run again, with a lower train.lr")
        if float(stats[0]) > 0:
            raise CheckpointError(f"Checkpoint '{path}' holds {int(float(stats[0]))} non-finite weights: the run "
                                  f"that wrote it had diverged (or the file was damaged); {instead()}.")
        r, k = self.ratio(stats), self.t.diverge_weights
        if k and r is not None and r > k:
            raise CheckpointError(f"Checkpoint '{path}' holds weights whose norm is {r:.3g} x a freshly initialised "
                                  f"model's (train.diverge_weights={k:g}; healthy runs stay within a few times): the "
                                  f"run that wrote it had diverged; {instead()}.")

    def weights(self, stats, step: int, lr: float) -> None:
        bad = float(stats[0])
        if bad > 0:
            raise self._stop(f"{int(bad)} weights became non-finite by step {step}", step + 1, lr, finite=False)
        r, k = self.ratio(stats), self.t.diverge_weights
        if k and r is not None and r > k:
            raise self._stop(f"the weights' norm grew to {r:.3g} x its value at initialisation by step {step} "
                             f"(train.diverge_weights={k:g})", step + 1, lr)

    # ---------------------------------------------------------------- the loss
    def step(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.run_of.append(step)
            if len(self.run_of) >= self.allowed:
                what = (f"the {'loss' if not math.isfinite(loss) else 'gradient norm'} became "
                        f"{loss if not math.isfinite(loss) else grad_norm} at step {step}" if self.allowed == 1 else
                        f"the fp16 loss scaler skipped {len(self.run_of)} steps in a row (non-finite loss or "
                        f"gradients at steps {self.run_of[0]}-{step}; train.max_nonfinite_steps={self.allowed})")
                raise self._stop(what, self.run_of[0], lr, finite=False)
            return
        self.run_of.clear()
        k = self.t.diverge_loss
        if k and len(self.losses) >= self.SETTLE:
            level = self._level()
            if level > 0 and loss > k * level:
                raise self._stop(f"the loss was {loss:.3g} at step {step}, {loss / level:.3g} x its running level "
                                 f"{level:.3g} (the median of the last {min(len(self.losses), self.WINDOW)} steps; "
                                 f"train.diverge_loss={k:g})", step, lr)
        self.losses.append((step, loss))
        del self.losses[:-4 * self.WINDOW]      # enough to walk back a climb; a checkpoint keeps WINDOW

    def _level(self, upto: int | None = None) -> float:
        """The running level: the median of the last WINDOW finite losses (before index `upto`)."""
        past = self.losses[:upto] if upto is not None else self.losses
        return statistics.median(v for _, v in past[-self.WINDOW:])

    def _onset(self, first_bad: int) -> int:
        """The first step of the climb that ends at `first_bad`: walking back, each loss above CLIMB x the level
        of the steps before it belongs to the climb. Without SETTLE steps before it, a step is not judged."""
        onset = first_bad
        for i in range(len(self.losses) - 1, self.SETTLE - 1, -1):
            s, v = self.losses[i]
            if s >= first_bad:
                continue
            if v > self.CLIMB * self._level(i):
                onset = s
            else:
                break
        return onset

    # ---------------------------------------------------------------- the sentence
    def _stop(self, what: str, first_bad: int, lr: float, finite: bool = True) -> DivergenceError:
        """`first_bad`: the lowest checkpoint index whose weights are known bad (a loss at step s used
        checkpoint-s's weights; weights wrong after step s are checkpoint-(s+1)'s)."""
        t = self.t
        onset = self._onset(first_bad)
        unsafe = [n for n in _steps(self.results, "checkpoint-", "diverged-checkpoint-") if n >= onset]
        if self.is_main:
            _set_aside(self.results, unsafe)
        kept = [n for n in checkpoint_steps(self.results) if n < onset]
        began = f"the loss began to climb at step {onset}" if onset < first_bad else f"step {first_bad}"
        if kept:
            after = f"resume from {self.results / f'checkpoint-{kept[-1]}'}, the last written before {began}"
        else:
            after = f"start again: no checkpoint was written before {began}"
        if unsafe:
            after += (f" (checkpoint-{', checkpoint-'.join(map(str, unsafe))}, written after it, "
                      f"{'is' if len(unsafe) == 1 else 'are'} renamed diverged-checkpoint-N and never resumed)")
        if not finite and self.resumed and first_bad <= self.start + 1 and not self.lr_changed:
            # the same rate trained this run healthily up to the checkpoint: the checkpoint is the suspect
            from .checkpoint import resume_instead
            return DivergenceError(f"{what}, the first step after resuming from '{self.resumed}' at the rate that "
                                   f"run trained with, so that checkpoint (its weights or optimizer state) is the "
                                   f"likely cause, not the learning rate; {resume_instead(Path(self.resumed))}.")
        fix = (f"lower train.lr (the rate at that step was {lr:.3g}, train.lr={t.lr:g})" if t.grad_clip > 0 else
               f"turn on clipping (train.grad_clip=0 now, e.g. --set train.grad_clip=1.0) or lower train.lr "
               f"(the rate at that step was {lr:.3g})")
        return DivergenceError(f"{what}, in {t.precision} with train.grad_clip={t.grad_clip:g}; the run stopped and "
                               f"saved nothing from it: {fix}, then {after}.")


def _steps(results: Path, *prefixes: str) -> list[int]:
    """The steps of the folders in `results` named <prefix><step>."""
    if not results.is_dir():
        return []
    return sorted({int(p.name[len(pre):]) for p in results.iterdir() for pre in prefixes
                   if p.is_dir() and p.name.startswith(pre) and p.name[len(pre):].isdigit()})


def _set_aside(results: Path, steps: list[int]) -> None:
    """Rename checkpoint-N to diverged-checkpoint-N (rank 0, holding the folder's lock): kept for a look, never
    picked by --resume auto nor mistaken for a healthy state."""
    for n in steps:
        try:
            (results / f"checkpoint-{n}").rename(results / f"diverged-checkpoint-{n}")
        except OSError:
            pass                        # gone already, or a read-only folder: the sentence still names them


def check_data_fits(cfg: Config, data: MNIST) -> None:
    """The model's data-facing settings must describe the images it will be given, and the images be numbers: a NaN
    in the data would show as a NaN loss and be blamed on the learning rate."""
    from .data import DataError
    if data.images.is_floating_point():
        bad = ~torch.isfinite(data.images.reshape(len(data), -1)).all(dim=1)
        if bool(bad.any()):
            raise DataError(f"{int(bad.sum())} of the {len(data)} training images hold non-finite values (the first "
                            f"is image {int(bad.nonzero()[0])}): the data are damaged, not the run; rebuild them.")
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

    start, samples_seen, changes, state = 0, 0, [], {}
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
    par.agree(first_error(folder.lock) if par.is_main else None)   # rank 0 owns the folder from here
    try:
        guard = DivergenceGuard(cfg, Path(run.results_dir), start, DivergenceGuard.history(state), run.resume,
                                changes, par.is_main)
        return _train(cfg, par, hooks, device, fast, start, samples_seen, changes, data, folder, quiet, stop_at,
                      model_fn, guard)
    finally:
        folder.release()


def first_error(fn, *args) -> Exception | None:
    from .errors import user_errors
    try:
        fn(*args)
    except user_errors() as e:
        return e
    return None


def _train(cfg, par, hooks, device, fast, start, samples_seen, changes, data, folder, quiet, stop_at, model_fn,
           guard):
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
    weights = lambda: par.all_reduce_sum(engine.weight_stats().to(device)).tolist()   # noqa: E731
    guard.baseline(weights())                # the freshly initialised weights' norm: what divergence is judged by
    if run.resume:
        engine.load(Path(run.resume), device)
        ema.load_state_dict(_load_ema(Path(run.resume), device, model if model_fn else None))
        # whatever the engine's files (DeepSpeed's partitions, one optimizer file per stage): finite and near a
        # healthy run's norm, or refused
        guard.check_loaded(weights(), run.resume)
    # Everything checked: only now may the folder's old contents change (truncate, discard).
    par.agree(first_error(folder.prepare, start) if par.is_main else None)
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
        stats = weights()
        if par.is_main:
            for r in pending:
                logger.write(r)      # the log keeps the step that diverged: the evidence
        for r in pending:
            guard.step(r["step"], r["loss"], r["grad_norm"], r["lr"])
            out.losses.append(r["loss"])
        guard.weights(stats, pending[-1]["step"], pending[-1]["lr"])
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
                save_checkpoint(results, done, engine, ema, cfg, samples_seen, par, guard.state())
        out.seconds = time.perf_counter() - t0
        out.steps = end
        if not run.save_final:
            out.last_checkpoint = None       # a measurement: its log (and report) is what it leaves
        elif end > start or not run.resume:
            out.last_checkpoint = save_checkpoint(results, end, engine, ema, cfg, samples_seen, par, guard.state())
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


def _load_ema(folder: Path, device, like: nn.Module | None = None) -> dict:
    """ema.pt, checked against the model the checkpoint was trained as (a variant's own module when `like` is given)."""
    from .checkpoint import load_ema
    return load_ema(folder, device, like)
