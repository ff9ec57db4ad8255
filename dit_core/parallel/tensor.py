"""Megatron-style tensor parallelism (张量并行; Shoeybi et al., 2019), by hand.

A linear layer y = x Wᵀ + b can be split over P ranks two ways:
  * by columns of the output (ColumnParallelLinear): rank r holds rows r of W (its output features) and
    computes its slice of y from the whole x. Nothing to communicate in forward.
  * by rows of the input (RowParallelLinear): rank r holds the columns of W that read its slice of x and
    computes a partial y; the partial results are summed (all-reduce), then the bias is added once.
Column then row needs exactly one all-reduce: the MLP (fc1 by columns, GELU on the local slice, fc2 by
rows), and attention (q, k, v by columns, i.e. whole heads per rank, attention on the local heads, the
output projection by rows). Two conjugate operators carry the gradients: f (identity forward, all-reduce
backward) where a replicated input enters a column-parallel layer, g (all-reduce forward, identity
backward) where the row-parallel partial sums leave.
"""
from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig
from ..model import DiT
from ..engine import EMA, RankFilesEngine, clip_by_norm_
from .ddp import DataParallel, MeshStrategy
from .dist import DistEnv, check_degree


class GroupRef:
    """A process group held by a module. Copies of the module (the EMA) share it: a group is a handle."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


# ---------------------------------------------------------------- f and g

class CopyToTensorParallel(torch.autograd.Function):
    """f: identity in forward; in backward, all-reduce the input's gradient (each rank's slice of the
    layer contributed part of it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: all-reduce the partial sums in forward; identity in backward (every rank needs the whole
    gradient of the sum, which it already has)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ---------------------------------------------------------------- the two linear layers

class ColumnParallelLinear(nn.Module):
    """Holds the output features `rows` of a full nn.Linear (weight rows and bias entries)."""

    def __init__(self, full: nn.Linear, rows: torch.Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[rows].clone())
        self.bias = nn.Parameter(full.bias.detach()[rows].clone())
        self.register_buffer("rows", rows.to(full.weight.device), persistent=False)
        self.full_shape = tuple(full.weight.shape)
        self.group = GroupRef(group)
        for p in (self.weight, self.bias):
            p.tensor_parallel = "rows"

    def forward(self, x):
        return F.linear(CopyToTensorParallel.apply(x, self.group.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds the input features `cols` of a full nn.Linear; the bias stays whole and is added once,
    after the partial outputs are summed."""

    def __init__(self, full: nn.Linear, cols: torch.Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[:, cols].clone())
        self.bias = nn.Parameter(full.bias.detach().clone())
        self.register_buffer("cols", cols.to(full.weight.device), persistent=False)
        self.full_shape = tuple(full.weight.shape)
        self.group = GroupRef(group)
        self.weight.tensor_parallel = "cols"

    def forward(self, x_local):
        return ReduceFromTensorParallel.apply(F.linear(x_local, self.weight), self.group.group) + self.bias


def head_rows(heads: int, head_dim: int, rank: int, degree: int) -> torch.Tensor:
    """The rows of the fused qkv weight (3 x heads x head_dim outputs) for this rank's heads of q, k and v."""
    local = heads // degree
    idx = torch.arange(3 * heads * head_dim).view(3, heads, head_dim)
    return idx[:, rank * local:(rank + 1) * local].reshape(-1)


def block_slice(n: int, rank: int, degree: int) -> torch.Tensor:
    return torch.arange(rank * n // degree, (rank + 1) * n // degree)


def check_tensor_parallel(model: ModelConfig, degree: int, world_size: int, flag: str = "--tp-degree") -> None:
    check_degree(world_size, degree, flag)
    if model.num_heads % degree:
        raise ConfigError(f"model.num_heads={model.num_heads} is not divisible by {flag} {degree}: each rank "
                          f"holds whole attention heads; use a multiple of {degree} heads.")
    mlp = int(model.hidden_size * model.mlp_ratio)
    if mlp % degree:
        raise ConfigError(f"the MLP's hidden width {mlp} (model.hidden_size x model.mlp_ratio) is not divisible by "
                          f"{flag} {degree}; choose a hidden size or mlp_ratio that makes it a multiple of {degree}.")


def parallelize(model: DiT, group) -> DiT:
    """Swap the four big linear layers of every block for their tensor-parallel slices, in place.
    Everything else (embeddings, adaLN modulation, final layer) stays whole on every rank."""
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    H, D = model.cfg.num_heads, model.cfg.hidden_size // model.cfg.num_heads
    for blk in model.blocks:
        blk.attn.qkv = ColumnParallelLinear(blk.attn.qkv, head_rows(H, D, rank, P), group)
        blk.attn.proj = RowParallelLinear(blk.attn.proj, block_slice(H * D, rank, P), group)
        blk.mlp.fc1 = ColumnParallelLinear(blk.mlp.fc1, block_slice(blk.mlp.fc1.out_features, rank, P), group)
        blk.mlp.fc2 = RowParallelLinear(blk.mlp.fc2, block_slice(blk.mlp.fc2.in_features, rank, P), group)
    return model


# ---------------------------------------------------------------- gathering back to one model

@torch.no_grad()
def gather_state_dict(model: nn.Module, group) -> dict:
    """The single-process state dict of a tensor-parallel model (a collective: every rank calls it)."""
    P = dist.get_world_size(group)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            col = isinstance(module, ColumnParallelLinear)
            index = module.rows if col else module.cols
            parts = [torch.empty_like(module.weight) for _ in range(P)]
            dist.all_gather(parts, module.weight.contiguous(), group=group)
            idx = [torch.empty_like(index) for _ in range(P)]
            dist.all_gather(idx, index, group=group)
            w = module.weight.new_empty(module.full_shape)
            for part, i in zip(parts, idx):
                if col:
                    w[i] = part
                else:
                    w[:, i] = part
            out[f"{name}.weight"] = w
            if col:
                bparts = [torch.empty_like(module.bias) for _ in range(P)]
                dist.all_gather(bparts, module.bias.contiguous(), group=group)
                b = module.bias.new_empty(module.full_shape[0])
                for part, i in zip(bparts, idx):
                    b[i] = part
                out[f"{name}.bias"] = b
            else:
                out[f"{name}.bias"] = module.bias.detach().clone()
    for name, t in model.state_dict().items():
        if name not in out:
            out[name] = t.detach().clone()
    return {k: out[k] for k in model.state_dict()}               # the single-process names and order


@torch.no_grad()
def load_full_state_dict(model: nn.Module, sd: dict) -> None:
    """Copy a single-process state dict into a tensor-parallel model (each rank takes its slice)."""
    sliced = set()
    for name, module in model.named_modules():
        if isinstance(module, ColumnParallelLinear):
            module.weight.copy_(sd[f"{name}.weight"][module.rows])
            module.bias.copy_(sd[f"{name}.bias"][module.rows])
        elif isinstance(module, RowParallelLinear):
            module.weight.copy_(sd[f"{name}.weight"][:, module.cols])
            module.bias.copy_(sd[f"{name}.bias"])
        else:
            continue
        sliced |= {f"{name}.weight", f"{name}.bias"}
    for name, t in model.state_dict().items():
        if name not in sliced:
            t.copy_(sd[name])


# ---------------------------------------------------------------- the strategy

class TensorParallelEMA(EMA):
    """Each rank averages its own slices; gathered only when saved."""

    def __init__(self, model: nn.Module, group):
        super().__init__(model)
        self.group = group

    def state_dict(self) -> dict:
        return gather_state_dict(self.module, self.group)

    def load_state_dict(self, sd: dict) -> None:
        load_full_state_dict(self.module, sd)


class TensorParallelEngine(RankFilesEngine):
    """Whole (gathered) weights in model.pt, one optimizer file per rank (its slices' moments)."""

    def make_ema(self):
        return TensorParallelEMA(self.model, self.strategy.mesh.inner_group)

    def whole_state_dict(self):
        return gather_state_dict(self.model, self.strategy.mesh.inner_group)

    def load_whole_state_dict(self, sd):
        load_full_state_dict(self.model, sd)

    launcher, split = "launchers/tp.py", "sliced per rank"

    def wrote(self, state):
        return "tp_degree" in state

    def layout_flags(self, d):
        return f"--tp-degree {d['tp_degree']}"

    def state_info(self) -> dict:
        return {"tp_degree": self.strategy.mesh.inner_size, "world_size": self.strategy.world_size}


class TensorParallelStrategy(MeshStrategy):
    """DP x TP for `dit_core.train`: ranks [d*P, (d+1)*P) hold the slices of one model and train on
    data-parallel slice d of the global batch; gradients are averaged across the data-parallel group."""

    # (teaching) world-average: the data-parallel all-reduce divides by the world size (dp x tp, what
    # dist.get_world_size() returns without a group) instead of its own group's size: every gradient tp times too small
    BROKEN = ("world-average",)

    def __init__(self, env: DistEnv, degree: int, broken: str | None = None):
        if broken not in (None, *self.BROKEN):
            raise ConfigError(f"--break {broken} is not one of {', '.join(self.BROKEN)}.")
        super().__init__(env, degree, "--tp-degree")
        self.broken = broken

    def make_engine(self, model, cfg, device):
        parallelize(model, self.mesh.inner_group)      # before the optimizer sees the parameters
        return TensorParallelEngine(model, self, cfg, device)

    def wrap(self, model: nn.Module) -> nn.Module:
        return DataParallel(model, group=self.mesh.dp_group,
                            divisor=self.world_size if self.broken == "world-average" else None)

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """The norm of the *whole* model's gradient: sliced parameters' squares summed over the tensor-
        parallel group, replicated ones counted once. Every rank then clips by the same factor."""
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]

        def squares(keep):
            return sum((p.grad.float().square().sum() for p in with_grad if keep(p)),
                       torch.zeros((), device=grads[0].device))
        sliced = squares(lambda p: hasattr(p, "tensor_parallel"))
        dist.all_reduce(sliced, group=self.mesh.inner_group)
        whole = squares(lambda p: not hasattr(p, "tensor_parallel"))
        return clip_by_norm_(grads, (sliced + whole).sqrt(), max_norm)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)                   # tensor-parallel ranks hold the same loss: the mean over all
        return t / self.world_size           # ranks is the mean over the data-parallel groups


# ---------------------------------------------------------------- communication (elements)

def tp_allreduce_elements(batch: int, tokens: int, hidden: int) -> int:
    """All-reduced per block and micro-batch: g after attention and after the MLP in forward, f before
    them in backward; each one the whole (batch, tokens, hidden) activation."""
    return 4 * batch * tokens * hidden
