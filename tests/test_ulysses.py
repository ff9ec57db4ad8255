"""Ulysses sequence parallelism with real processes: torchrun, gloo, on the CPU."""
import json

import pytest

from conftest import PARITY_STEPS as STEPS
from conftest import assert_parity, declare, job_dir, parity_flags, torchrun
from dit_core.config import ConfigError, load_config
from dit_core.parallel.ulysses import (check_sequence_parallel, megatron_sp_elements, ring_attention_elements,
                                       ulysses_elements)

flags = parity_flags            # 16 tokens and 4 heads: both divide by 2


# SP 2 with accumulation 1 and 2, and a patch size whose 49 tokens do not split (the suite's 2-process job);
# DP 2 x SP 2 (its 4-process job).
D = job_dir() / "sp"
for a in (1, 2):
    declare(2, f"sp a{a}", "launchers/ulysses.py", flags(**{"train.grad_accum": a}) + [
        "--sp-degree", "2", "--results-dir", D / f"a{a}"])
declare(2, "sp bad", "launchers/ulysses.py", flags(**{"model.patch_size": 4}) + [
    "--sp-degree", "2", "--results-dir", D / "bad"])
declare(4, "sp dp2", "launchers/ulysses.py", flags() + ["--sp-degree", "2", "--results-dir", D / "dp2"])


@pytest.fixture(scope="module")
def sp_runs(jobs):
    j = jobs(2)
    return {1: j["sp a1"], 2: j["sp a2"], "bad": j["sp bad"], "dir": D}


def test_ulysses_attention_equals_full_attention(tmp_path):
    out = tmp_path / "checks.json"
    r = torchrun("tests/ulysses_checks.py", [str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.loads(out.read_text())
    for impl in ("ours", "deepspeed"):         # ours, and DeepSpeed's DistributedAttention on the same call
        assert c[impl]["shape_ok"], c[impl]
        assert c[impl]["worst"] <= 1e-5, c[impl]   # output and the gradients of q, k and v, both ranks
    assert c["heads_error"].startswith("3 attention heads are not divisible by the sequence-parallel degree 2")
    assert c["tokens_error"].startswith("a sequence of 49 tokens cannot be split evenly over 2 ranks")
    # 3 layers x (q,k,v out + output back) forward, the same again in backward; bytes equal the formula.
    assert c["a2a_calls"] == 3 * 2 * 2
    assert c["a2a_sent_forward"] == c["formula_forward"] > 0
    assert c["a2a_sent_step"] == 2 * c["formula_forward"]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_sharing_each_image_match_one_process(sp_runs, reference, accum):
    log = sp_runs[accum]
    assert_parity(reference(accum)[0], log)
    assert log[-1]["samples_seen"] == STEPS * 16
    assert (sp_runs["dir"] / f"a{accum}" / f"checkpoint-{STEPS}" / "model.pt").is_file()   # a plain checkpoint


def test_dp2_x_sp2_matches_one_process(reference, jobs):
    assert_parity(reference(1)[0], jobs(4)["sp dp2"])


def test_bad_layout_is_one_sentence(sp_runs):
    sentence = ("model.patch_size=4 gives 49 tokens, not divisible by --sp-degree 2; "
                "use model.patch_size 1 (784 tokens) or 2 (196 tokens) or 7 (16 tokens).")
    assert sp_runs["bad"] == sentence
    assert not (sp_runs["dir"] / "bad").exists()          # stopped before anything was written


@pytest.mark.parametrize("over,degree,world,expect", [
    ({"model.num_heads": 2}, 4, 4, "model.num_heads=2 is not divisible by --sp-degree 4"),
    ({"model.patch_size": 14, "model.num_heads": 8}, 8, 8, "model.patch_size=14 gives 4 tokens, not divisible by --sp-degree 8"),
    ({}, 2, 3, "world size 3 is not divisible by --sp-degree 2"),
    ({}, 0, 2, "--sp-degree 0 must be at least 1"),
])
def test_layout_checks(over, degree, world, expect):
    cfg = load_config("configs/tiny.yaml", over)
    with pytest.raises(ConfigError, match=expect):
        check_sequence_parallel(cfg.model, degree, world)


def test_communication_formulas():
    b, n, h = 8, 196, 256
    assert ulysses_elements(b, n, h, 1) == 0
    for P in (2, 4, 8):   # per layer: Ulysses sends 1/P of Megatron-SP's volume, ring attention half of it
        assert ulysses_elements(b, n, h, P) * P == pytest.approx(megatron_sp_elements(b, n, h, P))
        assert ring_attention_elements(b, n, h, P) * 2 == pytest.approx(megatron_sp_elements(b, n, h, P))
