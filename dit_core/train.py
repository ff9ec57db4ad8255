"""The training step and loop every launcher reuses.

A launcher decides only two things, through a `Parallel` object: how the model
is wrapped (and its gradients synchronised) and which slice of the global batch
this rank trains on. Everything else, the loss, AMP, clipping, LR schedule, EMA,
accumulation, checkpoints and logs, is here, once.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .batch import global_batch, shard
from .config import Config, ConfigError
from .data import MNIST, load_mnist
from .diffusion import Diffusion
from .fast import DeviceBatches, fast_enabled
from .model import DiT, sdpa_attention
from .parallel.dist import check_batch_split
from .parity import JsonlLogger

class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the config."""


class Parallel:
    """Single process. Parallel strategies (dit_core.parallel.*) provide the same few members."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None   # None: from run.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which slice of the global batch this rank trains on. Ranks that split one sample's work
        (sequence or tensor parallelism) share a data rank."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        return self.world_size

    def loss(self, diffusion: Diffusion, model, x0, y, t, noise, drop) -> torch.Tensor:
        """This rank's loss of one micro-batch (sequence parallelism: its share of it)."""
        return diffusion.loss(model, x0, y, t, noise, drop)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module):
        """Context for micro-steps whose gradients must not be synchronised yet."""
        return contextlib.nullcontext()

    def finish_gradient_sync(self, model: nn.Module) -> None:
        """Called after the last backward of a step, before clipping and the optimizer."""

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """Clip to the norm of the whole model's gradient; returns the norm before clipping. (Tensor
        parallelism overrides it: there each rank holds only slices of some gradients.)"""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def barrier(self) -> None:
        """Wait for every rank (checkpoints written by several ranks)."""

    def make_engine(self, model: nn.Module, cfg: Config, device: torch.device) -> "TorchEngine":
        """Who does backward and the optimizer step. DeepSpeed hands back its own engine."""
        return TorchEngine(model, self, cfg, device)


def compiled(fn, mode: str):
    """torch.compile with the config's mode ("none": the function itself)."""
    return fn if mode == "none" else torch.compile(fn, mode=mode)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' but no CUDA GPU is visible; use --device cpu or --device auto.")
    return torch.device(name)


def autocast_ctx(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_ratio at max_steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_decay(decay: float, num_updates: int) -> float:
    # Warm-up the decay so short runs still average mostly trained weights.
    return min(decay, (1 + num_updates) / (10 + num_updates))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, num_updates: int) -> None:
    d = ema_decay(decay, num_updates)
    pairs = [(e, p.detach().to(e.dtype)) for e, p in zip(ema.parameters(), model.parameters())]
    if pairs:
        # One multi-tensor kernel instead of one launch per parameter (same lerp, element by element).
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - d)


def unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------- the optimizer side

class EMA:
    """Exponential moving average of the weights, kept whole on every rank."""

    def __init__(self, model: nn.Module):
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        if isinstance(self.module, DiT):
            # The EMA is read alone (sampling, evaluation), never inside the parallel step:
            # plain attention, whatever the training model had swapped in.
            self.module.set_attention(sdpa_attention)

    def update(self, model: nn.Module, decay: float, num_updates: int) -> None:
        ema_update(self.module, model, decay, num_updates)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)


class TorchEngine:
    """Backward, gradient sync, clipping, optimizer and LR step, checkpoint files: plain PyTorch.

    `dit_core.parallel.zero` provides the same members on top of a DeepSpeed engine, which
    owns all of these jobs itself (accumulation, clipping, partitioned optimizer state).
    """

    name = "torch"
    saves_on_every_rank = False      # DeepSpeed: every rank writes its own partition

    def __init__(self, model: nn.Module, par: Parallel, cfg: Config, device: torch.device):
        t = cfg.train
        self.model, self.par = model, par
        self.autocast = t.precision      # fp32 params, bf16/fp16 matmuls (DeepSpeed casts the model instead)
        self.optimizer, self.scheduler = build_optimizer(model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
        self.accum = t.grad_accum
        self.clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.wrapped = par.wrap(model)
        self.forward = compiled(self.wrapped, t.compile_mode) if t.compile else self.wrapped

    def micro_step(self, last: bool):
        """Context of one micro-batch's forward and backward: only the last one synchronises."""
        return contextlib.nullcontext() if last else self.par.no_sync(self.wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        # Each micro-batch is 1/accum of this rank's share: the gradient of the mean.
        scaled = loss / self.accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> torch.Tensor:
        """Synchronise, clip, step, zero, schedule; returns the gradient norm before clipping (a
        tensor: reading it would make the host wait for the GPU, so the loop reads it at log steps)."""
        self.par.finish_gradient_sync(self.wrapped)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.par.clip_grad_norm_(self.params, self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm.detach()

    def make_ema(self) -> EMA:
        return EMA(self.model)

    def update_ema(self, ema: EMA, decay: float, num_updates: int) -> None:
        ema.update(self.model, decay, num_updates)

    def state_info(self) -> dict:
        return {}

    def save(self, folder: Path) -> None:
        torch.save(unwrap(self.model).state_dict(), folder / "model.pt")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None},
                   folder / "optimizer.pt")

    def load(self, folder: Path, device: torch.device) -> None:
        state = read_training_state(folder)
        if "tp_degree" in state:
            raise CheckpointError(
                f"Checkpoint '{folder}' was written by launchers/tp.py (--tp-degree {state['tp_degree']}, "
                f"{state.get('world_size')} processes), whose optimizer state is sliced per rank; resume it with "
                f"torchrun --nproc_per_node {state.get('world_size')} launchers/tp.py --tp-degree {state['tp_degree']} "
                f"(its model.pt and ema.pt are whole weights: python -m dit_core.evaluate reads them).")
        check_files(folder, ("model.pt", "optimizer.pt"))
        load_model_weights(folder, self.model)
        opt_state = _torch_load(folder / "optimizer.pt", device)
        self.optimizer.load_state_dict(opt_state["optimizer"])
        self.scheduler.load_state_dict(opt_state["scheduler"])
        if self.scaler is not None and opt_state.get("scaler"):
            self.scaler.load_state_dict(opt_state["scaler"])


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(results_dir: str | Path, step: int, engine, ema, cfg: Config, samples_seen: int,
                    par: Parallel | None = None) -> Path | None:
    """Write checkpoint-<step>/ into a temporary folder, then rename: never half-written.

    Every rank calls this. Rank 0 writes the EMA and the training state; the engine's files come
    from rank 0 alone (full weights) or, under DeepSpeed, from every rank (its partition)."""
    par = par or Parallel()
    final = Path(results_dir) / f"checkpoint-{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ema_sd = ema.state_dict()            # a collective when the EMA is sharded (ZeRO-3)
    if engine.saves_on_every_rank:
        par.barrier()                    # the folder exists before anyone writes into it
        engine.save(tmp)
        par.barrier()                    # every partition is on disk before the rename
    elif par.is_main:
        engine.save(tmp)
    if not par.is_main:
        return None
    torch.save(ema_sd, tmp / "ema.pt")
    (tmp / "training_state.json").write_text(json.dumps(
        {"step": step, "samples_seen": samples_seen, "engine": engine.name, **engine.state_info(),
         "config": cfg.to_dict()}, indent=1))
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final


def check_files(path: Path, names) -> None:
    missing = [f for f in names if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"Checkpoint '{path}' lacks {', '.join(missing)}; it is incomplete: "
                              f"pick another checkpoint-<step> folder.")


def read_training_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint '{path}' is not a folder; pass a checkpoint-<step> folder "
                              f"written by a launcher (e.g. results/run/checkpoint-1000).")
    check_files(path, ("training_state.json", "ema.pt"))
    try:
        return json.loads((path / "training_state.json").read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"'{path / 'training_state.json'}' is not valid JSON; the checkpoint is "
                              f"corrupt: pick another one.") from None


def _torch_load(file: Path, map_location):
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"'{file}' cannot be read ({e.__class__.__name__}); the checkpoint is "
                              f"corrupt or truncated: pick another one.") from None


def check_model_config(state: dict, cfg: Config, path: Path) -> None:
    saved = state.get("config", {}).get("model", {})
    now = cfg.to_dict()["model"]
    diff = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"Checkpoint '{path}' was trained with a different model ({'; '.join(diff)}); "
                              f"use the config it was trained with.")


def load_model_weights(path: str | Path, model: nn.Module, file: str = "model.pt") -> None:
    path = Path(path)
    if not (path / file).is_file() and file == "model.pt" and (path / "ds").is_dir():
        raise CheckpointError(f"'{path}' is a DeepSpeed checkpoint without plain weights; convert it first: "
                              f"python -m dit_core.parallel.zero convert {path} {path}-plain")
    check_files(path, (file,))
    sd = _torch_load(path / file, "cpu")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"'{path / file}' does not fit this model ({first}); "
                              f"use the config it was trained with.") from None


def model_from_checkpoint(path: str | Path, device="cpu", ema: bool = True) -> tuple[DiT, Config]:
    """Rebuild the DiT a checkpoint was trained with and load its (EMA) weights."""
    from .config import load_config

    state = read_training_state(path)
    overrides = {f"{s}.{k}": v for s, body in state["config"].items() for k, v in body.items()}
    cfg = load_config(None, overrides)
    model = DiT(cfg.model)
    load_model_weights(path, model, "ema.pt" if ema else "model.pt")
    return model.to(device).eval(), cfg


# ---------------------------------------------------------------- the loop

class TrainHooks:
    """Points inside a step where a measurement may look (every rank calls them)."""

    def step_begin(self, step: int, engine) -> None: ...

    def after_backward(self, step: int, micro: int, engine) -> None: ...

    def step_end(self, step: int, engine) -> None: ...

    def logged(self, records: list, ema: "EMA", seconds: float) -> None:
        """Rank 0, after `records` (one per step) were read back and written; `seconds` since the
        loop started, the GPU's work included (reading the loss waited for it)."""


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


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device):
    t = cfg.train
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            **({"fused": True} if fused else {}))
    return opt, build_scheduler(opt, cfg)


def build_scheduler(optimizer, cfg: Config):
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))


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
    fast = fast_enabled(t.fast, device, alone, t.precision)

    start, samples_seen = 0, 0
    if run.resume:
        state = read_training_state(run.resume)
        check_model_config(state, cfg, Path(run.resume))
        start, samples_seen = int(state["step"]), int(state["samples_seen"])
        if start > t.max_steps:
            raise ConfigError(f"--resume '{run.resume}' is at step {start}, past train.max_steps={t.max_steps}; "
                              f"raise --max-steps.")

    torch.manual_seed(t.seed)  # same initial weights on every rank and every run
    model = (model_fn or DiT)(cfg.model).to(device)
    diffusion = Diffusion(cfg.diffusion, device)
    data = (data or load_mnist("train", "cpu", t.train_subset)).to(device)
    engine = par.make_engine(model, cfg, device)
    ema = engine.make_ema()
    if run.resume:
        engine.load(Path(run.resume), device)
        ema.load_state_dict(_torch_load(Path(run.resume) / "ema.pt", device))
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
    read_every = t.log_every if fast else 1

    results = Path(run.results_dir)
    logger = tb = bar = None
    if par.is_main:
        results.mkdir(parents=True, exist_ok=True)
        logger = JsonlLogger(run.log_jsonl or results / "log.jsonl", append=bool(run.resume))
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
        """One wait for the GPU per interval: every pending step's loss and gradient norm at once."""
        if not pending:
            return
        n = len(pending)
        values = [r["loss"] for r in pending]
        norms_on_device = isinstance(pending[0]["grad_norm"], torch.Tensor)   # DeepSpeed returns a float
        if norms_on_device:
            values += [r["grad_norm"] for r in pending]
        values = torch.stack([v.float().reshape(()) for v in values]).tolist()
        for i, r in enumerate(pending):
            r["loss"] = loss_val = values[i]
            if norms_on_device:
                r["grad_norm"] = values[n + i]
            out.losses.append(loss_val)
            if not math.isfinite(loss_val) and t.precision != "fp16":
                raise FloatingPointError(f"loss became {loss_val} at step {r['step']}; lower train.lr "
                                         f"(now {t.lr}) or turn on train.grad_clip.")
        if par.is_main:
            for r in pending:
                logger.write(r)
                if tb is not None and (r["step"] % t.log_every == 0 or r["step"] == t.max_steps - 1):
                    for k in ("loss", "grad_norm", "lr"):
                        tb.add_scalar(f"train/{k}", r[k], r["step"])
            if bar is not None:
                bar.update(len(pending))
                bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}", refresh=False)
            hooks.logged(list(pending), ema, time.perf_counter() - t0)
        pending.clear()

    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    for step in range(start, end):
        gb = draw(step)
        hooks.step_begin(step, engine)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            b = shard(gb, par.data_rank, W, micro, accum).to(device)
            x0, y = data.gather(b.indices)
            with engine.micro_step(last=micro == accum - 1):
                with autocast_ctx(engine.autocast, device):
                    loss = loss_fn(x0, y, b.t, b.noise, b.drop)
                engine.backward(loss)
            hooks.after_backward(step, micro, engine)
            loss_sum += loss.detach()
        lr = engine.lr()
        grad_norm = engine.step()
        hooks.step_end(step, engine)
        engine.update_ema(ema, t.ema_decay, step)
        samples_seen += t.global_batch_size
        # The logged loss is the mean over the whole global batch (all ranks).
        pending.append({"step": step, "loss": par.all_reduce_mean(loss_sum / accum), "grad_norm": grad_norm,
                        "lr": lr, "samples_seen": samples_seen})
        done = step + 1
        if done % read_every == 0 or done == end:
            read_back()
        if t.ckpt_every and done % t.ckpt_every == 0 and done != end:
            read_back()
            save_checkpoint(results, done, engine, ema, cfg, samples_seen, par)
    out.seconds = time.perf_counter() - t0
    out.steps = end
    out.last_checkpoint = save_checkpoint(results, end, engine, ema, cfg, samples_seen, par)
    if par.is_main:
        logger.close()
        if tb is not None:
            tb.close()
        if bar is not None:
            bar.close()
    return out
