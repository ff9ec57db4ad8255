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


def single_runs(folder, flags) -> dict:
    """The reference: `python launchers/single.py` with accumulation 1 and 2; {accum: log}, runs in folder/a<accum>."""
    from dit_core.parity import run_launcher
    return {acc: run_launcher("launchers/single.py", flags(**{"train.grad_accum": acc}) +
                              ["--results-dir", str(folder / f"a{acc}")], launcher="python")
            for acc in (1, 2)}


def torchrun(script: str, args: list[str], nproc: int = 2):
    """Start a script under torchrun (CPU, one thread per process); returns the CompletedProcess."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script)] + list(args)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
