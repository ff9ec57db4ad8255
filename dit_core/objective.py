"""The loss of one micro-batch (训练目标), the one every strategy and engine trains.

`Objective(model, x0, y, t, noise, drop)` noises the images to x_t, runs the model, and returns the mean error of its
prediction against the objective's target (noise, x0, v or a velocity; min-SNR weighted where configured), plus, for a
mixture-of-experts DiT, `model.aux_loss_weight` x the load-balancing loss. Strategies whose ranks hold only a piece of
the work use its pieces instead of writing the loss again (the formulas themselves are the noise schedule's, in
`diffusion.py`):

- a pipeline's first stage noises (`noised`), its last stage computes the error of the prediction (`error`);
- sequence and context parallelism (a rank holds some of every image's tokens): `target` cut to the rank's tokens,
  then `token_share`, the rank's share of the mean, which the ranks' shares add up to.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import Config, ConfigError
from .diffusion import Diffusion
from .moe import balance_loss, moe_layers


class Objective:
    """The training loss of one micro-batch on `device`; `model` (the DiT being trained) lets a mixture of experts add
    its balance loss. `record` gives the log its parts for the step just taken."""

    def __init__(self, cfg: Config, device, model: nn.Module | None = None):
        self.diffusion = Diffusion(cfg.diffusion, device)
        self.cfg = cfg.diffusion
        self.moe = moe_layers(model) if model is not None and cfg.model.num_experts else []
        self.aux_weight = cfg.model.aux_loss_weight
        self.channels = cfg.model.in_channels
        self._reset()

    # ---------------------------------------------------------------- the whole loss
    def __call__(self, model, x0, y, t, noise, drop=None) -> torch.Tensor:
        loss = self.diffusion.loss(model, x0, y, t, noise, drop)
        return self.with_balance(loss) if self.moe else loss

    # ---------------------------------------------------------------- its pieces
    def noised(self, x0, t, noise) -> torch.Tensor:
        """x_t: the images noised to timestep t (the model's input)."""
        return self.diffusion.q_sample(x0, t, noise)

    def target(self, x0, t, noise) -> torch.Tensor:
        """What the model should output for x_t."""
        return noise if self.diffusion.plain else self.diffusion.target(x0, t, noise)

    def error(self, pred, x0, t, noise) -> torch.Tensor:
        """The mean error of a prediction over the micro-batch (a pipeline's last stage computes only this)."""
        return self.diffusion.error(pred, x0, t, noise)

    def error_on_target(self, pred, target) -> torch.Tensor:
        """The unweighted mean error against a target computed beforehand (torch.distributed.pipelining's loss_fn sees
        only a prediction and a target, so it cannot weight samples by their t)."""
        return self.diffusion.error_on_target(pred, target)

    def token_share(self, pred, target, t, count: int) -> torch.Tensor:
        """This rank's share of the micro-batch's loss when it holds only some of every image's tokens (sequence and
        context parallelism): see `Diffusion.token_error`. With model.learn_sigma each patch's pixels hold 2 x
        in_channels outputs (the noise first): the loss reads the noise."""
        if pred.shape[-1] == 2 * target.shape[-1]:
            pred = pred.unflatten(-1, (-1, 2 * self.channels))[..., :self.channels].flatten(-2)
        return self.diffusion.token_error(pred, target, t, count)

    # ---------------------------------------------------------------- the mixture of experts' term
    def with_balance(self, loss: torch.Tensor) -> torch.Tensor:
        """loss + model.aux_loss_weight x the balance loss (the mean over MoE layers of each layer's mean over its
        routing groups). Each group lies inside one micro-batch of one rank, so every rank's term is a mean over its
        own groups, and the mean over ranks and micro-steps is the mean over every group of the global batch: the
        same on one process and on N, with no collective."""
        aux = torch.stack([balance_loss(m) for m in self.moe]).mean()
        self._aux, self._diffusion = self._aux + aux.detach(), self._diffusion + loss.detach()
        self._counts = self._counts + torch.stack([m.stats[0].sum(0) for m in self.moe])
        return loss + self.aux_weight * aux

    def record(self, strategy, accum: int) -> dict:
        """The step's parts for the log (a mixture of experts: the diffusion and balance losses, means over the global
        batch, and the tokens each expert received, summed over it); nothing for a dense DiT."""
        if not self.moe:
            return {}
        out = {"diffusion_loss": float(strategy.all_reduce_mean(self._diffusion / accum)),
               "aux_loss": float(strategy.all_reduce_mean(self._aux / accum)),
               "expert_tokens": strategy.all_reduce_sum(self._counts).long().tolist()}     # [layer][expert]
        self._reset()
        return out

    def _reset(self) -> None:
        self._aux = self._diffusion = self._counts = 0

    # ---------------------------------------------------------------- what the objective needs of a run
    @staticmethod
    def compiles_whole(cfg: Config) -> bool:
        """Whether the fast path may compile the loss whole: not with a mixture of experts, which routes a different
        number of tokens to each expert at every step."""
        return not cfg.model.num_experts

    @staticmethod
    def check(cfg: Config, strategy) -> None:
        """A mixture-of-experts DiT needs a strategy that knows where its experts live, and routing groups that tile
        each micro-batch."""
        m, tc = cfg.model, cfg.train
        if not m.num_experts:
            return
        if not strategy.trains_moe:
            raise ConfigError(f"model.num_experts={m.num_experts} (a mixture-of-experts DiT) trains with python "
                              f"launchers/single.py or torchrun launchers/moe.py, not with {type(strategy).__name__}; "
                              f"use one of those, or model.num_experts=0 for the dense DiT.")
        micro = tc.global_batch_size // (strategy.data_world_size * tc.grad_accum)
        if micro % m.moe_aux_group:
            raise ConfigError(f"model.moe_aux_group={m.moe_aux_group} images per load-balancing group does not "
                              f"divide a micro-batch of {micro} images (train.global_batch_size="
                              f"{tc.global_batch_size} / {strategy.data_world_size} ranks / train.grad_accum="
                              f"{tc.grad_accum}); use a divisor of {micro}, e.g. --set model.moe_aux_group=1.")
        if tc.fast == "on":
            raise ConfigError("train.fast=on compiles the whole loss, but the mixture of experts routes a different "
                              "number of tokens to each expert at every step; use --fast off (or auto).")


class MicroBatchLoss:
    """What an engine calls for one micro-batch: `strategy.loss` with the objective and the model bound
    (`loss(x0, y, t, noise, drop)`; compiled whole on the fast path). A pipeline engine, which cuts the model into
    stages, uses `objective`'s pieces instead."""

    def __init__(self, strategy, objective: Objective, model, compile_with=None):
        self.objective = objective
        fn = lambda x0, y, t, noise, drop: strategy.loss(objective, model, x0, y, t, noise, drop)  # noqa: E731
        self.fn = compile_with(fn) if compile_with is not None else fn

    def __call__(self, x0, y, t, noise, drop) -> torch.Tensor:
        return self.fn(x0, y, t, noise, drop)
