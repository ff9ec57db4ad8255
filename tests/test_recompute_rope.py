"""Activation checkpointing through train.recompute, and the 2-D rotary position embedding (model.pos_embed)."""
import pytest
import torch

from conftest import launcher_flags
from dit_core.config import ConfigError, load_config
from dit_core.model import DiT, apply_rope, rope_2d_tables
from dit_core.parity import BITWISE, parity, run_here
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
        v = parity(plain, log, BITWISE)
        assert v.ok and v.steps == STEPS, str(v)


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


def _scores(cos, sin, q, k):
    """Every rotated query against every rotated key; q, k: (tokens, D), row i turned by table row i."""
    return apply_rope(q[None, :, None], cos, sin)[0, :, 0] @ apply_rope(k[None, :, None], cos, sin)[0, :, 0].T


def rope_checks(cos, sin, g, seed=0):
    """Which of the four properties of 2-D RoPE a pair of tables (g*g positions, head size D) has."""
    S, D = g * g, 2 * cos.shape[1]
    pos = [(i // g, i % g) for i in range(S)]
    at = {p: i for i, p in enumerate(pos)}
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(S, D, generator=gen), torch.randn(S, D, generator=gen)      # a different pair at each token
    base = _scores(cos, sin, q, k)
    moved = 0.0
    for t in ((0, 1), (1, 0), (1, 1), (2, -1), (-1, 2)):       # every token moved by t: every offset unchanged
        keep = [i for i, (r, c) in enumerate(pos) if (r + t[0], c + t[1]) in at]
        to = [at[(pos[i][0] + t[0], pos[i][1] + t[1])] for i in keep]
        diff = _scores(cos[to], sin[to], q[keep], k[keep]) - base[keep][:, keep]
        moved = max(moved, float(diff.abs().max() / base.abs().max()))
    qv, kv = torch.randn(1, D, generator=gen), torch.randn(1, D, generator=gen)     # one pair on every token
    same = _scores(cos, sin, qv.repeat(S, 1), kv.repeat(S, 1))
    s = {}
    for m, (r1, c1) in enumerate(pos):
        for n, (r2, c2) in enumerate(pos):
            s.setdefault((r2 - r1, c2 - c1), []).append(float(same[m, n]))
    s = {o: sum(v) / len(v) for o, v in s.items()}
    scale = max(abs(v) for v in s.values())

    def differ(a, b):
        return abs(s[a] - s[b]) / scale > 1e-3
    return {"offset only": moved <= 1e-5, "both axes": differ((0, 1), (0, 0)) and differ((1, 0), (0, 0)),
            "rows vs columns": differ((0, 1), (1, 0)), "2-D, not flat": differ((0, 1), (1, 1 - g))}


def test_rope_scores_depend_on_the_2d_offset_only():
    """The model's own tables: a score depends on (row offset, column offset) only, over random q and k at every
    token, and (0, 1), (1, 0) and (1, 1 - g) (one step in the flattened order) are three different offsets.
    Each property fails for a table built wrong in the way it guards against."""
    cfg = load_config("configs/tiny.yaml", {"model.pos_embed": "rope2d", "model.patch_size": 4})    # a 7 x 7 grid
    attn = DiT(cfg.model).blocks[0].attn
    g, D = 7, attn.head_dim
    cos, sin = attn.rope_cos, attn.rope_sin
    assert rope_checks(cos, sin, g) == dict.fromkeys(("offset only", "both axes", "rows vs columns", "2-D, not flat"),
                                                      True)
    theta = 100.0 ** (-torch.arange(D // 2, dtype=torch.float64) / (D // 2))
    row = torch.arange(g * g, dtype=torch.float64)[:, None] // g
    col = torch.arange(g * g, dtype=torch.float64)[:, None] % g
    flat = ((row * g + col) * theta).cos().float(), ((row * g + col) * theta).sin().float()
    summed = ((row + col) * theta).cos().float(), ((row + col) * theta).sin().float()
    no_col = cos.clone(), sin.clone()
    no_col[0][:, D // 4:], no_col[1][:, D // 4:] = 1.0, 0.0
    wrong_grid = tuple(t[:g * g] for t in rope_2d_tables(D, g + 1))
    for tables, broken in ((flat, "2-D, not flat"), (no_col, "both axes"), (summed, "rows vs columns"),
                           (wrong_grid, "offset only")):
        checks = rope_checks(*tables, g)
        assert [k for k, ok in checks.items() if not ok] == [broken], (broken, checks)


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
