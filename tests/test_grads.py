"""One step's gradients, parameter by parameter (`--dump-grads`, `python -m dit_core.parity grads`): the first
place a parity bug shows. The dumps come from the suite's shared runs (the single-process reference and the
declared 2-process DDP and ZeRO runs), so these checks add no process start-up."""
import pytest
import torch

from conftest import job_dir, run_py
from dit_core.config import ConfigError, load_config
from dit_core.parity import SUM_ORDER, compare_grads, read_grads


@pytest.mark.parametrize("run, dump", [("ddp hand a1", "ddp-hand1-grads.pt"), ("zero 2 a1", "zero/z2-grads.pt"),
                                       ("zero 3 a1", "zero/z3-grads.pt")])
def test_two_processes_have_the_single_process_gradients(jobs, reference, run, dump):
    jobs(2)                                                   # the shared 2-process job wrote the dump
    single = read_grads(reference(1)[1] / "grads.pt")
    rows = compare_grads(single, read_grads(job_dir() / dump))
    assert len(rows) == len(single) == sum(1 for _ in load_model_names())    # every parameter, both dumps
    assert sum(r["norm_a"] > 0 for r in rows) >= len(rows) // 2   # by step 3 gradients reach most layers
    worst = max(rows, key=lambda r: r["rel"])
    assert worst["rel"] <= SUM_ORDER, worst


def load_model_names():
    """The parameter names of the parity runs' model (the flags every 2-process parity test shares)."""
    from conftest import parity_flags
    from dit_core.cli import config_from_args, launcher_parser
    from dit_core.model import DiT
    cfg = config_from_args(launcher_parser("").parse_args(parity_flags()))
    return (n for n, _ in DiT(cfg.model).named_parameters())


def test_grads_cli_names_the_first_parameter_that_parts(reference, tmp_path):
    src = reference(1)[1] / "grads.pt"
    blob = torch.load(src, weights_only=True)
    same = run_py(["-m", "dit_core.parity", "grads", str(src), str(src)])
    assert same.returncode == 0 and "PASS" in same.stdout, same.stdout + same.stderr
    names = [n for n, g in blob["grads"].items() if g.norm() > 0]
    blob["grads"][names[1]] = blob["grads"][names[1]] * (1 + 1e-3)      # one layer 0.1% off
    bad = tmp_path / "bad.pt"
    torch.save(blob, bad)
    r = run_py(["-m", "dit_core.parity", "grads", str(src), str(bad)])
    assert r.returncode == 1 and f"the first, in the model's order: {names[1]} (1.0e-03)" in r.stdout, r.stdout
    assert "1 past relative difference" in r.stdout
    missing = run_py(["-m", "dit_core.parity", "grads", str(src), str(tmp_path / "nope.pt")])
    assert missing.returncode == 2 and "--dump-grads" in missing.stdout and missing.stdout.count("\n") == 1


def test_compare_grads_closed_form():
    a = {"w": torch.tensor([3.0, 4.0]), "z": torch.zeros(2)}
    rows = compare_grads(a, {"w": torch.tensor([3.0, 4.5]), "z": torch.zeros(2)})
    assert rows[0]["norm_a"] == 5.0 and rows[0]["max_abs"] == 0.5 and rows[0]["rel"] == pytest.approx(0.1)
    assert rows[1]["rel"] == 0.0                                        # both exactly zero
    assert compare_grads(a, {"w": a["w"], "z": torch.ones(2)})[1]["rel"] == float("inf")
    with pytest.raises(ValueError, match="shape"):
        compare_grads(a, {"w": torch.zeros(3), "z": torch.zeros(2)})
    with pytest.raises(ValueError, match="different parameters"):
        compare_grads(a, {"w": a["w"]})


class _Sliced:
    gradients_are_whole = False


class _Par:
    is_main = True


def test_dump_grads_refuses_what_it_cannot_write(tmp_path):
    from dit_core.train import GradDump
    cfg = load_config("configs/tiny.yaml", {"run.dump_grads": str(tmp_path / "g.pt"), "train.max_steps": 5})
    with pytest.raises(ConfigError, match="whole gradient on one rank.*_Sliced"):
        GradDump(_Sliced(), cfg, _Par(), fast=False, start=0)
    from dit_core.engine import TorchEngine
    whole = TorchEngine.__new__(TorchEngine)
    with pytest.raises(ConfigError, match="--fast off"):
        GradDump(whole, cfg, _Par(), fast=True, start=0)
    cfg.run.dump_grads_step = 7
    with pytest.raises(ConfigError, match="dump_grads_step=7 is not a step this run trains"):
        GradDump(whole, cfg, _Par(), fast=False, start=0)
    from dit_core.parallel.pipeline_train import PipelineEngine
    from dit_core.parallel.tensor import TensorParallelEngine
    assert not PipelineEngine.gradients_are_whole and not TensorParallelEngine.gradients_are_whole


def test_accelerate_refuses_dump_grads_in_one_sentence(tmp_path):
    from conftest import load_launcher
    with pytest.raises(ConfigError, match="Accelerate's own loop; dump from launchers/ddp.py"):
        load_launcher("accelerate").main(["--device", "cpu", "--max-steps", "1", "--results-dir", str(tmp_path),
                                          "--dump-grads", str(tmp_path / "g.pt")])
    assert not any(tmp_path.iterdir())                     # nothing written
