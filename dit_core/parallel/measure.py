"""What one rank holds and sends during one training step, measured (not modelled): the pieces every `--report` shares.

Communication (CommCounter): while active, every torch.distributed collective is counted at the call (the outermost
call only, so a collective built from another counts once): how many calls of each kind, and the bytes of the tensor
each one carries. `ring_bytes` converts them into what a bandwidth-optimal (ring) algorithm sends per rank: all-reduce
2(N-1)/N of the data; reduce-scatter, all-gather, all-to-all, reduce and broadcast (N-1)/N.

Memory (Tally): the bytes a rank holds by category (parameters / gradients / optimizer / buffers), from the tensors
themselves, each storage counted once (flat buffers are shared by many views).

OneStepReport: the lifecycle of one measured step, done once for every strategy: the counter runs from `step_begin`
to `step_end` of the measured step, memory is taken after the first micro-batch's backward (when a rank holds
parameters, accumulated gradients and optimizer state at once), every rank's record is gathered, and rank 0 writes
the strategy's report as JSON. A strategy's report (zero_report.StepReport, fsdp_train.FSDPReport) says what to
measure, what each rank adds and what the report puts beside the measurements (the formulas).
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..scratch import write_atomic
from ..strategy import TrainHooks

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


# ---------------------------------------------------------------- communication

FACTORS = {"all_reduce": "2(N-1)/N", "reduce_scatter_tensor": "(N-1)/N", "all_gather_into_tensor": "(N-1)/N",
           "reduce": "(N-1)/N", "broadcast": "(N-1)/N", "all_gather": "(N-1)/N", "reduce_scatter": "(N-1)/N",
           "all_reduce_coalesced": "2(N-1)/N", "all_to_all_single": "(N-1)/N",
           "all_gather_single": "(N-1)/N", "reduce_scatter_single": "(N-1)/N"}   # torch >= 2.14's names


def payload(name: str, args, kwargs) -> int:
    """Bytes of the tensor a collective carries: the gathered output of an all-gather / all-to-all, the input of a
    reduce-scatter, the tensor itself otherwise."""
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
        targets = [(dist, name, name) for name in FACTORS]
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
                self.bytes[name] += payload(name, args, kwargs)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def ring_bytes(self, world: int) -> float:
        """Bytes one rank sends with bandwidth-optimal algorithms."""
        f = (world - 1) / world
        return sum(b * (2 * f if FACTORS[k].startswith("2") else f) for k, b in self.bytes.items())


# ---------------------------------------------------------------- one measured step

class OneStepReport(TrainHooks):
    """Measure memory and communication of one step (default: step 1, after Adam's state exists) on every rank;
    rank 0 writes `report(ranks, engine)` as JSON to `path`.

    A subclass provides `measure(engine)` (the bytes held, taken after micro-batch 0's backward), `rank_record(engine)`
    (what each rank adds to its record, after the counter's bytes) and `report(ranks, engine)` (rank 0's JSON), and may
    hook `begin(engine)` (right after the counter starts) and `end(engine)` (right before it stops)."""

    def __init__(self, path: str | Path, cfg, strategy, step: int = 1):
        self.path, self.cfg, self.strategy, self.step = Path(path), cfg, strategy, step
        self.memory, self.counter = None, None

    # the subclass's parts
    def begin(self, engine) -> None: ...

    def end(self, engine) -> None: ...

    def measure(self, engine) -> dict:
        raise NotImplementedError

    def rank_record(self, engine) -> dict:
        return {}

    def report(self, ranks: list, engine) -> dict:
        raise NotImplementedError

    # the lifecycle (TrainHooks)
    def step_begin(self, step, engine):
        if step == self.step:
            self.counter = CommCounter().__enter__()
            self.begin(engine)

    def after_backward(self, step, micro, engine):
        if step == self.step and micro == 0:
            self.memory = self.measure(engine)

    def step_end(self, step, engine):
        if step != self.step:
            return
        self.end(engine)
        self.counter.__exit__(None, None, None)
        world = self.strategy.world_size
        mine = {"rank": dist.get_rank(), "memory": self.memory,
                "comm_bytes": dict(self.counter.bytes), "comm_calls": dict(self.counter.calls),
                "comm_ring_bytes": self.counter.ring_bytes(world), **self.rank_record(engine)}
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
        if dist.get_rank() != 0:
            return
        report = self.report(ranks, engine)
        write_atomic(self.path, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
