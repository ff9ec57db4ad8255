"""FSDP in the training loop: the hand-written FSDP (dit_core.parallel.fsdp) and PyTorch's FSDP2 behind one
`Parallel` (the batch split and logged loss of DDP, the norm summed over shards) and one engine (a sharded EMA, DCP
checkpoints), and `--report`: what a rank holds and sends in one step, measured.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import foreign, read_training_state
from ..config import ConfigError
from ..engine import EMA, TorchEngine, apply_schedule, clip_by_norm_, ema_decay, weight_stats
from .dist import DistStrategy
from .fsdp import FullyShardedDiT
from .measure import OneStepReport, Tally
from .zero_report import comm_formula, formula
from ..checkpoint_dcp import chunks, load_moments, read_dcp

IMPLS = ("hand", "torch")


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

    def shapes(self) -> dict:
        return {fqn: shape for u in self.fsdp.units for _, _, fqn, shape, _, _ in u.slots}

    def full(self, locals_) -> dict:
        return self.fsdp.full_tensors(locals_)

    def chunked(self, locals_, mesh) -> dict:
        """{full name: DTensor of this rank's dim-0 chunk}, the checkpoint layout: one unit whole at a time."""
        out = {}
        for unit, local in zip(self.fsdp.units, locals_):
            out.update(chunks(self.fsdp.full_tensors([local], [unit]), mesh))
        return out

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

    def shapes(self) -> dict:
        return {n: p.shape for n, p in self.named}

    def full(self, locals_) -> dict:
        from torch.distributed.tensor import DTensor
        return {n: DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                for (n, p), t in zip(self.named, locals_)}

    def chunked(self, locals_, mesh) -> dict:
        """FSDP2 already holds every parameter (and moment) as a dim-0 chunk: the checkpoint layout, no gathering."""
        from torch.distributed.tensor import DTensor
        return {n: DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
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
    gradients_are_whole = True       # named_gradients gathers them from the shards (--dump-grads)

    def __init__(self, model, strategy: "FSDPStrategy", cfg, device, layout):
        self.layout = layout
        super().__init__(model, strategy, cfg, device)
        self.params = list(layout.params)     # the optimizer's order (model.parameters()): root, block 0, ...

    def micro_step(self, last: bool):
        return contextlib.nullcontext() if last else self.layout.no_sync()

    def named_gradients(self) -> dict:
        """Every parameter's whole gradient under its single-process name, gathered from this step's reduced
        gradient shards (a collective: every rank calls it; --dump-grads). Zeros where backward left none."""
        lay = self.layout
        grads = [lay.local(p.grad) if p.grad is not None else torch.zeros_like(lay.local(p)) for p in self.params]
        full = lay.full([g.detach() for g in grads])
        return {n: full[n] for n in lay.fqns()}

    def make_ema(self):
        return ShardedFlatEMA(self.layout)

    def update_ema(self, ema, decay: float, num_updates: int) -> None:
        ema.update(self.model, decay, num_updates)

    def weight_stats(self) -> torch.Tensor:
        return weight_stats([self.layout.local(p) for p in self.params])

    def state_info(self) -> dict:
        return {"fsdp_impl": self.strategy.impl, "world_size": self.strategy.world_size}

    def _locals(self, key: str | None) -> list:
        if key is None:
            return [self.layout.local(p).detach() for p in self.params]
        return [self.layout.local(self.optimizer.state[p][key]) for p in self.params]

    def save(self, folder: Path) -> None:
        """Every rank writes its chunk of every weight and moment into folder/dcp (one file per rank)."""
        import torch.distributed.checkpoint as dcp
        mesh = self.strategy.mesh_1d
        state = {"model": self.layout.chunked(self._locals(None), mesh)}
        if self.optimizer.state:
            state["optim"] = {k: self.layout.chunked(self._locals(k), mesh) for k in ("exp_avg", "exp_avg_sq")}
            state["optim_step"] = self.optimizer.state[self.params[0]]["step"].detach().float().cpu().clone()
        dcp.save(state, checkpoint_id=str(folder / "dcp"))

    def load_weights(self, sd: dict) -> None:
        with torch.no_grad():                      # this rank's shard of every whole weight
            for p, s in zip(self.params, self.layout.shards(sd)):
                self.layout.local(p).copy_(s)

    def load(self, folder: Path, device: torch.device) -> None:
        state = read_training_state(folder)
        if state.get("engine") != "fsdp":
            raise foreign(folder, state, "launchers/fsdp.py")
        full = read_dcp(folder, self.layout.shapes(), self.strategy.mesh_1d, self.layout.fqns())
        with torch.no_grad():
            for p, s in zip(self.params, self.layout.shards(full["model"])):
                self.layout.local(p).copy_(s)
        if "optim" in full:
            moments = {k: self.layout.shards(v) for k, v in full["optim"].items()}
            load_moments(self.optimizer, self.params, moments, full["optim_step"], self.layout.local)
        self.scheduler.last_epoch = state["step"]
        apply_schedule(self.optimizer, self.scheduler, self.cfg, state["step"])


class FSDPStrategy(DistStrategy):
    """How `dit_core.train` runs under FSDP: the batch split and the logged loss as DDP's, the model
    sharded before the optimizer is built, the gradient norm summed over the shards."""

    # (teaching, hand) average: the reduce-scattered gradient shards summed over the ranks, never divided by N
    BROKEN = ("average",)

    def __init__(self, env, impl: str = "hand", prefetch: bool = True, unit: str = "block",
                 broken: str | None = None):
        if impl not in IMPLS:
            raise ConfigError(f"--impl {impl!r} is not one of {', '.join(IMPLS)}.")
        if broken not in (None, *self.BROKEN):
            raise ConfigError(f"--break {broken} is not one of {', '.join(self.BROKEN)}.")
        if broken and impl != "hand":
            raise ConfigError(f"--break {broken} changes the hand-written FSDP; use it with --impl hand.")
        if unit not in ("block", "model"):
            raise ConfigError(f"--unit {unit!r} is not block or model.")
        if unit == "model" and impl == "torch":
            raise ConfigError("--unit model is a hand-written FSDP comparison; use --impl hand with it.")
        super().__init__(env)
        self.impl, self.prefetch, self.unit, self.broken = impl, prefetch, unit, broken
        self.fsdp = None
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh_1d = init_device_mesh(env.device.type, (env.world_size,))

    def make_engine(self, model, cfg, device):
        self.psi = sum(p.numel() for p in model.parameters())
        if cfg.train.compile:
            raise ConfigError("train.compile=true with launchers/fsdp.py: the hand-written units swap weights in "
                              "hooks that torch.compile would trace around; use --set train.compile=false.")
        if self.impl == "hand":
            self.fsdp = FullyShardedDiT(model, prefetch=self.prefetch, unit_per_block=self.unit == "block",
                                        broken=self.broken)
            layout = HandLayout(model, self.fsdp)
        else:
            shard_with_fsdp2(model, self.mesh_1d, cfg.train.precision)
            layout = TorchLayout(model)
        return FSDPEngine(model, self, cfg, device, layout)

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """The whole model's gradient norm from the shards: each rank's sum of squares, summed over the ranks
        (padding contributes zeros). Every rank then scales its shards by the same factor.

        The squares are summed in float64. Which elements a rank's partial sum holds depends on the layout (the
        unit size, hand-written flat shards or FSDP2's per-parameter chunks): a float32 sum rounds differently
        for each grouping, and that last bit of the norm moved the clipping factor and the run (tests/test_fsdp.py's
        parity DiT, one unit vs a unit per block: bitwise the same gradients at step 1, norms 0.74525040 vs
        0.74525046). In float64 the grouping changes the sum far below float32's rounding step, so the norm rounds
        to the same float32 in every layout (tests/test_fsdp.py checks it bitwise on 2 ranks)."""
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params) if g is not None]
        device = grads[0].device if grads else self.device
        sq = (torch.stack([g.float().square().sum(dtype=torch.float64) for g in grads]).sum() if grads
              else torch.zeros((), dtype=torch.float64, device=device))
        dist.all_reduce(sq)
        return clip_by_norm_(grads, sq.sqrt().float(), max_norm)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size


# ---------------------------------------------------------------- what a rank holds and sends, measured

def memory_ledger(engine: FSDPEngine) -> dict:
    """Bytes this rank holds now, by category, from the tensors themselves (each storage counted once)."""
    t, lay = Tally(), engine.layout
    for p in engine.params:
        t.add("parameters", lay.local(p))
        if p.grad is not None:
            t.add("gradients", lay.local(p.grad))
    fsdp = engine.strategy.fsdp
    if fsdp is not None:
        for u in fsdp.units:
            t.add("gradients", u.grad_acc)             # the unsharded gradient kept across no_sync micro-steps
    for st in engine.optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                t.add("optimizer", lay.local(v))
    return t.bytes


class GatheredProbe:
    """The gathered (whole) weights a rank holds, measured from the storages themselves, not from the hand-written
    implementation's own counter (FullyShardedDiT.peak_live): every buffer an all-gather writes into is remembered
    by a weak reference (the probe keeps nothing alive), and so is every plain parameter a module holds (FSDP2
    registers the unsharded weights on its modules while a unit is whole). At every collective call (before and
    after) and at every block's forward boundary the probe sums the sizes those storages have *now* (a freed
    storage has size 0), each storage once, the shards excluded. The largest sum is the gathered peak."""

    GATHERS = ("all_gather_into_tensor", "all_gather_single")

    def __init__(self, model: nn.Module, shards: list):
        self.model, self.peak, self.samples, self.parts = model, 0, 0, {}
        self.shards = {t.untyped_storage().data_ptr() for t in shards}
        self.outs, self._saved, self._hooks = [], {}, []

    def sample(self, *_):
        from torch.distributed.tensor import DTensor
        gathered, kept = {}, []
        for ref in self.outs:
            t = ref()
            if t is not None:
                kept.append(ref)
                st = t.untyped_storage()
                gathered[st.data_ptr()] = st.nbytes()
        self.outs = kept
        params = {}
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None and not isinstance(p, DTensor):
                    st = p.untyped_storage()
                    params[st.data_ptr()] = st.nbytes()
        live = {**gathered, **params}
        total = sum(b for ptr, b in live.items() if ptr and ptr not in self.shards)
        if total > self.peak:
            # what the peak is made of: all-gather buffers, and plain parameters that are not views of one
            outside = sum(b for ptr, b in params.items() if ptr and ptr not in self.shards and ptr not in gathered)
            self.parts = {"all_gather_buffers": total - outside, "other_parameters": outside}
        self.peak = max(self.peak, total)
        self.samples += 1

    def __enter__(self):
        import functools
        import weakref
        names = {"all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", *self.GATHERS}
        for name in names:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            @functools.wraps(fn)
            def probed(*args, _fn=fn, _gather=name in self.GATHERS, **kwargs):
                if _gather:
                    self.outs.append(weakref.ref(kwargs.get("output_tensor", args[0] if args else None)))
                self.sample()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.sample()
            setattr(dist, name, probed)
        for m in (self.model, *self.model.blocks):
            self._hooks += [m.register_forward_pre_hook(self.sample), m.register_forward_hook(self.sample)]
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        for h in self._hooks:
            h.remove()


def step_peak(prof) -> int | None:
    """The largest bytes allocated above the step's start, at any moment of it, from the profiler's record of
    every allocation and free of this process's allocator (torch.profiler, profile_memory=True)."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:            # another torch keeps its results elsewhere: no number rather than a wrong one
        return None
    run = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        run += nbytes
        peak = max(peak, run)
    return peak


class FSDPReport(OneStepReport):
    """`launchers/fsdp.py --report PATH`: one step (step 1: Adam's state exists) measured on every rank:
    the model-state bytes after the first micro-batch's backward, every collective's bytes, the gathered peak (from
    the storages, GatheredProbe; and the hand-written implementation's own counter beside it), the peak of all the
    step's allocations (torch.profiler) above what the rank held when the step began, and which piece of every
    parameter the rank holds; rank 0 writes them beside the formulas (16Ψ/N bytes of fp32 model states, 3Ψ(N-1)/N
    elements sent)."""

    def __init__(self, path, cfg, strategy, step: int = 1):
        super().__init__(path, cfg, strategy, step)
        self.probe = self.prof = self.at_start = None

    def begin(self, engine):
        fsdp = self.strategy.fsdp
        if fsdp is not None:
            fsdp.peak_live, fsdp.timeline = fsdp.live, []
        if torch.cuda.is_available() and self.strategy.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.at_start = memory_ledger(engine)      # weights and Adam's moments (no gradient yet)
        self.probe = GatheredProbe(engine.model, [engine.layout.local(p) for p in engine.params]).__enter__()
        if self.strategy.device.type == "cpu":
            from torch.profiler import ProfilerActivity, profile
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True).__enter__()

    def measure(self, engine) -> dict:
        return memory_ledger(engine)

    def end(self, engine):
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
        self.probe.__exit__(None, None, None)         # unwrapped first: it wrapped the counter's wrappers

    def rank_record(self, engine) -> dict:
        fsdp = self.strategy.fsdp
        return {"gathered_peak_bytes": fsdp.peak_live * 4 if fsdp is not None else None,
                "gathered_peak_measured_bytes": self.probe.peak, "probe_samples": self.probe.samples,
                "gathered_peak_parts": self.probe.parts,
                "held_at_step_start": self.at_start,
                "step_peak_bytes": step_peak(self.prof) if self.prof is not None else None,
                "pieces": self.pieces(engine),
                "cuda_peak_bytes": (torch.cuda.max_memory_allocated() if self.strategy.device.type == "cuda"
                                    else None)}

    def report(self, ranks: list, engine) -> dict:
        fsdp, world, psi = self.strategy.fsdp, self.strategy.world_size, self.strategy.psi
        return {"impl": self.strategy.impl, "unit": self.strategy.unit, "prefetch": self.strategy.prefetch,
                "world_size": world, "psi": psi, "grad_accum": self.cfg.train.grad_accum,
                "precision": self.cfg.train.precision, "measured_at_step": self.step,
                "units": ([{"name": u.name, "numel": u.numel, "padded": u.padded, "shard": u.shard_numel}
                           for u in fsdp.units] if fsdp is not None else None),
                "timeline": fsdp.timeline if fsdp is not None else None,
                "formula": formula(3, psi, world, self.cfg.train.precision),
                "comm_formula_bytes": comm_formula(3, psi, world, self.cfg.train.grad_accum) * 4,
                "ranks": ranks}

    def pieces(self, engine) -> dict:
        """{parameter name: elements of it this rank holds}, from the sharded objects: FSDP2's local DTensor chunk
        of each parameter; for the hand-written units, the overlap of each parameter's place in its flat vector
        with this rank's shard [r*s, (r+1)*s)."""
        fsdp = self.strategy.fsdp
        if fsdp is None:
            lay = engine.layout
            return {n: lay.local(p).numel() for n, p in lay.named}
        out = {}
        for u in fsdp.units:
            lo = u.rank * u.shard_numel
            for _, _, fqn, _, off, n in u.slots:
                out[fqn] = max(0, min(off + n, lo + u.shard_numel) - max(off, lo))
        return out
