"""The five collectives and the hand-written ring all-reduce, between real spawned processes (gloo)."""
import pytest

from dit_core.parallel.collectives import COLLECTIVES, bytes_sent_per_rank, expected, run_all


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_their_definitions(world):
    res = run_all(world)
    for name in COLLECTIVES:
        assert [res[r][name] for r in range(world)] == [expected(name, world)[r] for r in range(world)], name
    ring = res[0]["ring"]
    assert ring["max_abs_diff_vs_all_reduce"] < 1e-5
    assert ring["bytes_sent"] == pytest.approx(bytes_sent_per_rank("all_reduce", ring["tensor_bytes"], world))
