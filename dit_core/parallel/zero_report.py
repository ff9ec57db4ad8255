"""What a ZeRO rank really holds and sends: measured, then put beside the ZeRO paper's formulas.

Memory: after the first micro-batch's backward of a step with gradient accumulation (the moment
a rank holds parameters, accumulated gradients and optimizer state at once), walk every tensor
the DeepSpeed engine and its optimizer hold, count each storage once, and sort it into
parameters / gradients / optimizer state / buffers.

Communication: during one whole step, every torch.distributed collective that DeepSpeed
issues is counted (bytes of its tensor), and converted into what a bandwidth-optimal (ring)
algorithm sends per rank: all-reduce 2(N-1)/N of the data, reduce-scatter / all-gather /
reduce / broadcast (N-1)/N.
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..engine import TrainHooks

CATEGORIES = ("parameters", "gradients", "optimizer", "buffers")


# ---------------------------------------------------------------- memory

class Tally:
    """Bytes per category, each storage counted once (flat buffers are shared by many views)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys(CATEGORIES, 0)

    def add(self, category: str, t) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        st = t.untyped_storage()
        if st.data_ptr() in self.seen or st.nbytes() == 0:
            return
        self.seen.add(st.data_ptr())
        self.bytes[category] += st.nbytes()

    def walk(self, category: str, obj, depth: int = 0, _ids=None) -> None:
        """Every tensor reachable from obj through lists, dicts and DeepSpeed objects."""
        _ids = set() if _ids is None else _ids
        if depth > 4 or id(obj) in _ids:
            return
        _ids.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.add(category, obj)
            if obj.grad is not None:
                self.add("gradients", obj.grad)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                self.walk(category, x, depth + 1, _ids)
        elif isinstance(obj, dict):
            for x in obj.values():
                self.walk(category, x, depth + 1, _ids)
        elif isinstance(obj, torch.optim.Optimizer):
            self.walk(category, obj.state, depth + 1, _ids)
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__") \
                and not isinstance(obj, torch.nn.Module):
            for x in vars(obj).values():
                self.walk(category, x, depth + 1, _ids)


def measure_memory(engine) -> dict:
    """Bytes this rank holds, by category. `engine` is a dit_core.parallel.zero.DeepSpeedEngine."""
    opt = engine.engine.optimizer          # DeepSpeed's ZeRO optimizer (or the client one, stage 0)
    inner = getattr(opt, "optimizer", opt)  # the torch AdamW inside it
    params = list(engine.model.parameters())
    t = Tally()
    # Parameters: the module's weights. Stages 1-2 keep them as views of one flat buffer;
    # stage 3 keeps a partition (ds_tensor) and the full tensor only while gathered or persistent.
    for p in params:
        t.add("parameters", getattr(p, "ds_tensor", None))
        t.add("parameters", p.data)
    # Gradients: full .grad on the module, or DeepSpeed's reduced partitions.
    for p in params:
        t.add("gradients", p.grad)
    for name in ("averaged_gradients", "all_grad_tensors", "grads_in_partition", "grad_partitions_flat_buffer",
                 "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
        t.walk("gradients", getattr(opt, name, None))
    # Optimizer state: Adam's two moments, and the fp32 master partition the optimizer updates.
    t.walk("optimizer", inner.state)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        t.walk("optimizer", getattr(opt, name, None))
    # Anything else the ZeRO optimizer holds: communication buckets and staging buffers.
    if opt is not inner:
        t.walk("buffers", opt)
    return t.bytes


def formula(stage: int, psi: int, world: int, precision: str) -> dict:
    """The ZeRO paper's model-state bytes per rank (Rajbhandari et al. 2020, section 3 and 5).

    Mixed precision: 2Ψ bf16/fp16 weights + 2Ψ gradients + 12Ψ optimizer state (fp32 master,
    momentum, variance). fp32: 4Ψ + 4Ψ + 8Ψ (momentum, variance; the weights are the master).
    Stage 1 partitions the optimizer state, stage 2 also the gradients, stage 3 also the weights."""
    w, g, o = (2, 2, 12) if precision in ("bf16", "fp16") else (4, 4, 8)
    part = {k: (1 / world if stage >= s else 1.0) for k, s in (("optimizer", 1), ("gradients", 2), ("parameters", 3))}
    return {"parameters": w * psi * part["parameters"], "gradients": g * psi * part["gradients"],
            "optimizer": o * psi * part["optimizer"]}


def deepspeed_estimate(stage: int, psi: int, largest_layer: int, world: int) -> float | None:
    """DeepSpeed's own estimator of model-state bytes per GPU (no offload), for stages 2 and 3."""
    try:
        if stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
            return float(estimate_zero2_model_states_mem_needs(psi, world, 1, cpu_offload=False)[1])
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            return float(estimate_zero3_model_states_mem_needs(psi, largest_layer, world, 1, cpu_offload=False,
                                                              cpu_offload_params=False, zero_init=True)[1])
    except Exception:           # the estimators' signatures move between releases
        return None
    return None


# ---------------------------------------------------------------- communication

def comm_formula(stage: int, psi: int, world: int, accum: int = 1) -> float:
    """Elements one rank sends per optimizer step (ring algorithms), after the ZeRO paper:
    DP all-reduces the gradients once (2Ψ); ZeRO-1 reduce-scatters them once and all-gathers
    the updated weights (Ψ + Ψ); ZeRO-2 cannot keep a full gradient across micro-batches, so it
    reduce-scatters after each one (accum·Ψ + Ψ); ZeRO-3 gathers the weights for forward and again
    for backward, then reduce-scatters, every micro-batch (3Ψ each)."""
    units = {0: 2, 1: 2, 2: accum + 1, 3: 3 * accum}[stage]
    return units * psi * (world - 1) / world


_FACTORS = {"all_reduce": "2(N-1)/N", "reduce_scatter_tensor": "(N-1)/N", "all_gather_into_tensor": "(N-1)/N",
            "reduce": "(N-1)/N", "broadcast": "(N-1)/N", "all_gather": "(N-1)/N", "reduce_scatter": "(N-1)/N",
            "all_reduce_coalesced": "2(N-1)/N", "all_to_all_single": "(N-1)/N",
            "all_gather_single": "(N-1)/N", "reduce_scatter_single": "(N-1)/N"}   # torch >= 2.14's names


def _payload(name: str, args, kwargs) -> int:
    def nbytes(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(nbytes(y) for y in x)
        return 0
    if name in ("all_gather_into_tensor", "all_gather", "all_to_all_single", "all_gather_single"):
        first = kwargs.get("output_tensor", kwargs.get("tensor_list", kwargs.get("output", args[0] if args else None)))
    elif name in ("reduce_scatter_tensor", "reduce_scatter", "reduce_scatter_single"):
        first = kwargs.get("input", kwargs.get("input_list", args[1] if len(args) > 1 else None))
    else:
        first = kwargs.get("tensor", kwargs.get("tensors", args[0] if args else None))
    return nbytes(first)


class CommCounter:
    """Count the bytes of every collective issued while active (outermost calls only)."""

    def __init__(self):
        self.calls, self.bytes = defaultdict(int), defaultdict(int)
        self._saved, self._depth = {}, 0

    def __enter__(self):
        targets = [(dist, name, name) for name in _FACTORS]
        try:   # DeepSpeed's backend binds these two at init, so patch its copies too
            from deepspeed.comm import comm as ds_comm
            if ds_comm.cdb is not None:
                targets += [(ds_comm.cdb, "all_gather_function", "all_gather_into_tensor"),
                            (ds_comm.cdb, "reduce_scatter_function", "reduce_scatter_tensor")]
        except ImportError:
            pass
        for owner, attr, name in targets:
            fn = getattr(owner, attr, None)
            if fn is not None:
                self._saved[(owner, attr)] = fn
                setattr(owner, attr, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for (owner, attr), fn in self._saved.items():
            setattr(owner, attr, fn)
        self._saved.clear()

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls[name] += 1
                self.bytes[name] += _payload(name, args, kwargs)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def ring_bytes(self, world: int) -> float:
        """Bytes one rank sends with bandwidth-optimal algorithms."""
        f = (world - 1) / world
        return sum(b * (2 * f if _FACTORS[k].startswith("2") else f) for k, b in self.bytes.items())


# ---------------------------------------------------------------- the launcher's report

class StepReport(TrainHooks):
    """Measure memory and communication of one step (default: step 1, after Adam's state exists)
    on every rank; rank 0 writes a JSON with the formulas beside the measurements."""

    def __init__(self, path: str | Path, cfg, strategy, step: int = 1):
        self.path, self.cfg, self.strategy, self.step = Path(path), cfg, strategy, step
        self.memory, self.counter = None, None

    def step_begin(self, step, engine):
        if step == self.step:
            self.counter = CommCounter().__enter__()

    def after_backward(self, step, micro, engine):
        if step == self.step and micro == 0:
            self.memory = measure_memory(engine)

    def step_end(self, step, engine):
        if step != self.step:
            return
        self.counter.__exit__(None, None, None)
        world, stage, prec = self.strategy.world_size, self.strategy.stage, self.cfg.train.precision
        params = list(engine.model.parameters())
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        largest = max(getattr(p, "ds_numel", p.numel()) for p in params)
        mine = {"rank": dist.get_rank(), "memory": self.memory,
                "comm_bytes": dict(self.counter.bytes), "comm_calls": dict(self.counter.calls),
                "comm_ring_bytes": self.counter.ring_bytes(world),
                "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() and
                engine.model.x_embedder.weight.is_cuda else None}
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
        if dist.get_rank() != 0:
            return
        elem = 2 if prec in ("bf16", "fp16") else 4
        report = {
            "stage": stage, "world_size": world, "precision": prec, "psi": psi, "largest_param": largest,
            "grad_accum": self.cfg.train.grad_accum, "measured_at_step": self.step,
            "persistence_threshold": self.strategy.persistence_threshold,
            "formula": formula(stage, psi, world, prec),
            # DeepSpeed keeps a separate fp32 master partition even when training in fp32.
            "fp32_master_extra": (4 * psi / world if prec == "fp32" and stage >= 1 else 0.0),
            "deepspeed_estimate": deepspeed_estimate(stage, psi, largest, world),
            "comm_formula_bytes": comm_formula(stage, psi, world, self.cfg.train.grad_accum) * elem,
            "ranks": ranks,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(report, indent=1))
