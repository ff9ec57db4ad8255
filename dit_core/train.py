"""The training step and loop every launcher reuses.

A launcher decides only two things, through a `Parallel` object: how the model
is wrapped (and its gradients synchronised) and which slice of the global batch
this rank trains on. Everything else, the loss, AMP, clipping, LR schedule, EMA,
accumulation, checkpoints and logs, is here, once.
"""
from __future__ import annotations

import contextlib
import copy
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
from .model import DiT
from .parallel.dist import check_batch_split
from .parity import JsonlLogger

CKPT_FILES = ("model.pt", "ema.pt", "optimizer.pt", "training_state.json")


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

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module):
        """Context for micro-steps whose gradients must not be synchronised yet."""
        return contextlib.nullcontext()

    def finish_gradient_sync(self, model: nn.Module) -> None:
        """Called after the last backward of a step, before clipping and the optimizer."""

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t


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


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, num_updates: int) -> None:
    # Warm-up the decay so short runs still average mostly trained weights.
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - d)


def unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(results_dir: str | Path, step: int, model: nn.Module, ema: nn.Module,
                    optimizer, scheduler, scaler, cfg: Config, samples_seen: int) -> Path:
    """Write checkpoint-<step>/ into a temporary folder, then rename: never half-written."""
    final = Path(results_dir) / f"checkpoint-{step}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(unwrap(model).state_dict(), tmp / "model.pt")
    torch.save(ema.state_dict(), tmp / "ema.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
    (tmp / "training_state.json").write_text(json.dumps(
        {"step": step, "samples_seen": samples_seen, "config": cfg.to_dict()}, indent=1))
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final


def read_training_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint '{path}' is not a folder; pass a checkpoint-<step> folder "
                              f"written by a launcher (e.g. results/run/checkpoint-1000).")
    missing = [f for f in CKPT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"Checkpoint '{path}' lacks {', '.join(missing)}; it is incomplete: "
                              f"pick another checkpoint-<step> folder.")
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

@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module
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
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
    return opt, sched


def train(cfg: Config, parallel: Parallel | None = None, data: MNIST | None = None,
          quiet: bool = False, stop_at: int | None = None) -> TrainResult:
    """Train from scratch or from cfg.run.resume up to train.max_steps (or stop early at
    `stop_at`, as a job with a time limit would, keeping the schedule of the full run)."""
    par = parallel or Parallel()
    t, run = cfg.train, cfg.run
    device = par.device or resolve_device(run.device)
    if device.type == "cuda":
        # fp32 parity runs compare exact float32 math: no TF32 shortcuts.
        torch.backends.cuda.matmul.allow_tf32 = t.precision != "fp32"
        torch.backends.cudnn.allow_tf32 = t.precision != "fp32"
    accum, W = t.grad_accum, par.world_size
    check_batch_split(t.global_batch_size, W, accum)

    torch.manual_seed(t.seed)  # same initial weights on every rank and every run
    model = DiT(cfg.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer, scheduler = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    diffusion = Diffusion(cfg.diffusion, device)
    data = (data or load_mnist("train", "cpu", t.train_subset)).to(device)

    start, samples_seen = 0, 0
    if run.resume:
        state = read_training_state(run.resume)
        check_model_config(state, cfg, Path(run.resume))
        load_model_weights(run.resume, model)
        load_model_weights(run.resume, ema, "ema.pt")
        opt_state = _torch_load(Path(run.resume) / "optimizer.pt", device)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        if scaler is not None and opt_state.get("scaler"):
            scaler.load_state_dict(opt_state["scaler"])
        start, samples_seen = int(state["step"]), int(state["samples_seen"])
        if start > t.max_steps:
            raise ConfigError(f"--resume '{run.resume}' is at step {start}, past train.max_steps={t.max_steps}; "
                              f"raise --max-steps.")

    wrapped = par.wrap(model)
    fwd = torch.compile(wrapped) if t.compile else wrapped
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
    params = [p for p in model.parameters() if p.requires_grad]
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    t0 = time.perf_counter()
    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    for step in range(start, end):
        gb = global_batch(t.seed, step, t.global_batch_size, len(data), cfg.diffusion.timesteps,
                          cfg.diffusion.label_dropout, (cfg.model.in_channels, cfg.model.image_size,
                                                        cfg.model.image_size))
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            b = shard(gb, par.rank, W, micro, accum).to(device)
            x0, y = data.gather(b.indices)
            sync = contextlib.nullcontext() if micro == accum - 1 else par.no_sync(wrapped)
            with sync:
                with autocast_ctx(t.precision, device):
                    loss = diffusion.loss(fwd, x0, y, b.t, b.noise, b.drop)
                # Each micro-batch is 1/accum of this rank's share: the gradient of the mean.
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach()
        par.finish_gradient_sync(wrapped)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        lr = optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema_update(ema, model, t.ema_decay, step)
        samples_seen += t.global_batch_size
        # The logged loss is the mean over the whole global batch (all ranks).
        loss_val = par.all_reduce_mean(loss_sum / accum).item()
        rec = {"step": step, "loss": loss_val, "grad_norm": float(grad_norm), "lr": lr,
               "samples_seen": samples_seen}
        out.losses.append(loss_val)
        if not math.isfinite(loss_val) and t.precision != "fp16":
            raise FloatingPointError(f"loss became {loss_val} at step {step}; lower train.lr "
                                     f"(now {t.lr}) or turn on train.grad_clip.")
        if par.is_main:
            logger.write(rec)
            if tb is not None and (step % t.log_every == 0 or step == t.max_steps - 1):
                for k in ("loss", "grad_norm", "lr"):
                    tb.add_scalar(f"train/{k}", rec[k], step)
            if bar is not None:
                bar.update(1)
                if step % t.log_every == 0:
                    bar.set_postfix(loss=f"{loss_val:.4f}")
        done = step + 1
        if t.ckpt_every and done % t.ckpt_every == 0 and done != end and par.is_main:
            save_checkpoint(results, done, model, ema, optimizer, scheduler, scaler, cfg, samples_seen)
    out.seconds = time.perf_counter() - t0
    out.steps = end
    if par.is_main:
        out.last_checkpoint = save_checkpoint(results, end, model, ema, optimizer, scheduler,
                                              scaler, cfg, samples_seen)
        logger.close()
        if tb is not None:
            tb.close()
        if bar is not None:
            bar.close()
    return out
