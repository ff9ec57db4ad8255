import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_core.config import load_config  # noqa: E402

# A DiT small enough that a training step takes milliseconds on a CPU.
MICRO = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 7,
         "train.global_batch_size": 16, "train.train_subset": 512, "train.warmup_steps": 2,
         "train.tensorboard": False, "train.lr": 1e-3, "run.device": "cpu"}


@pytest.fixture
def micro_cfg(tmp_path):
    def make(**over):
        o = dict(MICRO)
        o["run.results_dir"] = str(tmp_path / "run")
        o.update({k.replace("__", "."): v for k, v in over.items()})
        return load_config(None, o)
    return make


@pytest.fixture(scope="session")
def mnist():
    from dit_core.data import load_mnist
    return load_mnist("train")


def run_py(args, **kw):
    import subprocess
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, **kw)


def launcher_flags(steps: int, **over) -> list[str]:
    """Launcher arguments for the MICRO DiT on the CPU: global batch 16, clipping 1.0 (unless overridden)."""
    o = {k: v for k, v in MICRO.items() if k.startswith(("model.", "train."))}
    o.update({"train.grad_clip": 1.0, "train.global_batch_size": 16})
    o.update(over)
    args = ["--config", "configs/tiny.yaml", "--max-steps", str(steps), "--device", "cpu"]
    for k, v in o.items():
        args += ["--set", f"{k}={v}"]
    return args


# The flags every multi-process parity test shares, so that one single-process reference serves them all:
# 4 heads (divisible by 2 for Ulysses and TP, 16 tokens for Ulysses), clipping at 0.05 (below these runs'
# gradient norms of ~0.17: clipping acts at every step, so each strategy's global norm is exercised).
PARITY_STEPS = 20
PARITY = {"model.num_heads": 4, "train.grad_clip": 0.05}


# Step 3's gradients, for tests/test_grads.py: at step 0 adaLN-Zero leaves 49 of the 51 exactly zero.
GRAD_DUMP = ["--set", "run.dump_grads_step=3"]


def parity_flags(steps: int = PARITY_STEPS, **over) -> list[str]:
    return launcher_flags(steps, **{**PARITY, **over})


def assert_parity(ref: list, log, rtol: float | None = None, steps: int | None = PARITY_STEPS):
    """The parity check every strategy's test makes: `log` (a run's JSONL rows; a str is the sentence a run stopped
    with) against `ref` at every step, on the loss and the gradient norm, within `rtol` (default: the ladder's sum
    order, 1e-5); with `steps`, both logs must hold that many. Returns the verdict."""
    from dit_core.parity import SUM_ORDER, parity
    assert isinstance(log, list), f"the run stopped: {log}"
    v = parity(ref, log, SUM_ORDER if rtol is None else rtol)
    assert v.ok, str(v)
    assert steps is None or v.steps == steps, f"{v.steps} steps compared, not {steps}: {v}"
    return v


def perturbed_dit(cfg):
    """The DiT's initial weights plus small noise: at adaLN-Zero's init most gradients (and every output) are exactly
    zero, which would let a wrong pipeline or export pass a comparison."""
    import torch

    from dit_core.model import DiT
    torch.manual_seed(0)
    model = DiT(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def load_launcher(name: str):
    """A launcher script as a module, to call its main(argv) in this process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", ROOT / "launchers" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_REFERENCES: dict = {}


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(accum=1, steps=20, **over) -> (log, results folder) of `launchers/single.py` with
    parity_flags: run once per session in this process, on one thread, which is bitwise the run that
    `python launchers/single.py` makes as a subprocess with OMP_NUM_THREADS=1 (checked below)."""
    import torch
    from dit_core.parity import read_jsonl

    single = load_launcher("single")

    def get(accum: int = 1, steps: int = PARITY_STEPS, **over):
        key = (accum, steps, tuple(sorted(over.items())))
        if key not in _REFERENCES:
            d = tmp_path_factory.mktemp("reference")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                single.main(parity_flags(steps, **{"train.grad_accum": accum, **over}) +
                            ["--results-dir", str(d), "--log-jsonl", str(d / "log.jsonl")] +
                            (GRAD_DUMP + ["--dump-grads", str(d / "grads.pt")] if steps > 3 else []))
            finally:
                torch.set_num_threads(threads)
            _REFERENCES[key] = (read_jsonl(d / "log.jsonl"), d)
        return _REFERENCES[key]
    return get


def torchrun(script: str, args: list[str], nproc: int = 2):
    """Start a script under torchrun (CPU, one thread per process); returns the CompletedProcess."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script)] + list(args)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))


# ---------------------------------------------------------------- every multi-process run, one job per world size

_JOBS: dict = {}                  # nproc -> {name: (launcher script, args)}, in declaration order
_DONE: dict = {}
JOB_DIR = None


def job_dir() -> Path:
    """Where declared runs write their results (one folder per test session)."""
    global JOB_DIR
    if JOB_DIR is None:
        from dit_core.scratch import scratch_dir
        JOB_DIR = scratch_dir("dit-jobs-")
    return JOB_DIR


def declare(nproc: int, name: str, script: str, args: list) -> str:
    """A test module declares its multi-process runs when it is imported (pytest imports every module before
    the first test runs): all runs of one world size then go into one job (`dit_core.parity.run_mixed`, every
    launcher's main once per row), one start-up for the whole suite instead of one per table. Runs are kept
    in declaration order, so a resume may follow the run that wrote its checkpoint."""
    _JOBS.setdefault(nproc, {})[name] = (script, [str(a) for a in args])
    return name


@pytest.fixture(scope="session")
def jobs():
    """jobs(nproc)[name] -> the run's JSONL log, or the one sentence it stopped with (bad input)."""
    from dit_core.parity import run_mixed

    def get(nproc: int) -> dict:
        if nproc not in _DONE:
            names = list(_JOBS[nproc])
            _DONE[nproc] = dict(zip(names, run_mixed([_JOBS[nproc][n] for n in names], nproc=nproc, timeout=1800)))
        return _DONE[nproc]
    return get
