"""The one-GPU fast path: what changes when nothing has to match another process.

The determinism contract (batch.py) draws every batch on the CPU, so that any number of ranks on any
device see the same numbers. One GPU alone needs none of that, and the CPU draw, the host-to-device
copy and the per-step read-back of the loss are what leave a small model's GPU idle. Here:

* `DeviceBatches`: the dataset lives on the GPU and each step's batch (indices, t, noise, label
  dropout, flips) is drawn there, from a generator seeded by (seed, step), so a run is still repeatable
  and resumable, just not equal to the CPU contract's numbers;
* `GraphedStep`: a function of fixed-shape tensors recorded once as a CUDA graph and replayed, so
  hundreds of small kernels cost one launch (the sampler's 1000 steps);
* `fast_enabled`: when train.fast=auto turns the path on.
"""
from __future__ import annotations

import torch

from .batch import Batch, mix_seed

_DEVICE_INDEX_STREAM, _DEVICE_BATCH_STREAM = 2, 3      # apart from the contract's streams (0, 1)


def fast_enabled(mode: str, device: torch.device, alone: bool, precision: str) -> bool:
    """auto: one process (no parallel strategy) on a CUDA GPU with mixed precision. fp32 runs are
    the parity proofs, so they keep the contract's batches unless the fast path is asked for."""
    if mode == "auto":
        return device.type == "cuda" and alone and precision != "fp32"
    return mode == "on"


class DeviceBatches:
    """Global batches drawn on `data`'s device: a pure function of (seed, step) on that device.

    Indices walk an endless stream of per-epoch permutations (every image once per epoch), as the
    contract's do; t, noise, the dropout mask and the flips come from a device generator re-seeded each step.
    Nothing here waits for the GPU: the host only does arithmetic on step numbers.
    """

    def __init__(self, data, seed: int, batch_size: int, timesteps: int, label_dropout: float,
                 image_shape=(1, 28, 28)):
        self.data, self.seed, self.B = data, seed, batch_size
        self.T, self.p_drop, self.shape = timesteps, label_dropout, tuple(image_shape)
        self.device = data.images.device
        self.gen = torch.Generator(device=self.device)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self.gen.manual_seed(mix_seed(self.seed, _DEVICE_INDEX_STREAM, epoch))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(len(self.data), generator=self.gen, device=self.device)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        n, parts = len(self.data), []
        pos, stop = step * self.B, (step + 1) * self.B
        while pos < stop:                      # a batch spans at most a few epochs' boundaries
            epoch, off = divmod(pos, n)
            take = min(stop - pos, n - off)
            parts.append(self._perm(epoch)[off:off + take])
            pos += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __call__(self, step: int) -> Batch:
        idx = self.indices(step)
        g = self.gen.manual_seed(mix_seed(self.seed, _DEVICE_BATCH_STREAM, step))
        t = torch.randint(0, self.T, (self.B,), generator=g, device=self.device)
        noise = torch.randn((self.B, *self.shape), generator=g, device=self.device)
        drop = torch.rand(self.B, generator=g, device=self.device) < self.p_drop
        flip = torch.rand(self.B, generator=g, device=self.device) < 0.5     # last, as the contract's
        return Batch(idx, t, noise, drop, flip)


class GraphedStep:
    """Record `fn(*tensors) -> tensor` once as a CUDA graph; each call copies its arguments into the
    recorded input buffers and replays. Shapes and dtypes must stay those of `example`. The result
    is a buffer the next call overwrites: clone it to keep it."""

    def __init__(self, fn, example: tuple[torch.Tensor, ...], warmup: int = 2):
        self.inputs = tuple(a.clone() for a in example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):           # warm-up off the capture: lazy init, autotuning, compiles
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for buf, a in zip(self.inputs, args):
            if buf.data_ptr() != a.data_ptr():
                buf.copy_(a)
        self.graph.replay()
        return self.output
