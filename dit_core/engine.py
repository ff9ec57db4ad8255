"""Who does a step's backward and optimizer work: the plain-PyTorch engine (backward, gradient sync, clipping,
AdamW, the LR schedule, the EMA, its checkpoint files), the engine of strategies whose ranks hold different pieces of
the model, and the small pieces every engine shares (autocast, the LR schedule, the EMA's update).

What the loop calls on an engine is listed on one page in `strategy.py` (`Engine`); a strategy's `make_engine`
returns one. DeepSpeed (parallel/zero.py), FSDP, tensor, pipeline and expert parallelism bring their own engines with
the same members.
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, check_files, foreign, load_model_weights, read_training_state, torch_load
from .config import Config, ConfigError
from .model import DiT, sdpa_attention
from .checkpoint import load_state_file, writer
from .checkpoint_dcp import load_into_plain


def compiled(fn, mode: str):
    """torch.compile with the config's mode ("none": the function itself)."""
    return fn if mode == "none" else torch.compile(fn, mode=mode)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' but no CUDA GPU is visible; use --device cpu or --device auto.")
    return torch.device(name)


def use_tf32(device: torch.device, precision: str) -> None:
    """TF32 matmuls on a CUDA GPU for mixed precision only: fp32 runs are the parity proofs, which compare exact
    float32 math (TF32 rounds a matmul's inputs to 10 bits of mantissa)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"


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


class Accumulating:
    """How one optimizer step's micro-batches run: one after another, forward then backward each
    (gradient accumulation, 梯度累积). A pipeline engine replaces this: its schedule interleaves the
    forwards and backwards of many micro-batches across stages, so it takes them all at once."""

    grad_probe = None               # called with the engine once a step's gradients are whole (GradDump)

    def run_step(self, step: int, micro_batches: list, loss_fn, hooks) -> torch.Tensor:
        """`micro_batches`: (x0, y, batch) per accumulation step, on the device. Returns the sum of
        their losses (each the mean over its micro-batch)."""
        loss_sum = None
        for micro, (x0, y, b) in enumerate(micro_batches):
            with self.micro_step(last=micro == len(micro_batches) - 1):
                with autocast_ctx(self.autocast, x0.device):
                    loss = loss_fn(x0, y, b.t, b.noise, b.drop)
                self.backward(loss)
            hooks.after_backward(step, micro, self)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        return loss_sum


class TorchEngine(Accumulating):
    """Backward, gradient sync, clipping, optimizer and LR step, checkpoint files: plain PyTorch.

    `dit_core.parallel.zero` provides the same members on top of a DeepSpeed engine, which
    owns all of these jobs itself (accumulation, clipping, partitioned optimizer state).
    """

    name = "torch"
    saves_on_every_rank = False      # DeepSpeed: every rank writes its own partition
    gradients_are_whole = True       # after the sync every rank holds every parameter's whole gradient

    def __init__(self, model: nn.Module, strategy, cfg: Config, device: torch.device):   # strategy: a Strategy
        tc = cfg.train
        self.model, self.strategy, self.cfg = model, strategy, cfg
        self.autocast = tc.precision      # fp32 params, bf16/fp16 matmuls (DeepSpeed casts the model instead)
        self.optimizer, self.scheduler = build_optimizer(model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None
        self.accum = tc.grad_accum
        self.clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.wrapped = strategy.wrap(model)
        self.forward = compiled(self.wrapped, tc.compile_mode) if tc.compile else self.wrapped

    def micro_step(self, last: bool):
        """Context of one micro-batch's forward and backward: only the last one synchronises."""
        return contextlib.nullcontext() if last else self.strategy.no_sync(self.wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        # Each micro-batch is 1/accum of this rank's share: the gradient of the mean.
        scaled = loss / self.accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> torch.Tensor:
        """Synchronise, clip, step, zero, schedule; returns the gradient norm before clipping (a
        tensor: reading it would make the host wait for the GPU, so the loop reads it at log steps)."""
        self.strategy.finish_gradient_sync(self.wrapped)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_probe is not None:
            self.grad_probe(self)
        grad_norm = self.strategy.clip_grad_norm_(self.params, self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm.detach()

    def named_gradients(self) -> dict:
        """Every parameter's gradient by name (zeros where backward left none)."""
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in unwrap(self.model).named_parameters()}

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
        if writer_of(state) == "fsdp":
            # A sharded DCP checkpoint: this process reads every chunk of every weight and moment.
            load_into_plain(folder, unwrap(self.model), self.optimizer)
            self.scheduler.last_epoch = state["step"]
            apply_schedule(self.optimizer, self.scheduler, self.cfg, state["step"])
            return
        if writer_of(state) != "torch":
            raise foreign(folder, state, "this launcher")
        if state.get("converted_from"):
            raise CheckpointError(f"Checkpoint '{folder}' holds plain weights converted from the DeepSpeed checkpoint "
                                  f"'{state['converted_from']}', without optimizer state; python -m dit_core.evaluate "
                                  f"reads it, and launchers/zero.py resumes the original.")
        check_files(folder, ("model.pt", "optimizer.pt"))
        load_model_weights(folder, self.model)
        opt_state = torch_load(folder / "optimizer.pt", device)
        try:
            self.optimizer.load_state_dict(opt_state["optimizer"])
            self.scheduler.load_state_dict(opt_state["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"'{folder / 'optimizer.pt'}' does not fit this model's optimizer "
                                  f"({e.__class__.__name__}); use the config it was trained with.") from None
        if self.scaler is not None and opt_state.get("scaler"):
            self.scaler.load_state_dict(opt_state["scaler"])
        apply_schedule(self.optimizer, self.scheduler, self.cfg, read_training_state(folder)["step"])

    def load_weights(self, sd: dict) -> None:
        unwrap(self.model).load_state_dict(sd)     # every rank loads the same: DDP's replicas stay equal

    def weight_stats(self) -> torch.Tensor:
        """This rank's weights: [how many are not finite, their sum of squares] (read with the step's loss)."""
        return weight_stats(self.params)


class RankFilesEngine(TorchEngine):
    """The engine of strategies whose ranks hold different pieces of the model (tensor, pipeline and expert
    parallelism): model.pt holds the whole weights under their single-process names (every rank takes part in
    gathering them, rank 0 writes), and each rank its own optimizer file, so only the same layout resumes it.
    A subclass says how to gather (`whole_state_dict`), how to take its piece back (`load_whole_state_dict`) and
    which layouts it accepts (`check_layout`, one sentence naming the command that resumes the checkpoint)."""

    saves_on_every_rank = True
    gradients_are_whole = False      # each rank holds its own slices, stages or experts (no --dump-grads)

    def whole_state_dict(self) -> dict:
        raise NotImplementedError

    def load_whole_state_dict(self, sd: dict) -> None:
        raise NotImplementedError

    def load_weights(self, sd: dict) -> None:
        self.load_whole_state_dict(sd)             # this rank's slices, stage or experts of the whole weights

    # What a subclass says about its layout, for the one check below: the launcher that resumes it, how the
    # optimizer state is split, and the flags that describe a layout (state_info's keys: a dict -> "--tp-degree 2").
    launcher = ""
    split = "one file per rank"
    layout_defaults: dict = {}

    def layout_flags(self, d: dict) -> str:
        raise NotImplementedError

    def resume_flags(self, d: dict) -> str:
        return self.layout_flags(d)

    def wrote(self, state: dict) -> bool:
        """Whether `state` (a training_state.json) is this kind of engine's checkpoint."""
        return state.get("engine") == self.name

    def check_layout(self, folder: Path, state: dict) -> None:
        """Only the layout that wrote the optimizer files resumes them: another kind of checkpoint, or this kind for
        another layout, is one sentence naming the command that resumes it."""
        if not self.wrote(state):
            raise foreign(folder, state, self.launcher)
        want = self.state_info()
        have = {k: state.get(k, self.layout_defaults.get(k)) for k in want}
        if have != want:
            raise CheckpointError(
                f"Checkpoint '{folder}' was written with {self.layout_flags(have)} on {have['world_size']} processes, "
                f"not {self.layout_flags(want)} on {want['world_size']} processes; its optimizer state is "
                f"{self.split}: resume with torchrun --nproc_per_node {have['world_size']} {self.launcher} "
                f"{self.resume_flags(have)} (its model.pt and ema.pt are whole weights: launchers/single.py and "
                f"python -m dit_core.evaluate read them).")

    def save(self, folder: Path) -> None:
        sd = self.whole_state_dict()
        if self.strategy.is_main:
            torch.save(sd, folder / "model.pt")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / f"optimizer-rank{self.strategy.rank}.pt")

    def load(self, folder: Path, device: torch.device) -> None:
        state = read_training_state(folder)
        self.check_layout(folder, state)
        name = f"optimizer-rank{self.strategy.rank}.pt"
        check_files(folder, ("model.pt", name))
        self.load_whole_state_dict(load_state_file(folder / "model.pt", device))
        opt = torch_load(folder / name, device)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        apply_schedule(self.optimizer, self.scheduler, self.cfg, state["step"])


def clip_by_norm_(grads, norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale `grads` so that a whole-model gradient of norm `norm` would have at most `max_norm` (what
    clip_grad_norm_ does, for strategies that sum the norm's squares across ranks first); returns `norm`."""
    if math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef)
    return norm


def weight_stats(params) -> torch.Tensor:
    """[non-finite entries, sum of squares] of `params` (this rank's pieces): summed over ranks, the first stops a
    NaN run and the second gives the weights' norm, which the divergence guard compares with its value at
    initialisation. A parameter replicated on k ranks counts k times both then and now, so the ratio holds."""
    params = [p.detach() for p in params if p.numel()]
    if not params:
        return torch.zeros(2)
    bad = torch.stack([(~torch.isfinite(p)).sum() for p in params]).sum().float()
    sq = torch.stack([torch.linalg.vector_norm(p.float()) for p in params]).square().sum()
    return torch.stack([bad, sq])


def writer_of(state: dict) -> str:
    return writer(state)


def apply_schedule(optimizer, scheduler, cfg: Config, step: int) -> None:
    """After loading an optimizer and scheduler: the command line's lr, schedule, betas and weight decay
    take effect at `step`, as if the run had used them from the start. (LambdaLR's state holds its
    base rates, and AdamW's param groups their lr, betas and decay: loaded as they were, they would
    silently override the command line.) Unchanged settings give bitwise the rates of the checkpoint."""
    tc = cfg.train
    scheduler.base_lrs = [tc.lr for _ in optimizer.param_groups]
    lrs = [tc.lr * lr_factor(step, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio) for _ in optimizer.param_groups]
    for g, lr in zip(optimizer.param_groups, lrs):
        g["initial_lr"], g["lr"] = tc.lr, lr
        g["betas"], g["weight_decay"] = tuple(tc.betas), tc.weight_decay
    scheduler._last_lr = lrs


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device):
    tc = cfg.train
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                            **({"fused": True} if fused else {}))
    return opt, build_scheduler(opt, cfg)


def build_scheduler(optimizer, cfg: Config):
    tc = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))


