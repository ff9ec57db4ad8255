"""A class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023), from MNIST to Meta's DiT-XL/2.

Read top to bottom: image -> patches -> tokens (+ fixed 2-D position embedding);
timestep and label -> one conditioning vector c; N blocks in which c sets the
shift, scale and gate of every sub-layer (adaLN-Zero); a final layer -> patches
-> the predicted noise, same shape as the image (with model.learn_sigma, as Meta's
DiT: twice the channels, the noise first and then the variance).

Meta's architecture, module for module (same parameters, same outputs): model.pos_embed=sincos_meta and
model.learn_sigma=true, as configs/dit_*2.yaml set them; `python -m dit_core.convert meta` reads Meta's checkpoints.

Attention is a plain callable `attn_fn(q, k, v)` on (batch, seq, heads, head_dim)
tensors, so later chapters swap in Ulysses or tensor-parallel attention with
`model.set_attention(fn)` and never copy a block.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .moe import MoEMlp


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax(q k^T / sqrt(head_dim)) v on (B, S, H, D) tensors; returns (B, S, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # shift/scale are per sample (B, D); broadcast over the token axis.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int, column_first: bool = False) -> torch.Tensor:
    """Fixed (grid*grid, dim) embedding: half the channels encode the row, half the column. Which half comes first
    is a convention: this project puts the row first (model.pos_embed=sincos); Meta's DiT (from MAE's
    get_2d_sincos_pos_embed, whose meshgrid puts w first) the column (sincos_meta, `column_first`). Same values,
    channels swapped: a checkpoint read with the other one gives another model."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    halves = [one_axis(dim // 2, rows.reshape(-1)), one_axis(dim // 2, cols.reshape(-1))]
    emb = np.concatenate(halves[::-1] if column_first else halves, axis=1)
    return torch.from_numpy(emb).float()


# Called with the inputs a recomputed region keeps alive (torch.utils.checkpoint holds them itself, outside
# autograd's saved-tensor hooks): dit_core.memory counts them. Empty, and free, otherwise.
CHECKPOINT_INPUT_HOOKS: list = []


def rope_2d_tables(head_dim: int, grid: int, base: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (grid*grid, head_dim/2) of 2-D rotary position embedding (RoPE, Su et al. 2021, made axial as in
    Heo et al. 2024): channel pair i of the first half turns by row·θ_i, of the second half by column·θ_i, with
    θ_i = base^(-i / (head_dim/4)). (Base 100 rather than text's 10,000: on a grid of at most 14 positions
    per axis the slowest pair should still turn noticeably.)"""
    quarter = head_dim // 4
    theta = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang = torch.cat([rows.reshape(-1, 1) * theta, cols.reshape(-1, 1) * theta], dim=1)   # (S, head_dim/2)
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, S, H, D) by the angles of each token (cos, sin: (S, D/2))."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos.to(x.dtype)[None, :, None, :], sin.to(x.dtype)[None, :, None, :]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


class TimestepEmbedder(nn.Module):
    """Integer timestep -> sinusoidal features -> MLP -> (B, hidden)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Cast to the weights' dtype: a no-op in fp32 and under autocast, needed when an engine
        # (DeepSpeed bf16/fp16) has cast the whole model.
        return self.mlp(self.sinusoidal(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (B, hidden). Row `num_classes` is the null label used by
    classifier-free guidance; which samples get it is decided by the batch (drop)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, rope_grid: int = 0):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.attn_fn = sdpa_attention
        self.recompute = False          # True: the attention core is recomputed in backward (train.recompute)
        self.rope = rope_grid > 0
        if self.rope:                   # model.pos_embed=rope2d: not saved (computed from the config)
            cos, sin = rope_2d_tables(self.head_dim, rope_grid)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        # Heads are inferred from the weight, so a tensor-parallel qkv holding
        # a slice of the heads works unchanged.
        qkv = self.qkv(x).view(B, S, 3, -1, self.head_dim)
        q, k, v = qkv.unbind(2)                                  # each (B, S, H, D)
        if self.rope:
            q, k = apply_rope(q, self.rope_cos, self.rope_sin), apply_rope(k, self.rope_cos, self.rope_sin)
        if self.recompute and torch.is_grad_enabled():
            for hook in CHECKPOINT_INPUT_HOOKS:                  # memory accounting (dit_core.memory)
                hook(q, k, v)
            out = checkpoint(self.attn_fn, q, k, v, use_reentrant=False)
        else:
            out = self.attn_fn(q, k, v)                          # (B, S, H, D)
        return self.proj(out.reshape(B, S, -1))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block; c sets shift/scale/gate of both sub-layers.

    The modulation is zero-initialised (adaLN-Zero): every gate starts at 0, so
    each block starts as the identity and the network begins as a shallow one.
    """

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, moe: dict | None = None, rope_grid: int = 0):
        super().__init__()
        self.recompute = False          # True: only the input is kept; the block runs again in backward
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads, rope_grid)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = MoEMlp(hidden, int(hidden * mlp_ratio), **moe) if moe else Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            for hook in CHECKPOINT_INPUT_HOOKS:
                hook(x, c)
            return checkpoint(self._forward, x, c, use_reentrant=False)
        return self._forward(x, c)

    def _forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def patch_tokens(img: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, tokens, p*p*C), patches of p x p in the final layer's layout (DiT.unpatchify's inverse;
    a pipeline's last stage under context parallelism holds the model's pieces, not a DiT, and needs it too)."""
    B, C, H, _ = img.shape
    g = H // p
    x = img.reshape(B, C, g, p, g, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, g * g, p * p * C)


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p, h, C = cfg.patch_size, cfg.hidden_size, cfg.in_channels
        self.grid = cfg.image_size // p
        # Patchify = a conv whose kernel and stride are the patch: one linear map per patch.
        self.x_embedder = nn.Conv2d(C, h, kernel_size=p, stride=p)
        # rope2d: the additive embedding is zero (kept, so that every strategy's patchify stays as it is) and the
        # positions enter every attention layer instead. (Meta keeps it as a frozen nn.Parameter, so its state dicts
        # hold it and its trainable count leaves it out; here it is computed from the config, never saved.)
        pos = (sincos_pos_embed_2d(h, self.grid, column_first=cfg.pos_embed == "sincos_meta")
               if cfg.pos_embed in ("sincos", "sincos_meta") else torch.zeros(self.grid ** 2, h))
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = LabelEmbedder(cfg.num_classes, h)
        moe = (dict(num_experts=cfg.num_experts, top_k=cfg.top_k, group=cfg.moe_aux_group)
               if cfg.num_experts else None)
        rope = self.grid if cfg.pos_embed == "rope2d" else 0
        self.blocks = nn.ModuleList([DiTBlock(h, cfg.num_heads, cfg.mlp_ratio, moe, rope) for _ in range(cfg.depth)])
        # learn_sigma (Meta's DiT): per pixel the noise (first C channels) and C more that set the variance
        self.out_channels = 2 * C if cfg.learn_sigma else C
        self.final_layer = FinalLayer(h, p, self.out_channels)
        self.initialize_weights()

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:         # the MoE router has none
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, MoEMlp):
                m.reset_experts()      # after the loop above: the router got its Xavier init there
        # adaLN-Zero: zero modulation (gates start closed) and a zero output layer,
        # so the untrained model predicts exactly 0 noise.
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_recompute(self, mode: str, blocks: int = 0) -> None:
        """train.recompute: none, full (each block keeps only its input and runs again in backward) or attention
        (only the attention core is recomputed), for the first `blocks` blocks (0 = all)."""
        for i, blk in enumerate(self.blocks):
            on = blocks == 0 or i < blocks
            blk.recompute = on and mode == "full"
            blk.attn.recompute = on and mode == "attention"

    def set_attention(self, fn) -> None:
        """Swap the attention callable of every block (Ulysses, tensor parallel, ...)."""
        for blk in self.blocks:
            blk.attn.attn_fn = fn

    def patchify(self, x: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """(B, C, H, W) -> (B, tokens, hidden), position embedding added. `tokens` keeps a
        contiguous range of them (sequence parallelism: each rank its own slice)."""
        x = self.x_embedder(x).flatten(2).transpose(1, 2)[:, tokens]
        return x + self.pos_embed[:, tokens].to(x.dtype)

    def patch_tokens(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, tokens, p*p*C) in the final layer's layout: unpatchify's inverse."""
        return patch_tokens(img, self.cfg.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, p*p*C) -> (B, C, H, W); C from the shape (the output has 2 x in_channels with learn_sigma)."""
        p, g = self.cfg.patch_size, self.grid
        C = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def condition(self, t: torch.Tensor, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y, drop)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in x_t. x: (B, C, H, W), t: (B,) int, y: (B,) int."""
        return self.unpatchify(self.forward_tokens(x, t, y, drop))

    def forward_tokens(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                       drop: torch.Tensor | None = None, tokens: slice = slice(None)) -> torch.Tensor:
        """The predicted noise as patches (B, tokens, p*p*C), for a contiguous range of the tokens
        (all by default; under sequence parallelism, this rank's slice)."""
        h = self.patchify(x.to(self.x_embedder.weight.dtype), tokens)
        c = self.condition(t, y, drop)
        for blk in self.blocks:
            h = blk(h, c)
        return self.final_layer(h, c)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance: out_uncond + scale * (out_cond - out_uncond), in one batch. The output is
        whatever diffusion.objective trains (eps, v, x0 or a velocity): each is an affine function of eps for a
        given x_t, so guiding it is guiding eps.

        With learn_sigma, guidance as Meta's DiT applies it: on the first three output channels only ("for exact
        reproducibility", its forward_with_cfg says; its latents have four), the rest (the fourth noise channel
        and the variance) the conditional prediction's. Here: the first min(3, in_channels), so that a model with
        fewer channels never guides its variance."""
        if scale == 1.0:
            return self(x, t, y)
        null = torch.full_like(y, self.cfg.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        if not self.cfg.learn_sigma:
            return uncond + scale * (cond - uncond)
        k = min(3, self.cfg.in_channels)
        return torch.cat([uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
