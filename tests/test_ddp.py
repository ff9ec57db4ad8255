"""Data parallelism with real processes: torchrun, gloo, 2 ranks on the CPU."""
import json
import subprocess
import sys

import pytest

from conftest import GRAD_DUMP, PARITY_STEPS, ROOT, assert_parity, declare, job_dir, parity_flags, run_py
from dit_core.parallel.ddp import IMPLS

CASES = [(impl, accum) for impl in IMPLS for accum in (1, 2)]
# Every implementation x accumulation, as `torchrun --nproc_per_node 2 launchers/ddp.py --impl I`: declared
# runs, which the suite's 2-process job runs (conftest.declare).
for impl, acc in CASES:
    declare(2, f"ddp {impl} a{acc}", "launchers/ddp.py", parity_flags(**{"train.grad_accum": acc}) + [
        "--impl", impl, "--results-dir", job_dir() / f"ddp-{impl}{acc}"] +
        (GRAD_DUMP + ["--dump-grads", job_dir() / "ddp-hand1-grads.pt"] if (impl, acc) == ("hand", 1) else []))


@pytest.mark.parametrize("impl, accum", CASES)
def test_two_processes_match_one(jobs, reference, impl, accum):
    log = jobs(2)[f"ddp {impl} a{accum}"]
    assert_parity(reference(accum)[0], log)
    assert log[-1]["samples_seen"] == PARITY_STEPS * 16


def test_the_reference_in_process_is_the_launcher_subprocess_bitwise(reference, tmp_path):
    """The shared reference runs inside pytest (one thread); the launcher as its own process gives the
    very same numbers, so every parity test compares against `python launchers/single.py` itself."""
    from dit_core.parity import run_launcher
    log = run_launcher("launchers/single.py", parity_flags() + ["--results-dir", str(tmp_path)], launcher="python")
    assert log == reference(1)[0]


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
    def log(name, loss_by=lambda s: 1.0, norm_by=lambda s: 1.0):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"step": s, "loss": loss_by(s) / (s + 1), "grad_norm": norm_by(s) * 0.2})
                                + "\n" for s in range(5)))
        return str(path)
    a, b = log("a"), log("b", loss_by=lambda s: 1 + 1e-7 * s, norm_by=lambda s: 1 - 1e-7 * s)
    ok = run_py(["-m", "dit_core.parity", "compare", a, b, "--plot", str(tmp_path / "p.png")])
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("PASS") and (tmp_path / "p.png").is_file(), ok.stdout
    assert "loss 4.0e-07 (step 4), grad norm 4.0e-07 (step 4)" in ok.stdout, ok.stdout       # both maxima
    bad = run_py(["-m", "dit_core.parity", "compare", a, b, "--rtol", "1e-8"])
    assert bad.returncode == 1 and "FAIL (the loss is past it; the gradient norm is past it)" in bad.stdout
    # equal losses, twice the gradient norm (a missing / N): the loss alone would pass; the verdict fails
    twice = log("twice", norm_by=lambda s: 2.0)
    r = run_py(["-m", "dit_core.parity", "compare", a, twice, "--rtol", "sum-order"])
    assert r.returncode == 1 and "(B/A 2)" in r.stdout and "FAIL (the gradient norm is past it)" in r.stdout, r.stdout
    r = run_py(["-m", "dit_core.parity", "compare", a, b, "--rtol", "tight"])
    assert r.returncode == 2 and "--rtol 'tight' is neither a number >= 0 nor a rung" in r.stderr, r.stderr


def test_ddp_launcher_without_torchrun_is_one_sentence():
    r = run_py(["launchers/ddp.py", "--max-steps", "1", "--device", "cpu"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "torchrun" in r.stderr, r.stderr
