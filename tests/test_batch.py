import pytest
import torch

from dit_core.batch import Batch, global_batch, sample_indices, shard


def gb(step, seed=0, B=32, n=100):
    return global_batch(seed, step, B, n, timesteps=1000, label_dropout=0.1)


def same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("indices", "t", "noise", "drop"))


def test_global_batch_is_a_pure_function_of_seed_and_step():
    assert same(gb(5), gb(5))
    gb(9)  # drawing other steps in between changes nothing
    assert same(gb(5), gb(5))
    assert not torch.equal(gb(5).noise, gb(6).noise)
    assert not torch.equal(gb(5, seed=1).noise, gb(5).noise)
    b = gb(3)
    assert b.t.min() >= 0 and b.t.max() < 1000 and b.noise.shape == (32, 1, 28, 28)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("accum", [1, 2])
def test_shards_concatenate_to_the_global_batch(world, accum):
    g = gb(7)
    parts = [shard(g, r, world, m, accum) for r in range(world) for m in range(accum)]
    assert all(len(p) == 32 // (world * accum) for p in parts)
    assert same(Batch.cat(parts), g)


def test_shards_are_disjoint_and_differ():
    g = gb(2)
    a, b = shard(g, 0, 2), shard(g, 1, 2)
    assert not torch.equal(a.noise, b.noise)


def test_every_image_once_per_epoch():
    n, B = 100, 32          # B does not divide n: batches straddle epochs
    first_epoch = torch.cat([sample_indices(0, s, B, n) for s in range(4)])[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))
    second = torch.cat([sample_indices(0, s, B, n) for s in range(8)])[n:2 * n]
    assert sorted(second.tolist()) == list(range(n)) and not torch.equal(first_epoch, second)


def test_label_dropout_rate():
    drops = torch.cat([gb(s, B=256).drop for s in range(20)]).float().mean().item()
    assert 0.08 < drops < 0.12


def test_indivisible_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        shard(gb(0), 0, 3)
