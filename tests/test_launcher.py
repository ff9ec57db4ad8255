import json

from conftest import run_py


def test_single_launcher_runs_with_the_contract_flags(tmp_path):
    log = tmp_path / "log.jsonl"
    r = run_py(["launchers/single.py", "--config", "configs/tiny.yaml", "--max-steps", "3",
                "--global-batch-size", "16", "--seed", "1", "--device", "cpu", "--precision", "fp32",
                "--results-dir", str(tmp_path / "run"), "--log-jsonl", str(log),
                "--set", "model.hidden_size=32", "--set", "model.depth=1", "--set", "train.tensorboard=false"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1, 2] and rows[-1]["samples_seen"] == 48
    assert (tmp_path / "run" / "checkpoint-3" / "model.pt").is_file()
    r2 = run_py(["launchers/single.py", "--config", "configs/tiny.yaml", "--max-steps", "5",
                 "--global-batch-size", "16", "--seed", "1", "--device", "cpu",
                 "--results-dir", str(tmp_path / "run"), "--log-jsonl", str(log),
                 "--resume", str(tmp_path / "run" / "checkpoint-3"),
                 "--set", "model.hidden_size=32", "--set", "model.depth=1", "--set", "train.tensorboard=false"])
    assert r2.returncode == 0, r2.stderr
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_resume_from_missing_checkpoint_is_one_sentence(tmp_path):
    r = run_py(["launchers/single.py", "--max-steps", "2", "--resume", str(tmp_path / "checkpoint-9")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "checkpoint-<step>" in r.stderr, r.stderr


def test_two_processes_on_a_one_gpu_machine_stop_with_one_sentence_offering_the_cpu(tmp_path):
    """`torchrun --nproc_per_node 2 ... --device auto` where the machine has one GPU: every rank stops at once with
    the same sentence, which names both ways out (one process per GPU, or --device cpu). Seen on one H100 too
    (docs/results.md), where this test's fake is the real thing."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, parity_flags
    args = [a for a in parity_flags(2) if a not in ("--device", "cpu")] + ["--device", "auto", "--results-dir",
                                                                           str(tmp_path / "r")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tests" / "fake_one_gpu.py"), "launchers/ddp.py", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    want = ("error: 2 processes on this machine but it has 1 GPU (one per process); start at most 1 "
            "(--nproc_per_node 1), or add --device cpu to run 2 processes over gloo on the CPU.")
    # (torchrun stops the other rank once one has failed: it may be gone before it prints its own line)
    assert r.returncode != 0 and errors and all(e == want for e in errors), r.stderr[-2000:]
    assert not (tmp_path / "r").exists()                 # nothing written
