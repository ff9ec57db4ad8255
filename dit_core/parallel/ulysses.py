"""Ulysses sequence parallelism (序列并行; Jacobs et al. 2023, "DeepSpeed Ulysses"), by hand.

Long sequences (high-resolution images, video) make activation memory grow with the token count.
Split the tokens over the P ranks of a sequence-parallel group: rank r holds tokens
[r*N/P, (r+1)*N/P) of every sample. Everything in a DiT block acts on each token alone (norms,
MLP, adaLN modulation), except attention, where every token looks at every other one. Ulysses
handles attention with one all-to-all:

    (B, N/P, H, D)  all tokens' slice, all heads   --all-to-all-->   (B, N, H/P, D)  all tokens, H/P heads

ordinary attention runs on the local heads (heads are independent), and the inverse all-to-all
returns the output to the sequence split. The weights are replicated; each rank's gradient holds the
contribution of its tokens, so the group *sums* gradients, and data parallelism across groups averages.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ConfigError, ModelConfig
from ..model import DiT, sdpa_attention
from .ddp import DataParallel, MeshStrategy
from .dist import DistEnv, check_degree


# ---------------------------------------------------------------- the primitive

@torch.compiler.disable           # a collective into a preallocated buffer: keep it out of compiled graphs
def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Cut `scatter_dim` into P chunks and send chunk j to rank j; the chunk received from rank j
    lands at position j of `gather_dim`. (P = size of `group`.)"""
    P = dist.get_world_size(group)
    if P == 1:
        return x                  # a group of one: nothing to exchange
    if x.shape[scatter_dim] % P:
        raise ValueError(f"dimension {scatter_dim} of size {x.shape[scatter_dim]} cannot be cut into {P} equal "
                         f"chunks for the all-to-all; make it a multiple of {P}.")
    send = x.unflatten(scatter_dim, (P, -1)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class ResplitAllToAll(torch.autograd.Function):
    """A tensor split across the group along one axis becomes split along another (Ulysses: a slice of the sequence
    with every head -> the whole sequence with a slice of the heads, and back): `all_to_all` as an autograd function.
    Its backward is the inverse all-to-all (the two axes swapped), which sends every gradient back to the rank its
    input came from."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None) -> torch.Tensor:
    """Attention over the whole sequence when each rank holds a contiguous slice of it.

    q, k, v: (batch, seq_local, heads, head_dim) on every rank of `group`; returns this rank's slice
    of full attention, same shape."""
    P, H = dist.get_world_size(group), q.shape[2]
    if H % P:
        raise ValueError(f"{H} attention heads are not divisible by the sequence-parallel degree {P}: Ulysses "
                         f"gives every rank whole heads; use a multiple of {P} heads (ring attention splits "
                         f"the sequence instead and has no such limit).")
    qkv = torch.stack([q, k, v])                          # (3, B, N/P, H, D): one message, not three
    qkv = ResplitAllToAll.apply(qkv, 3, 2, group)                # (3, B, N, H/P, D): every token, H/P heads
    out = sdpa_attention(*qkv.unbind(0))                  # (B, N, H/P, D): plain attention, local heads
    return ResplitAllToAll.apply(out, 1, 2, group)               # (B, N/P, H, D): back to the sequence split


class UlyssesAttention:
    """The callable swapped into every block with `DiT.set_attention`."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q, k, v):
        return ulysses_attention(q, k, v, self.group)

    def __deepcopy__(self, memo):
        return self                 # a process group is a handle: a copied model shares it


# ---------------------------------------------------------------- the sequence-parallel DiT

def token_slice(num_tokens: int, rank: int, degree: int) -> slice:
    if num_tokens % degree:
        raise ValueError(f"a sequence of {num_tokens} tokens cannot be split evenly over {degree} ranks; "
                         f"use a token count divisible by {degree}.")
    n = num_tokens // degree
    return slice(rank * n, (rank + 1) * n)


class SequenceParallelDiT(nn.Module):
    """The DiT with its tokens split over `group`: patch embedding (and this rank's slice of the
    position embedding), replicated conditioning, every block on the local tokens with Ulysses
    attention, the final layer. Returns this rank's tokens of the predicted noise."""

    def __init__(self, model: DiT, group, attention=None):
        super().__init__()
        self.module = model
        self.tokens = token_slice(model.num_tokens, dist.get_rank(group), dist.get_world_size(group))
        # Ulysses by default; context parallelism (dit_core.parallel.context) swaps in ring attention or USP
        model.set_attention(attention or UlyssesAttention(group))

    def forward(self, x, t, y, drop=None):
        return self.module.forward_tokens(x, t, y, drop, self.tokens)     # (B, N/P, p*p*C)

    def local_target(self, img: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of an image-shaped tensor (the true noise), in the output's layout."""
        return self.module.patch_tokens(img)[:, self.tokens]


def check_sequence_parallel(model: ModelConfig, degree: int, world_size: int) -> None:
    """Every reason a DP x SP layout cannot run, as one sentence, before any step."""
    check_degree(world_size, degree, "--sp-degree")
    if model.num_heads % degree:
        raise ConfigError(f"model.num_heads={model.num_heads} is not divisible by --sp-degree {degree}: Ulysses "
                          f"gives each rank whole attention heads; use a multiple of {degree} heads.")
    check_token_split(model, degree, "--sp-degree")


def check_token_split(model: ModelConfig, degree: int, flag: str) -> None:
    """The tokens of an image must split evenly over `degree` ranks; the sentence names patch sizes that do."""
    if degree > 1 and model.pos_embed == "rope2d":
        raise ConfigError(f"model.pos_embed=rope2d rotates queries and keys by each token's position, and {flag} "
                          f"{degree} gives every rank a slice of the tokens whose positions it does not pass on; use "
                          f"model.pos_embed=sincos with token-splitting parallelism.")
    tokens = (model.image_size // model.patch_size) ** 2
    if tokens % degree:
        ok = [f"{p} ({(model.image_size // p) ** 2} tokens)" for p in range(1, model.image_size + 1)
              if model.image_size % p == 0 and (model.image_size // p) ** 2 % degree == 0][:3]
        raise ConfigError(f"model.patch_size={model.patch_size} gives {tokens} tokens, not divisible by {flag} "
                          f"{degree}; use model.patch_size {' or '.join(ok)}.")


class UlyssesStrategy(MeshStrategy):
    """DP x SP for `dit_core.train`: ranks [d*P, (d+1)*P) form sequence-parallel group d and train on
    data-parallel slice d of the global batch. One all-reduce over all ranks, divided by the number
    of groups, sums the partial gradients inside a group and averages across groups at once.

    `broken` (teaching only) reproduces two bugs that shipped in public frameworks:
      "loss-norm":  each rank divides its loss by its *own* token count (a per-rank mean) and the log
                    averages the ranks; the log looks right, the gradients are P times too large;
      "grad-group": gradients are all-reduced over the data-parallel group only, so the partial
                    gradients of a sequence-parallel group are never summed.
    """

    BROKEN = ("loss-norm", "grad-group")

    def __init__(self, env: DistEnv, degree: int, broken: str | None = None, flag: str = "--sp-degree"):
        if broken not in (None, *self.BROKEN):
            raise ValueError(f"--break {broken!r} is not one of {', '.join(self.BROKEN)}.")
        super().__init__(env, degree, flag)
        self.broken = broken
        self.sp_model: SequenceParallelDiT | None = None

    def attention(self):
        """The attention every block runs on its slice of the tokens (context parallelism overrides it)."""
        return UlyssesAttention(self.mesh.inner_group)

    def wrap(self, model: nn.Module) -> nn.Module:
        self.sp_model = SequenceParallelDiT(model, self.mesh.inner_group, self.attention())
        group = self.mesh.dp_group if self.broken == "grad-group" else None
        return DataParallel(self.sp_model, group=group, divisor=self.grad_divisor())

    def grad_divisor(self) -> int:
        """The one all-reduce over every rank sums the partial gradients of a group's ranks and the groups'
        gradients: dividing by the number of groups leaves the sum inside a group and the mean across groups."""
        return self.mesh.dp_size

    def loss(self, objective, model, x0, y, t, noise, drop) -> torch.Tensor:
        pred = model(objective.noised(x0, t, noise), t, y, drop).float()    # this rank's tokens only
        # The objective's target (noise, x0, v or a velocity: diffusion.objective), this rank's tokens of it.
        target = self.sp_model.local_target(objective.target(x0, t, noise))
        # the broken variant divides by this rank's own element count instead of the whole micro-batch's
        return objective.token_share(pred, target, t, target.numel() if self.broken == "loss-norm" else noise.numel())

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)                  # partial losses: sum within groups, then mean across them
        return t / (self.world_size if self.broken == "loss-norm" else self.mesh.dp_size)


# ---------------------------------------------------------------- communication volumes (elements)

def ulysses_elements(batch: int, tokens: int, hidden: int, degree: int) -> float:
    """Sent by one rank in one layer's forward: q, k, v and the output, each batch*tokens/P*hidden
    elements of which (P-1)/P leave the rank. The backward sends the same again."""
    return 4 * batch * tokens / degree * hidden * (degree - 1) / degree


def megatron_sp_elements(batch: int, tokens: int, hidden: int, degree: int) -> float:
    """Megatron-SP (Korthikanti et al. 2022): all-gather before, reduce-scatter after attention and
    the MLP, each of the full batch*tokens*hidden activation: does not shrink with P."""
    return 4 * batch * tokens * hidden * (degree - 1) / degree


def ring_attention_elements(batch: int, tokens: int, hidden: int, degree: int) -> float:
    """Ring attention (Liu et al. 2023): each rank passes its K and V blocks P-1 steps round the ring."""
    return 2 * batch * tokens * hidden * (degree - 1) / degree
