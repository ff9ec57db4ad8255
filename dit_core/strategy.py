"""The seam, on one page: what a strategy provides, and what the loop asks of it.

The loop (`dit_core.train`) draws each step's global batch (the determinism contract), gives this rank its slice
(`data_rank` of `data_world_size`) in `train.grad_accum` micro-batches, and hands them to the engine its strategy
built. It never asks which strategy it runs: everything a strategy changes is one of the members below.

- `Strategy`: who this rank is and how the ranks agree. This class is the one-process strategy; every strategy in
  `dit_core.parallel` is a subclass that overrides what it changes (e.g. `parallel/ddp.py`: the wrapper, no_sync,
  the averaged loss).
- `Engine`: what its `make_engine` returns, and what the loop calls on it (backward, the optimizer step, the EMA,
  checkpoint files). Most strategies use the plain-PyTorch `TorchEngine` (`dit_core.engine`); DeepSpeed, FSDP,
  tensor, pipeline and expert parallelism bring their own with the same members.
- `TrainHooks`: where a measurement (a report, a benchmark, a chapter) looks inside a step.

How one step runs, and who does what:

    loop:      batch = slice of the global batch        strategy.data_rank, strategy.data_world_size
    engine:    for each micro-batch: loss, backward     strategy.loss (the Objective on this rank's share),
                                                        strategy.no_sync (all but the last micro-batch)
    engine:    sync, clip, optimizer, schedule          strategy.finish_gradient_sync, strategy.clip_grad_norm_
    loop:      log the mean loss of the global batch    strategy.all_reduce_mean
    loop:      guard the weights, save a checkpoint     engine.weight_stats + strategy.all_reduce_sum, engine.save
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from .config import Config
from .engine import EMA, TorchEngine
from .objective import Objective


class Strategy:
    """One process, every member a no-op or the identity. A strategy of `dit_core.parallel` overrides these."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None   # where the model lives; None: from run.device
    trains_moe: bool = True              # whether a mixture-of-experts DiT may train under this strategy
    one_process: bool = True             # the fast path (batches drawn on the GPU, the loss compiled whole) is
                                         # the one-process path: every parallel strategy says False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints' shared files and reports."""
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which slice of the global batch this rank trains on. Ranks that split one sample's work (sequence,
        tensor, pipeline parallelism) share a data rank."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        """How many slices the global batch is cut into."""
        return self.world_size

    def loss(self, objective: Objective, model, x0, y, t, noise, drop) -> torch.Tensor:
        """This rank's loss of one micro-batch (where a rank holds some of every image's tokens: its share of it)."""
        return objective(model, x0, y, t, noise, drop)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the engine runs forward and backward through (DDP's wrapper, the sequence-parallel DiT)."""
        return model

    def no_sync(self, model: nn.Module):
        """Context for the micro-batches whose gradients must not be synchronised yet (all but a step's last): the
        wrapper's own `no_sync` where it has one (DDP, the hand-written DDP and FSDP), else nothing to hold back."""
        hold = getattr(model, "no_sync", None)
        return hold() if callable(hold) else contextlib.nullcontext()

    def finish_gradient_sync(self, model: nn.Module) -> None:
        """After a step's last backward, before clipping: what the wrapper did not overlap with backward."""

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """Clip to the norm of the whole model's gradient; returns the norm before clipping. (Where each rank holds
        only pieces of the gradient, the squares are summed over the ranks that hold different pieces.)"""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A logged number (the loss) as the mean over the global batch."""
        return value

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over every rank (counts: non-finite weights, the weights' squares)."""
        return value

    def barrier(self) -> None:
        """Wait for every rank (checkpoints written by several ranks)."""

    def agree(self, error: Exception | None) -> None:
        """Every rank learns rank 0's verdict: rank 0 found `error` (or None), and every rank raises it, so a bad
        input stops all ranks with the same sentence instead of leaving them waiting."""
        if error is not None:
            raise error

    def make_engine(self, model: nn.Module, cfg: Config, device: torch.device) -> "Engine":
        """Who does backward and the optimizer step (DeepSpeed, FSDP, tensor, pipeline and expert parallelism
        hand back their own)."""
        return TorchEngine(model, self, cfg, device)


class Engine(Protocol):
    """What the loop and the checkpoint writer call on the engine a strategy made (`TorchEngine` is the plain one)."""

    name: str                       # written into training_state.json: which engine's files a checkpoint holds
    saves_on_every_rank: bool       # every rank writes its own files into a checkpoint (not only rank 0)
    gradients_are_whole: bool       # after the sync every rank holds every parameter's whole gradient
    grad_probe: object              # called with the engine once a step's gradients are whole (--dump-grads)
    wrapped: nn.Module              # the strategy-wrapped model (the fast path compiles its loss on it)
    forward: nn.Module              # what a micro-batch runs through (wrapped, or its compiled form)

    def run_step(self, step: int, micro_batches: list, loss_fn, hooks: "TrainHooks") -> torch.Tensor:
        """Forward and backward of every micro-batch of the step; the sum of their losses."""

    def step(self) -> torch.Tensor:
        """Synchronise, clip, optimizer and schedule step; the gradient norm before clipping (a 0-d tensor)."""

    def lr(self) -> float:
        """The learning rate of the step about to be taken."""

    def make_ema(self) -> EMA:
        """The EMA of the weights, kept the way this engine keeps the weights (whole, sharded, per stage)."""

    def update_ema(self, ema: EMA, decay: float, num_updates: int) -> None:
        """Move the EMA towards the weights just updated."""

    def weight_stats(self) -> torch.Tensor:
        """This rank's weights: [non-finite count, sum of squares] (summed over ranks by the loop)."""

    def named_gradients(self) -> dict:
        """Every parameter's whole gradient by name (--dump-grads)."""

    def state_info(self) -> dict:
        """The layout this engine's files need to be read back (written into training_state.json)."""

    def save(self, folder: Path) -> None:
        """Write this rank's files of a checkpoint into `folder`."""

    def load(self, folder: Path, device: torch.device) -> None:
        """Read a checkpoint's weights, optimizer and schedule back, or stop with one sentence if it cannot."""

    def load_weights(self, sd: dict) -> None:
        """Put whole weights (the single-process names, as model.pt holds them) into the model this engine trains,
        its optimizer untouched (run.init_from: step 0, fresh moments)."""


class TrainHooks:
    """Points inside a step where a measurement may look (every rank calls them): the loop calls them, an engine
    calls `after_backward`, and a lab tool (bench, reports, chapters) overrides them."""

    def step_begin(self, step: int, engine: Engine) -> None: ...

    def after_backward(self, step: int, micro: int, engine: Engine) -> None: ...

    def step_end(self, step: int, engine: Engine) -> None: ...

    def logged(self, records: list, ema: EMA, seconds: float) -> None:
        """Rank 0, after `records` (one per step) were read back and written; `seconds` since the loop started,
        the GPU's work included (reading the loss waited for it)."""
