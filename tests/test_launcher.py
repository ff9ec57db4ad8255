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
