"""Issue 39's payoff at test size: DiT-XL/2's width (hidden 1152, 16 heads, MLP ratio 4, patch 2) at depth 2, real
processes (one, then FSDP on 2 under torchrun), every rank's resident memory measured by tools/xl_payoff.py and held
against the formulas; and the check shown able to fail. The full measurement (DDP, ZeRO-1/2/3, FSDP on 2 and 4
processes; 28 blocks; the memory-limit demo) is docs/xl_payoff_cpu.json, written by
`python tools/xl_payoff.py --out docs/xl_payoff_cpu.json`.

These runs are not declared to conftest's shared jobs: a process's high-water mark is the measurement, so each run
needs processes of its own. The data are a folder of 10 one-image classes of 4 x 4 RGB images (data.source=folder: no
VAE to load), 4 tokens per image; the tool itself trains on 4-channel latents with 1000 classes, which changes only the
input and class embeddings (0.3% of the parameters at this depth).
"""
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import xl_payoff as X  # noqa: E402

DEPTH, WORLD = 2, 2
TOL = X.TOLERANCE          # 10%: the tool's own tolerance


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("xl_payoff")
    a = SimpleNamespace(work=str(work), steps=2, batch=4, timeout=300)
    data = X.prepare_data(work, classes=10, source="folder")
    single = X.run_one("single", "single", 1, DEPTH, a, data)
    fsdp = X.run_one("fsdp", "fsdp", WORLD, DEPTH, a, data)
    for r in (single, fsdp):
        assert not r["errors"], r["errors"]
        assert len(r["ranks"]) == r["world_size"] and all(x["ok"] for x in r["ranks"])
    return single, fsdp, data


def held_after_build(psi: int, world: int) -> float:
    """Bytes a rank holds when step 0 begins (the formula's weights + the fp32 EMA, each /N where sharded): AdamW's
    moments do not exist yet and no gradient does."""
    from dit_core.parallel.zero_report import formula
    return formula(3 if world > 1 else 0, psi, world, "fp32")["parameters"] + 4 * psi / world


def test_fsdp_ranks_hold_what_the_formula_says(runs):
    """Each FSDP rank, measured twice: its resident memory when step 0 begins (above its baseline) against the sharded
    weights + EMA, 8Ψ/N; and the tensors it holds after step 1's backward (the ledger) against the ZeRO paper's
    stage-3 model states, 16Ψ/N."""
    _, fsdp, _ = runs
    psi = fsdp["psi"]
    for x in fsdp["ranks"]:
        v = X.verdict(x["built_rss"], held_after_build(psi, WORLD), TOL)
        assert v["ok"], (x["rank"], v)
        tally = sum(x["tally"].values())
        assert abs(tally / fsdp["formula"]["total"] - 1) <= 0.01 + 4 * psi / WORLD / fsdp["formula"]["total"], x
        # the ledger holds no EMA: its sum is the model states alone, padding of the flat shards aside
        states = fsdp["formula"]["total"] - fsdp["formula"]["ema"]
        assert abs(tally / states - 1) <= 0.01, (tally, states)


def test_one_process_holds_and_peaks_at_what_the_formula_says(runs):
    """The unsharded run: 8Ψ when step 0 begins (weights + EMA); at its peak 20Ψ (+ gradients 4Ψ and AdamW's
    moments 8Ψ) and the two temporaries AdamW's per-parameter update makes of the largest parameter."""
    single, _, data = runs
    psi, x = single["psi"], single["ranks"][0]
    assert X.verdict(x["built_rss"], held_after_build(psi, 1), TOL)["ok"], x
    v = X.verdict(x["peak"], single["formula"]["total"] + 2 * X.largest_param_bytes(DEPTH, data), TOL)
    assert v["ok"], v


def test_the_check_fails_a_run_that_does_not_shard(runs):
    """Negative control: the same check, given the unsharded run's measurement and the sharded formula (as if the
    one process were a rank of FSDP on 2), fails by the factor N; and FSDP's rank against the unsharded formula fails
    by 1/N."""
    single, fsdp, _ = runs
    psi = single["psi"]
    wrong = X.verdict(single["ranks"][0]["built_rss"], held_after_build(psi, WORLD), TOL)
    assert not wrong["ok"] and abs(wrong["ratio"] - WORLD) <= TOL * WORLD, wrong
    for x in fsdp["ranks"]:
        wrong = X.verdict(x["built_rss"], held_after_build(psi, 1), TOL)
        assert not wrong["ok"] and abs(wrong["ratio"] - 1 / WORLD) <= TOL, wrong


def test_fsdp_trains_what_one_process_trains(runs):
    """The parity rule: the loss and the gradient norm at every step, within the ladder's sum-order rung."""
    single, fsdp, _ = runs
    p = X.parity_of(fsdp, single)
    assert p["ok"] and p["steps"] == 2, p["line"]
