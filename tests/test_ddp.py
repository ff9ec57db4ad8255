"""Data parallelism with real processes: torchrun, gloo, 2 ranks on the CPU."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, launcher_flags, run_py, single_runs
from dit_core.parity import compare, max_rel, run_launcher

STEPS = 24


def flags(**over):
    return launcher_flags(STEPS, **over)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return single_runs(tmp_path_factory.mktemp("single"), flags)


@pytest.mark.parametrize("impl", ["hand", "torch", "naive"])
@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_match_one(single, tmp_path, impl, accum):
    log = run_launcher("launchers/ddp.py", flags(**{"train.grad_accum": accum}) +
                       ["--impl", impl, "--results-dir", str(tmp_path)], nproc=2)
    rows = compare(single[accum], log)
    assert len(rows) == STEPS
    assert max_rel(rows) <= 1e-5, max_rel(rows)
    assert log[-1]["samples_seen"] == STEPS * 16


def test_hand_written_ddp_mechanics(tmp_path):
    out = tmp_path / "checks.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tests" / "dist_checks.py"), str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.loads(out.read_text())
    assert c["weights_spread_before_wrap"] > 1e-3 and c["weights_spread_after_wrap"] == 0.0
    assert c["num_buckets"] > 3
    assert c["grad_norm"] > 1e-3
    assert c["hand_vs_torch_max_abs"] <= 1e-6 and c["naive_vs_torch_max_abs"] <= 1e-6
    assert c["grads_spread_after_sync"] == 0.0
    assert c["grads_spread_inside_no_sync"] > 1e-4           # nothing was communicated
    assert c["grads_spread_after_accumulation"] == 0.0
    for name in ("unused_everywhere", "unused_on_rank1"):
        assert c[f"{name}_frozen_grad_is_none"] and c[f"{name}_spread"] == 0.0
    assert c["unused_everywhere_b_grad"] == 0.0 and c["unused_on_rank1_b_grad"] > 0.0


def test_parity_cli_passes_and_fails(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(5)))
    b.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1) * (1 + 1e-7 * s)}) + "\n" for s in range(5)))
    ok = run_py(["-m", "dit_core.parity", "compare", str(a), str(b), "--plot", str(tmp_path / "p.png")])
    assert ok.returncode == 0 and "PASS" in ok.stdout and (tmp_path / "p.png").is_file(), ok.stdout + ok.stderr
    bad = run_py(["-m", "dit_core.parity", "compare", str(a), str(b), "--rtol", "1e-8"])
    assert bad.returncode == 1 and "FAIL" in bad.stdout


def test_ddp_launcher_without_torchrun_is_one_sentence():
    r = run_py(["launchers/ddp.py", "--max-steps", "1", "--device", "cpu"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "torchrun" in r.stderr, r.stderr
