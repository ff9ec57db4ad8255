"""Fully sharded data parallelism (FSDP, 全分片数据并行): ZeRO-3's partitioning, written by hand, and
PyTorch's FSDP2 (`fully_shard`) as the reference.

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

Checkpoints are `torch.distributed.checkpoint` (DCP) folders: every parameter and AdamW moment under its
single-process name, each rank writing the dim-0 chunk FSDP2 would own (a DTensor sharded on dim 0). DCP
stores chunk metadata, so any number of ranks (or one process, or DDP) reads them back, each loading the
pieces it needs: hand-written and FSDP2 runs write the same checkpoint and resume each other's.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import CheckpointError, check_files, foreign, read_training_state
from ..config import ConfigError
from ..train import TrainHooks
from ..engine import EMA, TorchEngine, apply_schedule, clip_by_norm_, ema_decay, nonfinite_count
from .collectives import all_gather_flat, reduce_scatter_flat
from .dist import DistParallel

IMPLS = ("hand", "torch")


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
        ref = next(p for fqn, p in module.named_parameters() if not fqn.startswith(skip))
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

    def __init__(self, model: nn.Module, group=None, prefetch: bool = True, unit_per_block: bool = True):
        self.group, self.prefetch = group, prefetch
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
        return out.div_(self.world)

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
    def full_tensors(self, locals_: list[torch.Tensor]) -> dict:
        """Shard-shaped tensors, one per unit (weights, EMA, a moment) -> {full name: whole tensor}. A collective."""
        out = {}
        for unit, local in zip(self.units, locals_):
            out.update({k: v.clone() for k, v in unit.unflatten(unit.gather_flat(local)).items()})
        return out

    def shards_of(self, full: dict) -> list[torch.Tensor]:
        """{full name: whole tensor} -> this rank's shard of every unit."""
        return [u.my_part(u.flatten(full)).clone() for u in self.units]


# ---------------------------------------------------------------- the two implementations behind one interface

class HandLayout:
    """What the engine needs from a sharded model, for the hand-written FSDP."""

    def __init__(self, model, fsdp: FullyShardedDiT):
        self.model, self.fsdp = model, fsdp
        self.params = [u.shard for u in fsdp.units]

    def local(self, p):
        return p

    def fqns(self) -> list[str]:
        return [f for u in self.fsdp.units for f in u.fqns()]

    def full(self, locals_) -> dict:
        return self.fsdp.full_tensors(locals_)

    def shards(self, full: dict) -> list:
        return self.fsdp.shards_of(full)

    def no_sync(self):
        return self.fsdp.no_sync()


class TorchLayout:
    """The same members over FSDP2's DTensor parameters (each rank holds a dim-0 chunk of every parameter)."""

    def __init__(self, model):
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters()]
        self.params = [p for _, p in self.named]

    def local(self, p):
        return p.to_local()

    def fqns(self) -> list[str]:
        return [n for n, _ in self.named]

    def full(self, locals_) -> dict:
        from torch.distributed.tensor import DTensor
        return {n: DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                for (n, p), t in zip(self.named, locals_)}

    def shards(self, full: dict) -> list:
        from torch.distributed.tensor import distribute_tensor
        return [distribute_tensor(full[n].to(p.device, p.dtype), p.device_mesh, p.placements,
                                  src_data_rank=None).to_local()
                for n, p in self.named]

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


def shard_with_fsdp2(model: nn.Module, mesh, precision: str, reshard_root: bool = False):
    """FSDP2: each block one `fully_shard` unit, the root the rest. bf16 compute through its
    MixedPrecisionPolicy (parameters gathered in bf16, gradients reduced in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
          else MixedPrecisionPolicy())
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_root)
    return model


# ---------------------------------------------------------------- EMA, engine, strategy

class ShardedFlatEMA(EMA):
    """Each rank averages its own shards; whole (gathered) only when saved."""

    def __init__(self, layout):
        self.layout = layout
        self.shadow = [layout.local(p).detach().float().clone() for p in layout.params]

    @torch.no_grad()
    def update(self, model, decay: float, num_updates: int) -> None:
        d = ema_decay(decay, num_updates)
        torch._foreach_lerp_(self.shadow, [self.layout.local(p).detach().float() for p in self.layout.params], 1 - d)

    def state_dict(self) -> dict:
        """A collective: the whole EMA weights under the single-process names, on every rank."""
        return self.layout.full(self.shadow)

    def load_state_dict(self, sd: dict) -> None:
        self.shadow = [s.float() for s in self.layout.shards(sd)]


class FSDPEngine(TorchEngine):
    """TorchEngine over shards: sharded clipping, a sharded EMA, and DCP checkpoints."""

    name = "fsdp"
    saves_on_every_rank = True
    gradients_are_whole = False

    def __init__(self, model, par: "FSDPStrategy", cfg, device, layout):
        self.layout = layout
        super().__init__(model, par, cfg, device)
        self.params = list(layout.params)     # the optimizer's order (model.parameters()): root, block 0, ...

    def micro_step(self, last: bool):
        return contextlib.nullcontext() if last else self.layout.no_sync()

    def make_ema(self):
        return ShardedFlatEMA(self.layout)

    def update_ema(self, ema, decay: float, num_updates: int) -> None:
        ema.update(self.model, decay, num_updates)

    def nonfinite(self) -> torch.Tensor:
        return nonfinite_count([self.layout.local(p) for p in self.params])

    def state_info(self) -> dict:
        return {"fsdp_impl": self.par.impl, "world_size": self.par.world_size}

    def _locals(self, key: str | None) -> list:
        if key is None:
            return [self.layout.local(p).detach() for p in self.params]
        return [self.layout.local(self.optimizer.state[p][key]) for p in self.params]

    def save(self, folder: Path) -> None:
        """Every rank writes its chunk of every weight and moment into folder/dcp (one file per rank)."""
        import torch.distributed.checkpoint as dcp
        state = {"model": chunks(self.layout.full(self._locals(None)), self.par.mesh_1d)}
        if self.optimizer.state:
            state["optim"] = {k: chunks(self.layout.full(self._locals(k)), self.par.mesh_1d)
                              for k in ("exp_avg", "exp_avg_sq")}
            state["optim_step"] = self.optimizer.state[self.params[0]]["step"].detach().float().cpu().clone()
        dcp.save(state, checkpoint_id=str(folder / "dcp"))

    def load(self, folder: Path, device: torch.device) -> None:
        state = read_training_state(folder)
        if state.get("engine") != "fsdp":
            raise foreign(folder, state, "launchers/fsdp.py")
        fqns = self.layout.fqns()
        full = read_dcp(folder, {n: t.shape for n, t in self.layout.full(self._locals(None)).items()},
                        self.par.mesh_1d, fqns)
        with torch.no_grad():
            for p, s in zip(self.params, self.layout.shards(full["model"])):
                self.layout.local(p).copy_(s)
        if "optim" in full:
            moments = {k: self.layout.shards(v) for k, v in full["optim"].items()}
            load_moments(self.optimizer, self.params, moments, full["optim_step"], self.layout.local)
        self.scheduler.last_epoch = state["step"]
        apply_schedule(self.optimizer, self.scheduler, self.cfg, state["step"])


def chunks(full: dict, mesh) -> dict:
    """{name: whole tensor} -> {name: DTensor holding this rank's dim-0 chunk}: FSDP2's layout on disk."""
    from torch.distributed.tensor import Shard, distribute_tensor
    # src_data_rank=None: every rank holds the whole tensor already and keeps its chunk (no scatter)
    return {n: distribute_tensor(t.contiguous(), mesh, [Shard(0)], src_data_rank=None) for n, t in full.items()}


def read_dcp(folder: Path, shapes: dict, mesh, fqns: list[str]) -> dict:
    """Read an FSDP checkpoint's DCP folder into whole tensors ({"model": {...}, "optim": {...}, "optim_step"}).
    `mesh` None: one process (single.py, or every DDP rank reading all of it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    folder = Path(folder)
    check_files(folder, ("dcp/.metadata",))
    meta = FileSystemReader(str(folder / "dcp")).read_metadata().state_dict_metadata
    missing = [n for n in fqns if f"model.{n}" not in meta]
    if missing:
        raise CheckpointError(f"'{folder / 'dcp'}' has no {missing[0]} ({len(missing)} weights missing): it was "
                              f"written for another model; use the config it was trained with.")
    for n in fqns:
        if tuple(meta[f"model.{n}"].size) != tuple(shapes[n]):
            raise CheckpointError(f"'{folder / 'dcp'}' holds {n} of shape {tuple(meta[f'model.{n}'].size)}, this "
                                  f"model's is {tuple(shapes[n])}; use the config it was trained with.")

    def dest():
        if mesh is None:
            return {n: torch.zeros(shapes[n]) for n in fqns}
        return chunks({n: torch.zeros(shapes[n]) for n in fqns}, mesh)
    state = {"model": dest()}
    has_optim = "optim_step" in meta
    if has_optim:
        state["optim"] = {k: dest() for k in ("exp_avg", "exp_avg_sq")}
        state["optim_step"] = torch.zeros(())
    try:
        with warnings.catch_warnings():      # one process on purpose: DCP's "assuming a single process" is noise
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder / "dcp"), **({"no_dist": True} if mesh is None else {}))
    except Exception as e:
        raise CheckpointError(f"'{folder / 'dcp'}' cannot be read ({e.__class__.__name__}); the checkpoint is "
                              f"corrupt or truncated: pick another one.") from None

    def whole(d):
        return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in d.items()}
    out = {"model": whole(state["model"])}
    if has_optim:
        out["optim"] = {k: whole(v) for k, v in state["optim"].items()}
        out["optim_step"] = state["optim_step"]
    return out


def load_moments(optimizer, params, moments: dict, step: torch.Tensor, local=lambda p: p) -> None:
    """AdamW's state from per-parameter moments (shard-shaped or whole), through load_state_dict, which puts
    each value on the device and in the dtype AdamW keeps it (its `step` on the CPU unless fused)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {"step": step.clone(), "exp_avg": moments["exp_avg"][i], "exp_avg_sq": moments["exp_avg_sq"][i]}
                   for i in range(len(params))}
    optimizer.load_state_dict(sd)
    if params and hasattr(params[0], "to_local"):
        # FSDP2: the moments must be DTensors like their parameters
        from torch.distributed.tensor import DTensor
        for p in params:
            st = optimizer.state[p]
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = DTensor.from_local(st[k], p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def load_into_plain(folder: Path, model: nn.Module, optimizer) -> None:
    """An FSDP checkpoint into a whole model and its AdamW (single.py, DDP): every process reads all of it."""
    names = [n for n, _ in model.named_parameters()]
    full = read_dcp(folder, {n: p.shape for n, p in model.named_parameters()}, None, names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(full["model"][n])
    if "optim" in full and optimizer is not None:
        moments = {k: [v[n] for n in names] for k, v in full["optim"].items()}
        load_moments(optimizer, list(model.parameters()), moments, full["optim_step"])


class FSDPStrategy(DistParallel):
    """How `dit_core.train` runs under FSDP: the batch split and the logged loss as DDP's, the model
    sharded before the optimizer is built, the gradient norm summed over the shards."""

    def __init__(self, env, impl: str = "hand", prefetch: bool = True, unit: str = "block"):
        if impl not in IMPLS:
            raise ConfigError(f"--impl {impl!r} is not one of {', '.join(IMPLS)}.")
        if unit not in ("block", "model"):
            raise ConfigError(f"--unit {unit!r} is not block or model.")
        if unit == "model" and impl == "torch":
            raise ConfigError("--unit model is a hand-written FSDP comparison; use --impl hand with it.")
        super().__init__(env)
        self.impl, self.prefetch, self.unit = impl, prefetch, unit
        self.fsdp = None
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh_1d = init_device_mesh(env.device.type, (env.world_size,))

    def make_engine(self, model, cfg, device):
        self.psi = sum(p.numel() for p in model.parameters())
        if cfg.train.compile:
            raise ConfigError("train.compile=true with launchers/fsdp.py: the hand-written units swap weights in "
                              "hooks that torch.compile would trace around; use --set train.compile=false.")
        if self.impl == "hand":
            self.fsdp = FullyShardedDiT(model, prefetch=self.prefetch, unit_per_block=self.unit == "block")
            layout = HandLayout(model, self.fsdp)
        else:
            shard_with_fsdp2(model, self.mesh_1d, cfg.train.precision)
            layout = TorchLayout(model)
        return FSDPEngine(model, self, cfg, device, layout)

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """The whole model's gradient norm from the shards: each rank's sum of squares, summed over the ranks
        (padding contributes zeros). Every rank then scales its shards by the same factor."""
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params) if g is not None]
        sq = torch.stack([g.float().square().sum() for g in grads]).sum() if grads else torch.zeros(())
        dist.all_reduce(sq)
        return clip_by_norm_(grads, sq.sqrt(), max_norm)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size


# ---------------------------------------------------------------- what a rank holds and sends, measured

def memory_ledger(engine: FSDPEngine) -> dict:
    """Bytes this rank holds now, by category, from the tensors themselves (each storage counted once)."""
    from .zero_report import _Tally
    t, lay = _Tally(), engine.layout
    for p in engine.params:
        t.add("parameters", lay.local(p))
        if p.grad is not None:
            t.add("gradients", lay.local(p.grad))
    fsdp = engine.par.fsdp
    if fsdp is not None:
        for u in fsdp.units:
            t.add("gradients", u.grad_acc)             # the unsharded gradient kept across no_sync micro-steps
    for st in engine.optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                t.add("optimizer", lay.local(v))
    return t.bytes


class FSDPReport(TrainHooks):
    """`launchers/fsdp.py --report PATH`: one step (step 1: Adam's state exists) measured on every rank:
    the model-state bytes after the first micro-batch's backward, every collective's bytes, the gathered peak
    (hand); rank 0 writes them beside the formulas (16Ψ/N bytes of fp32 model states, 3Ψ(N-1)/N elements sent)."""

    def __init__(self, path, cfg, strategy, step: int = 1):
        self.path, self.cfg, self.strategy, self.step = Path(path), cfg, strategy, step
        self.memory = self.counter = None

    def step_begin(self, step, engine):
        if step == self.step:
            from .zero_report import CommCounter
            fsdp = self.strategy.fsdp
            if fsdp is not None:
                fsdp.peak_live, fsdp.timeline = fsdp.live, []
            if torch.cuda.is_available() and self.strategy.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.counter = CommCounter().__enter__()

    def after_backward(self, step, micro, engine):
        if step == self.step and micro == 0:
            self.memory = memory_ledger(engine)

    def step_end(self, step, engine):
        if step != self.step:
            return
        from .zero_report import comm_formula, formula
        self.counter.__exit__(None, None, None)
        fsdp, world = self.strategy.fsdp, self.strategy.world_size
        mine = {"rank": dist.get_rank(), "memory": self.memory, "comm_bytes": dict(self.counter.bytes),
                "comm_calls": dict(self.counter.calls), "comm_ring_bytes": self.counter.ring_bytes(world),
                "gathered_peak_bytes": fsdp.peak_live * 4 if fsdp is not None else None,
                "cuda_peak_bytes": (torch.cuda.max_memory_allocated() if self.strategy.device.type == "cuda"
                                    else None)}
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
        if dist.get_rank() != 0:
            return
        psi = self.strategy.psi
        report = {"impl": self.strategy.impl, "unit": self.strategy.unit, "prefetch": self.strategy.prefetch,
                  "world_size": world, "psi": psi, "grad_accum": self.cfg.train.grad_accum,
                  "precision": self.cfg.train.precision, "measured_at_step": self.step,
                  "units": ([{"name": u.name, "numel": u.numel, "padded": u.padded, "shard": u.shard_numel}
                             for u in fsdp.units] if fsdp is not None else None),
                  "timeline": fsdp.timeline if fsdp is not None else None,
                  "formula": formula(3, psi, world, self.cfg.train.precision),
                  "comm_formula_bytes": comm_formula(3, psi, world, self.cfg.train.grad_accum) * 4,
                  "ranks": ranks}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------- plain weights from an FSDP checkpoint

def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """An FSDP checkpoint folder -> a plain one (model.pt, ema.pt, training_state.json), in one process."""
    from ..checkpoint import model_from_checkpoint
    src, dst = Path(src), Path(dst)
    state = read_training_state(src)
    if state.get("engine") != "fsdp":
        raise CheckpointError(f"'{src}' is not an FSDP checkpoint (training_state.json says engine "
                              f"{state.get('engine', 'torch')!r}); it needs no conversion.")
    if dst.exists():
        raise CheckpointError(f"'{dst}' already exists; pass a new folder to write the plain checkpoint into.")
    model, _ = model_from_checkpoint(src)            # the architecture (and the EMA weights, replaced below)
    load_into_plain(src, model, None)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    shutil.copy(src / "ema.pt", tmp / "ema.pt")
    (tmp / "training_state.json").write_text(json.dumps({**state, "engine": "torch", "converted_from": str(src)},
                                                        indent=1))
    tmp.rename(dst)
    return dst


def main(argv=None) -> int:
    from ..config import parser
    from ..errors import run_main
    p = parser(prog="python -m dit_core.parallel.fsdp")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="FSDP (DCP) checkpoint folder -> plain checkpoint folder")
    c.add_argument("src")
    c.add_argument("dst")

    def run(_):
        args = p.parse_args(argv)
        out = convert_checkpoint(args.src, args.dst)
        print(f"wrote {out} (model.pt, ema.pt, training_state.json)")
    run_main(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
