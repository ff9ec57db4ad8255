"""The determinism contract: the global batch of step s is a pure function of (seed, s).

Everything random a training sample sees is drawn here, before any rank is
involved: which images (indices), the diffusion timestep t, the noise, and the
label-dropout mask for classifier-free guidance, and whether each sample is
mirrored (data.flip; drawn last, so the other draws are those of a run without
flips, and ignored by a source whose data.flip is off). A rank then takes a contiguous
slice. So 1 process or N processes, accumulation 1 or 4, the same sample meets
the same t and the same noise, and the mean loss over the global batch is the
same number.

Randomness is drawn from CPU generators: the CPU Mersenne Twister gives the same
stream on every machine, so a GPU run sees exactly the batches of a CPU run.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .errors import ConfigError

_INDEX_STREAM, _BATCH_STREAM = 0, 1


def mix_seed(*words: int) -> int:
    """A 63-bit seed mixed from integers (SeedSequence avoids seed+step collisions)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> 1)


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(mix_seed(seed, _INDEX_STREAM, epoch))
    return torch.randperm(n, generator=g)


def sample_indices(seed: int, step: int, batch_size: int, n: int) -> torch.Tensor:
    """Indices of step `step`: positions [step*B, (step+1)*B) of an endless stream
    of per-epoch permutations, so every image is seen once per epoch."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offs = pos // n, pos % n
    out = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        m = epochs == e
        out[m] = _epoch_permutation(seed, e, n)[offs[m]]
    return out


@dataclass
class Batch:
    """One global batch (or a shard of it). Tensors are on the CPU until `to`."""
    indices: torch.Tensor   # (B,) int64 image indices
    t: torch.Tensor         # (B,) int64 timesteps in [0, T)
    noise: torch.Tensor     # (B, C, H, W) float32 standard normal
    drop: torch.Tensor      # (B,) bool, True: the label is replaced by the null class
    flip: torch.Tensor      # (B,) bool, True: the image is mirrored left-right (used where data.flip is on)

    def __len__(self) -> int:
        return self.indices.shape[0]

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(*(getattr(self, f)[start:stop] for f in FIELDS))

    def to(self, device) -> "Batch":
        nb = torch.device(device).type == "cuda"
        return Batch(*(getattr(self, f).to(device, non_blocking=nb) for f in FIELDS))

    @staticmethod
    def cat(parts: list["Batch"]) -> "Batch":
        return Batch(*(torch.cat([getattr(p, f) for p in parts]) for f in FIELDS))

    def take(self, where: torch.Tensor) -> "Batch":
        return Batch(*(getattr(self, f)[where] for f in FIELDS))


FIELDS = ("indices", "t", "noise", "drop", "flip")


def global_batch(seed: int, step: int, batch_size: int, n_data: int, timesteps: int,
                 label_dropout: float, image_shape=(1, 28, 28)) -> Batch:
    """The global batch of optimizer step `step`: a pure function of its arguments."""
    idx = sample_indices(seed, step, batch_size, n_data)
    g = torch.Generator().manual_seed(mix_seed(seed, _BATCH_STREAM, step))
    t = torch.randint(0, timesteps, (batch_size,), generator=g)
    noise = torch.randn((batch_size, *image_shape), generator=g)
    drop = torch.rand(batch_size, generator=g) < label_dropout
    flip = torch.rand(batch_size, generator=g) < 0.5     # last: the draws above are those of a run without flips
    return Batch(idx, t, noise, drop, flip)


def shard_bounds(batch_size: int, rank: int, world_size: int, micro_step: int, accumulation: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s micro-batch `micro_step` inside the global batch.

    Rank-major: rank r owns the contiguous block [r*B/W, (r+1)*B/W), and its
    micro-batches are consecutive pieces of that block.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size}); check the launcher's environment.")
    if accumulation < 1 or not 0 <= micro_step < accumulation:
        raise ValueError(f"micro_step={micro_step} is not in [0, accumulation={accumulation}).")
    if batch_size % (world_size * accumulation):
        raise ValueError(
            f"global batch size {batch_size} is not divisible by world size {world_size} x gradient "
            f"accumulation {accumulation}; choose a batch that is a multiple of {world_size * accumulation}.")
    per_rank = batch_size // world_size
    micro = per_rank // accumulation
    start = rank * per_rank + micro_step * micro
    return start, start + micro


def shard(batch: Batch, rank: int, world_size: int, micro_step: int = 0, accumulation: int = 1) -> Batch:
    return batch.slice(*shard_bounds(len(batch), rank, world_size, micro_step, accumulation))


class GlobalBatchStream(torch.utils.data.Dataset):
    """The contract as a map-style dataset, for frameworks that own the data loader (Accelerate).

    Item i is one training sample of the stream of global batches, (x0, y, t, noise, drop). The
    order is chosen so that a loader with batch size B/accumulation (one micro-step of every rank
    together), cut into `world` contiguous pieces, hands rank r exactly
    `shard(global_batch(step), r, world, micro, accumulation)`, the slice the other launchers train on.
    `__getitems__` builds a whole piece at once (pass `collate_fn=stack_samples`).
    """

    def __init__(self, seed: int, batch_size: int, steps: int, data, timesteps: int, label_dropout: float,
                 image_shape, world: int, accumulation: int):
        shard_bounds(batch_size, 0, world, 0, accumulation)         # the divisibility check, one sentence
        self.seed, self.B, self.steps, self.data = seed, batch_size, steps, data
        self.timesteps, self.label_dropout, self.image_shape = timesteps, label_dropout, image_shape
        self.world, self.accum = world, accumulation
        self._cached: tuple[int, Batch] | None = None

    def __len__(self) -> int:
        return self.steps * self.B

    def positions(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream indices -> (step, position in that step's global batch), the inverse of rank-major
        sharding: micro-step, then rank, then the place inside that rank's micro-batch."""
        i = torch.as_tensor(items)
        micro_size, piece = self.B // self.accum, self.B // (self.world * self.accum)
        step, j = i // self.B, i % self.B
        micro, k = j // micro_size, j % micro_size
        rank, q = k // piece, k % piece
        return step, rank * (self.B // self.world) + micro * piece + q

    def _batch(self, step: int) -> Batch:
        if self._cached is None or self._cached[0] != step:
            self._cached = (step, global_batch(self.seed, step, self.B, len(self.data), self.timesteps,
                                               self.label_dropout, self.image_shape))
        return self._cached[1]

    def __getitems__(self, items: list[int]):
        steps, pos = self.positions(items)
        parts = []
        for step in steps.unique().tolist():      # a loader batch lies inside one step unless B/accum splits oddly
            b, where = self._batch(step), pos[steps == step]
            parts.append(b.take(where))
        b = parts[0] if len(parts) == 1 else Batch.cat(parts)
        x0, y = self.data.gather(b.indices, b.flip)          # data.flip: mirrored here, as the loop's gather does
        return x0, y, b.t, b.noise, b.drop

    def __getitem__(self, i: int):
        return tuple(x[0] for x in self.__getitems__([i]))


def stack_samples(batch):
    """collate_fn for GlobalBatchStream: `__getitems__` already returns whole tensors."""
    return batch


def check_batch_split(global_batch: int, world_size: int, accumulation: int) -> None:
    """Every rank gets the same number of whole micro-batches of the global batch, or one sentence says which
    multiple to use."""
    if global_batch % (world_size * accumulation):
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by world size {world_size} x "
            f"train.grad_accum={accumulation}; use a multiple of {world_size * accumulation}.")
