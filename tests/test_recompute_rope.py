"""Activation checkpointing through train.recompute, and the 2-D rotary position embedding (model.pos_embed)."""
import pytest
import torch

from conftest import launcher_flags
from dit_core.config import ConfigError, load_config
from dit_core.model import DiT, apply_rope, rope_2d_tables
from dit_core.parity import run_here
from dit_core.memory import saved_activation_bytes

STEPS = 12


def test_recompute_leaves_the_curve_bitwise_unchanged(tmp_path):
    """Recomputation runs the same operations again on the same inputs: on the CPU the loss curve and the
    gradient norm are bitwise those of the run that keeps every activation."""
    base = launcher_flags(STEPS, **{"train.grad_clip": 0.05}) + ["--results-dir", tmp_path / "r", "--set",
                                                                   "run.save_final=false"]
    runs = [base, base + ["--set", "train.recompute=full"], base + ["--set", "train.recompute=attention"],
            base + ["--set", "train.recompute=full", "--set", "train.recompute_blocks=1"]]
    plain, *others = run_here("launchers/single.py", runs)
    for log in others:
        assert [(r["loss"], r["grad_norm"]) for r in log] == [(r["loss"], r["grad_norm"]) for r in plain]


def test_recompute_keeps_fewer_activations():
    cfg = load_config("configs/tiny.yaml", {"model.depth": 4})
    sizes = {}
    for mode, blocks in (("none", 0), ("full", 2), ("full", 0), ("attention", 0)):
        torch.manual_seed(0)
        model = DiT(cfg.model)
        model.set_recompute(mode, blocks)
        sizes[(mode, blocks)] = saved_activation_bytes(model, cfg, batch=8)
    none, half, full, attn = (sizes[k] for k in (("none", 0), ("full", 2), ("full", 0), ("attention", 0)))
    assert full < half < none and attn < none
    # every fully recomputed block keeps only its inputs: the saving per block is the same for each block
    assert (none - half) == (half - full)
    # the formula of one block, against the count: the difference between depth 4 and depth 2 is two blocks
    from dit_core.memory import block_activation_elements
    cfg2 = load_config("configs/tiny.yaml", {"model.depth": 2})
    torch.manual_seed(0)
    two = saved_activation_bytes(DiT(cfg2.model), cfg2, batch=8)
    m = cfg.model
    assert none - two == 2 * 8 * 4 * block_activation_elements(16, m.hidden_size, m.num_heads, m.mlp_ratio)


def test_rope_scores_depend_only_on_the_offset():
    """The same query content at every position and the same key content: with 2-D RoPE the score of token m
    against token n depends on (row_m - row_n, col_m - col_n) only."""
    g, D = 5, 16
    cos, sin = rope_2d_tables(D, g)
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, D).expand(1, g * g, 1, D)
    k = torch.randn(1, 1, 1, D).expand(1, g * g, 1, D)
    s = (apply_rope(q, cos, sin)[0, :, 0] @ apply_rope(k, cos, sin)[0, :, 0].T)           # (S, S)
    pos = [(i // g, i % g) for i in range(g * g)]
    by_offset = {}
    for m in range(g * g):
        for n in range(g * g):
            by_offset.setdefault((pos[m][0] - pos[n][0], pos[m][1] - pos[n][1]), []).append(s[m, n])
    spread = max(max(v) - min(v) for v in by_offset.values())
    assert spread < 1e-5 and len(by_offset) == (2 * g - 1) ** 2
    # without the rotation the scores are all equal: position is invisible to attention
    assert (q[0, :, 0] @ k[0, :, 0].T).std() < 1e-6 and s.std() > 0.1


def test_rope_trains_and_is_checked():
    cfg = load_config("configs/tiny.yaml", {"model.pos_embed": "rope2d"})
    model = DiT(cfg.model)
    assert model.pos_embed.abs().sum() == 0 and model.blocks[0].attn.rope
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 500]), torch.tensor([3, 4])
    out = model(x, t, y)
    assert out.shape == x.shape
    assert "rope_cos" not in model.state_dict()                 # checkpoints stay the same keys
    with pytest.raises(ConfigError, match="head size 6 .* must be a multiple of 4"):
        load_config("configs/tiny.yaml", {"model.pos_embed": "rope2d", "model.hidden_size": 24})
    from dit_core.parallel.ulysses import check_token_split
    with pytest.raises(ConfigError, match="model.pos_embed=rope2d rotates queries and keys"):
        check_token_split(cfg.model, 2, "--sp-degree")
    with pytest.raises(ConfigError, match="train.recompute_blocks=9 is more than model.depth=4"):
        load_config("configs/tiny.yaml", {"train.recompute": "full", "train.recompute_blocks": 9})
