"""Fully sharded data parallelism (FSDP, 全分片数据并行): ZeRO-3's partitioning, written by hand, and
PyTorch's FSDP2 (`fully_shard`) as the reference.

This file is the mechanism; dit_core.parallel.fsdp_train plugs it (and FSDP2) into the training loop.

Every rank trains on its slice of the global batch, as under DDP, but keeps only 1/N of the weights,
gradients and optimizer state. The model is cut into *units*: each DiT block is one, and the rest (the
patch, time and label embeddings and the final layer) is the root unit. A unit's parameters live as one
flat fp32 vector, padded to a multiple of N; rank r keeps elements [r*s, (r+1)*s) of it (s = padded/N):

    forward   all-gather the unit (every rank's shard -> the whole flat vector), point the block's
              weights at views of it, run the block, free the vector (the storage, not the autograd
              graph: the saved views come back to life when the vector is refilled)
    backward  all-gather the unit again, run its backward, reduce-scatter the flat gradient: each rank
              receives the sum of its own shard's gradient over the ranks (then / N), and frees the rest
    step      AdamW on the shards alone: an element-wise update, so a shard steps exactly as its part
              of the whole model would

While a unit computes, the next one's all-gather is already in flight (prefetch: forward gathers block
i+1 during block i, backward gathers block i-1 during block i). With NCCL the collective runs on its
own stream and `wait()` orders the compute stream after it; on the CPU (gloo) the calls are issued in the
same order and the overlap is gloo's background thread. The root unit is gathered once per step and kept
until its backward, as FSDP2 keeps its root: its weights are used first and last (embeddings, final layer).

Gradient accumulation (梯度累积) without communication: inside `no_sync` a unit keeps its whole flat
gradient (an fp32 copy of its weights: the whole model's size, not 1/N, for the micro-steps of a step)
and reduce-scatters the sum at the last micro-step; that memory is what the saved communication costs.

Checkpoints (dit_core.checkpoint_dcp) are `torch.distributed.checkpoint` (DCP) folders: every parameter and AdamW moment under its
single-process name, each rank writing the dim-0 chunk FSDP2 would own (a DTensor sharded on dim 0). DCP
stores chunk metadata, so any number of ranks (or one process, or DDP) reads them back, each loading the
pieces it needs: hand-written and FSDP2 runs write the same checkpoint and resume each other's.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .collectives import all_gather_flat, reduce_scatter_flat
from ..checkpoint import convert_main
from ..checkpoint_dcp import convert_checkpoint


# ---------------------------------------------------------------- one unit: a flat, sharded parameter

class FlatUnit:
    """The parameters of one module (minus those of its sub-units) as one flat vector, 1/N on each rank."""

    def __init__(self, name: str, module: nn.Module, skip: tuple[str, ...], group, prefix: str = ""):
        self.name, self.group = name, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        # (owner module, attribute, full name, shape, offset, numel), in registration order
        self.slots, offset = [], 0
        for fqn, p in module.named_parameters():
            if fqn.startswith(skip):
                continue
            owner_name, _, attr = fqn.rpartition(".")
            owner = module.get_submodule(owner_name)
            self.slots.append((owner, attr, prefix + fqn, p.shape, offset, p.numel()))
            offset += p.numel()
        self.numel = offset
        self.shard_numel = math.ceil(offset / self.world)
        self.padded = self.shard_numel * self.world
        ref = getattr(self.slots[0][0], self.slots[0][1])
        flat = torch.zeros(self.padded, dtype=ref.dtype, device=ref.device)
        for owner, attr, _, _, off, n in self.slots:
            flat[off:off + n] = getattr(owner, attr).detach().reshape(-1)
            del owner._parameters[attr]          # the module's own weights go; views of the gathered flat come
        lo = self.rank * self.shard_numel
        self.shard = nn.Parameter(flat[lo:lo + self.shard_numel].clone())
        self.alias = None          # the gathered flat vector, outside autograd's version counting
        self.grad_acc = None       # the unsharded gradient kept across no_sync micro-steps
        self.pending = None        # (work, tensor) of an all-gather in flight

    def fqns(self) -> list[str]:
        return [fqn for _, _, fqn, *_ in self.slots]

    def unflatten(self, flat: torch.Tensor) -> dict:
        """Flat (padded) vector -> {full name: tensor of the parameter's shape} (views)."""
        return {fqn: flat[off:off + n].view(shape) for _, _, fqn, shape, off, n in self.slots}

    def flatten(self, tensors: dict) -> torch.Tensor:
        flat = torch.zeros(self.padded, dtype=self.shard.dtype, device=self.shard.device)
        for _, _, fqn, _, off, n in self.slots:
            flat[off:off + n] = tensors[fqn].reshape(-1).to(flat.device, flat.dtype)
        return flat

    def my_part(self, flat: torch.Tensor) -> torch.Tensor:
        lo = self.rank * self.shard_numel
        return flat[lo:lo + self.shard_numel]

    def gather_flat(self, local: torch.Tensor) -> torch.Tensor:
        """All-gather any shard-shaped tensor of this unit (weights, EMA, a moment) into the flat vector."""
        out = local.new_empty(self.padded)
        all_gather_flat(out, local.detach().contiguous(), group=self.group)
        return out


class _Gather(torch.autograd.Function):
    """shard -> the unit's whole flat vector (all-gather); backward: flat gradient -> this rank's shard
    of its mean over the ranks (reduce-scatter, / N)."""

    @staticmethod
    def forward(ctx, shard, unit, fsdp):
        ctx.unit, ctx.fsdp = unit, fsdp
        return fsdp.gathered(unit)

    @staticmethod
    def backward(ctx, grad_flat):
        return ctx.fsdp.reduce_grad(ctx.unit, grad_flat), None, None


class _BeforeBackward(torch.autograd.Function):
    """Identity on a unit's output; its backward runs just before the unit's own backward: refill the
    unit's freed weights and start the all-gather of the unit that comes next in backward."""

    @staticmethod
    def forward(ctx, x, unit, fsdp):
        ctx.unit, ctx.fsdp = unit, fsdp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.fsdp.before_backward(ctx.unit)
        return g, None, None


class FullyShardedDiT:
    """Shards a DiT in place: root unit + one unit per block. Afterwards `model.parameters()` yields only
    the shards (the root's, then block 0's, ...), which is all the optimizer and the EMA ever see."""

    def __init__(self, model: nn.Module, group=None, prefetch: bool = True, unit_per_block: bool = True,
                 broken: str | None = None):
        self.group, self.prefetch, self.broken = group, prefetch, broken
        self.world = dist.get_world_size(group)
        self._sync = True
        self.traffic = {"all_gather": 0, "reduce_scatter": 0}   # elements per collective, summed (flat, padded)
        self.live = 0               # elements of gathered flat vectors alive now
        self.peak_live = 0
        self.timeline = None        # set to a list to record (event, unit name)
        with torch.no_grad():
            src = dist.get_global_rank(group, 0) if group is not None else 0
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=src, group=group)     # rank 0's initialisation wins, as in DDP
        if unit_per_block:
            self.root = FlatUnit("root", model, ("blocks.",), group)
            self.blocks = [FlatUnit(f"blocks.{i}", blk, (), group, prefix=f"blocks.{i}.")
                           for i, blk in enumerate(model.blocks)]
        else:                       # one unit for the whole model (for the unit-size comparison)
            self.root = FlatUnit("root", model, (), group)
            self.blocks = []
        self.units = [self.root, *self.blocks]
        model.register_parameter("fsdp_shard", self.root.shard)
        model.register_forward_pre_hook(self._root_pre)
        model.register_forward_hook(self._root_post)
        for i, (blk, unit) in enumerate(zip(model.blocks, self.blocks)):
            blk.register_parameter("fsdp_shard", unit.shard)
            blk.register_forward_pre_hook(self._block_pre(i))
            blk.register_forward_hook(self._block_post(i))

    # ------------------------------------------------------------ communication
    def _event(self, what: str, unit: FlatUnit) -> None:
        if self.timeline is not None:
            self.timeline.append((what, unit.name))

    def _start_gather(self, unit: FlatUnit, into: torch.Tensor | None = None) -> None:
        if unit.pending is not None:
            return
        out = into if into is not None else unit.shard.new_empty(unit.padded)
        work = all_gather_flat(out, unit.shard.detach(), group=self.group, async_op=True)
        unit.pending = (work, out)
        self.traffic["all_gather"] += unit.padded
        self.live += unit.padded
        self.peak_live = max(self.peak_live, self.live)
        self._event("all-gather", unit)

    def _wait_gather(self, unit: FlatUnit, into: torch.Tensor | None = None) -> torch.Tensor:
        self._start_gather(unit, into)
        work, out = unit.pending
        work.wait()
        unit.pending = None
        return out

    def gathered(self, unit: FlatUnit) -> torch.Tensor:
        """Inside _Gather.forward: the unit's whole flat vector, a new tensor autograd takes as the output."""
        flat = self._wait_gather(unit)
        unit.alias = flat.data      # .data: refilling it later must not look like an in-place change
        return flat

    def free(self, unit: FlatUnit) -> None:
        if unit.alias is not None and unit.alias.untyped_storage().size():
            unit.alias.untyped_storage().resize_(0)
            self.live -= unit.padded
            self._event("free", unit)

    def refill(self, unit: FlatUnit) -> None:
        """Re-gather into the freed storage, so the views autograd saved in forward read the weights again."""
        a = unit.alias
        if a.untyped_storage().size() == 0:
            a.untyped_storage().resize_(unit.padded * a.element_size())
            self._start_gather(unit, into=a)
        self._wait_gather(unit, into=a)

    def reduce_grad(self, unit: FlatUnit, grad_flat: torch.Tensor):
        grad_flat = grad_flat.contiguous() if unit.grad_acc is None else unit.grad_acc + grad_flat
        unit.grad_acc = None
        self.free(unit)                              # the unit's backward is over: its weights go
        if not self._sync:
            unit.grad_acc = grad_flat                # no communication: the whole flat gradient waits
            return None
        out = grad_flat.new_empty(unit.shard_numel)
        reduce_scatter_flat(out, grad_flat, group=self.group)
        self.traffic["reduce_scatter"] += unit.padded
        self._event("reduce-scatter", unit)
        # the mean over the ranks' data; the broken variant (--break average) keeps the sum: N times too large
        return out if self.broken == "average" else out.div_(self.world)

    # ------------------------------------------------------------ hooks
    def _use(self, unit: FlatUnit) -> None:
        flat = _Gather.apply(unit.shard, unit, self)
        for owner, attr, _, shape, off, n in unit.slots:
            setattr(owner, attr, flat[off:off + n].view(shape))     # plain tensors now, views of the flat

    def _root_pre(self, module, args):
        self._start_gather(self.root)
        if self.prefetch and self.blocks:
            self._start_gather(self.blocks[0])       # block 0 gathers while the embeddings compute
        self._use(self.root)

    def _root_post(self, module, args, out):
        if not torch.is_grad_enabled():
            self.free(self.root)                     # no backward will come (sampling): free now
        return out

    def _block_pre(self, i: int):
        def hook(module, args):
            unit = self.blocks[i]
            self._start_gather(unit)
            if self.prefetch and i + 1 < len(self.blocks):
                self._start_gather(self.blocks[i + 1])
            self._use(unit)
        return hook

    def _block_post(self, i: int):
        def hook(module, args, out):
            unit = self.blocks[i]
            self.free(unit)                          # reshard after forward: 1/N of it stays
            if torch.is_grad_enabled():
                out = _BeforeBackward.apply(out, unit, self)
            return out
        return hook

    def before_backward(self, unit: FlatUnit) -> None:
        i = self.blocks.index(unit)
        self.refill(unit)
        if self.prefetch and i > 0:
            prev = self.blocks[i - 1]
            prev.alias.untyped_storage().resize_(prev.padded * prev.alias.element_size())
            self._start_gather(prev, into=prev.alias)
        self._event("backward", unit)

    @contextlib.contextmanager
    def no_sync(self):
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    # ------------------------------------------------------------ whole tensors, for checkpoints and the EMA
    def full_tensors(self, locals_: list[torch.Tensor], units: list | None = None) -> dict:
        """Shard-shaped tensors, one per unit (weights, EMA, a moment) -> {full name: whole tensor}. A collective.
        `units`: those units only (default: every unit, in order)."""
        out = {}
        for unit, local in zip(units or self.units, locals_):
            out.update({k: v.clone() for k, v in unit.unflatten(unit.gather_flat(local)).items()})
        return out

    def shards_of(self, full: dict) -> list[torch.Tensor]:
        """{full name: whole tensor} -> this rank's shard of every unit."""
        return [u.my_part(u.flatten(full)).clone() for u in self.units]


def main(argv=None) -> int:
    return convert_main("python -m dit_core.parallel.fsdp", "FSDP (DCP)", convert_checkpoint, argv)


if __name__ == "__main__":
    raise SystemExit(main())
