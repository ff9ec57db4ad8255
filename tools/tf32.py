"""fp32 vs TF32 on one GPU, measured in one process (chapter 17): a matrix product's error and time, and the loss
curve of the same training run with each. Meta's DiT train.py turns TF32 on for both matmuls and cuDNN
(convolutions): `torch.backends.cuda.matmul.allow_tf32 = True`, `torch.backends.cudnn.allow_tf32 = True`.

    python tools/tf32.py --out tf32.json [--steps 300]
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def matmul(n: int, on: bool) -> dict:
    set_tf32(on)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=g)
    b = torch.randn(n, n, device="cuda", generator=g)
    exact = (a.double() @ b.double())
    c = a @ b
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 20
    rel = float(((c.double() - exact).norm() / exact.norm()).item())
    return {"n": n, "tf32": on, "seconds": dt, "tflops": 2 * n ** 3 / dt / 1e12, "rel_error_vs_fp64": rel}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    from dit_core.cli import config_from_args, launcher_parser
    from dit_core.parity import read_jsonl
    from dit_core.train import train
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "matmul": [], "train": {}}
    for on in (False, True):
        out["matmul"].append(matmul(8192, on))
        print(out["matmul"][-1], flush=True)
    for on in (False, True):
        set_tf32(on)
        d = Path(f"/tmp/tf32-{int(on)}")
        args = ["--config", "configs/mnist.yaml", "--max-steps", str(a.steps), "--set", "train.precision=fp32",
                "--set", "train.compile_mode=none", "--set", "run.save_final=false", "--set", "train.tensorboard=false",
                "--results-dir", str(d), "--overwrite", "--log-jsonl", str(d / "log.jsonl")]
        t0 = time.perf_counter()
        train(config_from_args(launcher_parser("tf32").parse_args(args)), quiet=True)
        log = read_jsonl(d / "log.jsonl")
        out["train"]["tf32" if on else "fp32"] = {"seconds": time.perf_counter() - t0,
                                                  "loss": [r["loss"] for r in log]}
    f, t = out["train"]["fp32"]["loss"], out["train"]["tf32"]["loss"]
    out["max_rel_loss_diff"] = max(abs(x / y - 1) for x, y in zip(t, f))
    out["final_loss"] = {"fp32": f[-1], "tf32": t[-1]}
    print({k: v for k, v in out.items() if k != "train"}, {k: v["seconds"] for k, v in out["train"].items()})
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
