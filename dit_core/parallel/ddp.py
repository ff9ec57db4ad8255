"""Data parallelism by hand: what torch's DistributedDataParallel does, in ~150 lines.

Every rank holds the whole model and trains on its own slice of the global batch.
After backward, each gradient is averaged over the ranks (all-reduce, then / N),
so every rank takes the same optimizer step and the weights stay identical.

Two modes:
  * naive   - after backward, one blocking all-reduce per parameter. Simple, slow:
              many small messages, and no communication until backward is over.
  * buckets - gradients are packed into ~25 MB buckets in *reverse* registration
              order (backward produces the last layers' gradients first). A bucket's
              all-reduce starts, asynchronously, the moment its last gradient is
              accumulated, so communication overlaps the rest of backward.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from .dist import DistStrategy, build_mesh


class DataParallel(nn.Module):
    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25, overlap: bool = True,
                 group=None, first_bucket_mb: float = 1.0, average: bool = True, broadcast: bool = True,
                 divisor: int | None = None):
        super().__init__()
        self.module = module
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.overlap = overlap
        # average=False / broadcast=False exist only to show, in the chapter, the run each one saves.
        # `divisor`: the summed gradient is divided by this (default: the group size). Sequence
        # parallelism sums partial gradients inside a group and averages across groups: it divides
        # by the number of data-parallel groups.
        self._divisor = (divisor or self.world_size) if average else 1
        self._sync = True
        if broadcast:
            self._broadcast_from_rank0()
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = self._make_buckets(bucket_cap_mb, first_bucket_mb) if overlap else []
        self._hooks = []
        self.timeline = None          # set to a list to record (time.perf_counter(), bucket, bytes) per launch
        if overlap:
            for b, bucket in enumerate(self.buckets):
                for p in bucket:
                    # The hook receives the *parameter* (its .grad now holds the accumulated
                    # gradient), not the gradient: all-reducing its argument would average weights.
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(b)))
        self._reset()

    # ------------------------------------------------------------ setup
    @torch.no_grad()
    def _broadcast_from_rank0(self) -> None:
        """Ranks may have initialised differently: rank 0's weights (and buffers) win."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            dist.broadcast(t.data, src=src, group=self.group)

    def _make_buckets(self, cap_mb: float, first_mb: float) -> list[list[nn.Parameter]]:
        buckets, cur, size = [], [], 0
        cap = first_mb * 2 ** 20      # a small first bucket, so communication starts early
        for p in reversed(self.params):
            cur.append(p)
            size += p.numel() * p.element_size()
            if size >= cap:
                buckets.append(cur)
                cur, size, cap = [], 0, cap_mb * 2 ** 20
        if cur:
            buckets.append(cur)
        return buckets

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._pending = {}            # bucket index -> (work handle, flat tensor)
        self._next = 0                # buckets launch strictly in order: every rank issues the same sequence

    # ------------------------------------------------------------ communication
    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        for p in bucket:
            if p.grad is None:        # unused this step: contribute zeros so the collective still matches
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        if self.timeline is not None:
            self.timeline.append((time.perf_counter(), b, flat.numel() * flat.element_size()))
        self._pending[b] = (dist.all_reduce(flat, group=self.group, async_op=True), flat)

    def _make_hook(self, b: int):
        def hook(param: nn.Parameter) -> None:
            if not self._sync:
                return
            self._ready[b] += 1
            # Launch every complete bucket whose predecessors have been launched.
            while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
                self._launch(self._next)
                self._next += 1
        return hook

    def finish_gradient_synchronization(self) -> None:
        """Wait for all buckets and average. Call after the last backward, before optimizer.step()."""
        if not self._sync:
            return
        if not self.overlap:
            for p in self.params:     # naive: one blocking all-reduce per parameter
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.group)
                p.grad.div_(self._divisor)
            return
        # Buckets whose gradients never all arrived (unused parameters) are launched now, in order.
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for b, (work, flat) in self._pending.items():
            work.wait()
            flat.div_(self._divisor)
            offset = 0
            for p in self.buckets[b]:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
        self._reset()

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate local gradients without communicating (all micro-steps but the last)."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# ---------------------------------------------------------------- the launcher's strategy

IMPLS = ("hand", "torch", "naive")


class DDPStrategy(DistStrategy):
    """How `dit_core.train` runs under data parallelism: the wrapper, no_sync, the final
    gradient sync, and the all-reduced loss for the log (the mean over the global batch)."""

    def __init__(self, env, impl: str = "hand", bucket_cap_mb: float = 25, seed_by_rank: bool = False,
                 broken: str | None = None):
        if impl not in IMPLS:
            raise ValueError(f"--impl {impl!r} is not one of {', '.join(IMPLS)}.")
        if broken not in (None, "average", "broadcast"):
            raise ValueError(f"--break {broken!r} is not average or broadcast.")
        self.env, self.impl, self.bucket_cap_mb = env, impl, bucket_cap_mb
        # Teaching switches: initialise each rank differently (as code seeding by rank does), and
        # drop the averaging or the initial broadcast, to see what each one protects.
        self.seed_by_rank, self.broken = seed_by_rank or broken == "broadcast", broken
        super().__init__(env)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.seed_by_rank and self.rank > 0:   # rank 0 keeps the seed of the single-process run
            torch.manual_seed(1000 + self.rank)
            model.initialize_weights()
        if self.impl == "torch":
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids, bucket_cap_mb=self.bucket_cap_mb, process_group=self.env.group)
        return DataParallel(model, bucket_cap_mb=self.bucket_cap_mb, overlap=self.impl == "hand",
                            group=self.env.group, average=self.broken != "average",
                            broadcast=self.broken != "broadcast")

    def finish_gradient_sync(self, model: nn.Module) -> None:
        if isinstance(model, DataParallel):
            model.finish_gradient_synchronization()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=self.env.group)
        return t / self.world_size

    def barrier(self) -> None:
        dist.barrier(group=self.env.group)


class MeshStrategy(DistStrategy):
    """Base of the 2-D strategies (Ulysses, tensor parallelism): ranks on a (data-parallel x inner) mesh
    built by `dist.build_mesh`; the hand-written DataParallel synchronises the gradients."""

    def __init__(self, env, degree: int, flag: str):
        super().__init__(env)
        self.mesh = build_mesh(env, degree, flag)

    @property
    def data_rank(self) -> int:
        return self.mesh.dp_rank            # ranks that share one sample's work share a data rank

    @property
    def data_world_size(self) -> int:
        return self.mesh.dp_size

    def finish_gradient_sync(self, model: nn.Module) -> None:
        model.finish_gradient_synchronization()
