import pytest
import torch

from dit_core.config import load_config
from dit_core.model import DiT, TimestepEmbedder, count_parameters, sdpa_attention


def make(**over):
    o = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 4}
    o.update({f"model.{k}": v for k, v in over.items()})
    torch.manual_seed(0)
    return DiT(load_config(None, o).model)


@pytest.mark.parametrize("patch, tokens", [(4, 49), (2, 196), (7, 16)])
def test_shapes(patch, tokens):
    m = make(patch_size=patch)
    x = torch.randn(3, 1, 28, 28)
    assert m.patchify(x).shape == (3, tokens, 32)
    out = m(x, torch.tensor([1, 500, 999]), torch.tensor([0, 5, 9]))
    assert out.shape == x.shape


def test_adaln_zero_init_predicts_zero_and_blocks_are_identity():
    m = make()
    x = torch.randn(2, 1, 28, 28)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
    assert torch.count_nonzero(m(x, t, y)) == 0
    tok, c = m.patchify(x), m.condition(t, y)
    for blk in m.blocks:
        assert torch.equal(blk(tok, c), tok)   # gates are zero: the block is the identity


def test_unpatchify_inverts_a_patch_reshape():
    m = make(patch_size=4)
    x = torch.randn(2, 1, 28, 28)
    # (B, C, H, W) -> (B, tokens, p*p*C) in the order unpatchify expects
    p, g = 4, 7
    patches = x.reshape(2, 1, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p)
    assert torch.equal(m.unpatchify(patches), x)
    assert torch.equal(m.patch_tokens(x), patches)          # patch_tokens is that reshape


def test_a_slice_of_tokens_sees_its_own_position_embedding():
    """Sequence parallelism's building blocks: patchify and the token output of any contiguous slice."""
    m = make(patch_size=7)
    with torch.no_grad():                     # leave adaLN-Zero, so the output depends on the weights
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 700]), torch.tensor([1, 2])
    full = m.patchify(x)
    assert torch.equal(m.patchify(x, slice(8, 16)), full[:, 8:16])
    assert torch.equal(m.unpatchify(m.forward_tokens(x, t, y)), m(x, t, y))


def test_attention_is_swappable_and_default_is_softmax_attention():
    m = make()
    for p in m.parameters():                     # leave adaLN-Zero so attention matters
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 20]), torch.tensor([3, 4])
    ref = m(x, t, y)
    calls = []

    def manual(q, k, v):                          # (B, S, H, D) written out by hand
        calls.append(q.shape)
        w = torch.einsum("bshd,bthd->bhst", q, k) / q.shape[-1] ** 0.5
        return torch.einsum("bhst,bthd->bshd", w.softmax(-1), v)

    m.set_attention(manual)
    out = m(x, t, y)
    assert len(calls) == 2 and calls[0] == (2, 49, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    m.set_attention(lambda q, k, v: torch.zeros_like(q))
    assert not torch.allclose(m(x, t, y), ref)


def test_null_label_and_cfg():
    m = make()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert m.y_embedder.table.num_embeddings == 11
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 20]), torch.tensor([3, 4])
    null = torch.full_like(y, 10)
    torch.testing.assert_close(m(x, t, y, drop=torch.tensor([True, True])), m(x, t, null))
    torch.testing.assert_close(m.forward_with_cfg(x, t, y, 1.0), m(x, t, y))
    cond, unc = m(x, t, y), m(x, t, null)
    torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0), unc + 3.0 * (cond - unc), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_and_parameter_count():
    e = TimestepEmbedder.sinusoidal(torch.tensor([0, 1]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert count_parameters(make()) > 0


def test_sdpa_matches_manual_scale():
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))
    w = torch.einsum("bshd,bthd->bhst", q, k) / 8 ** 0.5
    torch.testing.assert_close(sdpa_attention(q, k, v), torch.einsum("bhst,bthd->bshd", w.softmax(-1), v),
                               rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_metas_layout_and_learn_sigma():
    """sincos_meta is sincos with its halves swapped (Meta: the column first); learn_sigma doubles the output channels,
    which the loss and the samplers read the first half of; guidance with learn_sigma acts on the first
    min(3, in_channels) channels only, as Meta's forward_with_cfg does, the rest is the conditional prediction."""
    from dit_core.config import DiffusionConfig
    from dit_core.diffusion import Diffusion
    from dit_core.model import sincos_pos_embed_2d
    row, col = sincos_pos_embed_2d(32, 7), sincos_pos_embed_2d(32, 7, column_first=True)
    assert torch.equal(col, torch.cat([row[:, 16:], row[:, :16]], 1)) and not torch.equal(row, col)
    assert torch.equal(make(pos_embed="sincos_meta").pos_embed[0], col)
    plain, sigma = make(), make(learn_sigma=True)
    assert count_parameters(sigma) - count_parameters(plain) == 4 * 4 * (32 + 1)      # the final layer's outputs
    for p in sigma.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 20]), torch.tensor([3, 4])
    out = sigma(x, t, y)
    assert out.shape == (2, 2, 28, 28)
    d = Diffusion(DiffusionConfig())
    assert torch.equal(d.error(out, x, t, x), d.error(out[:, :1], x, t, x))
    cond, unc = out, sigma(x, t, torch.full_like(y, 10))
    g = sigma.forward_with_cfg(x, t, y, 3.0)
    torch.testing.assert_close(g[:, :1], unc[:, :1] + 3.0 * (cond[:, :1] - unc[:, :1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[:, 1:], cond[:, 1:], rtol=1e-5, atol=1e-6)          # the variance: not guided
    assert d.sample(sigma, y, steps=2).shape == (2, 1, 28, 28)
