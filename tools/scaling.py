"""Scaling laws in miniature (chapter 17): train DiTs of several widths with one recipe, log every step's loss,
and write, per model, its parameter count and loss curve; the chapter fits power laws to them.

    python tools/scaling.py --out scaling.json                                   # one GPU: 5 widths, 3000 steps
    python tools/scaling.py --out scaling_cpu.json --device cpu --widths 16 32 64 --steps 150 --batch 32

The learning rate is constant after the warm-up (train.min_lr_ratio=1), so the loss at step s of one run stands for
a run of s steps: one run per width gives the loss against compute C = 6·N·D (N parameters, D tokens seen). With a
decaying schedule each budget would need its own run (Hoffmann et al. 2022 fit both ways).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 384])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    import torch
    from dit_core.cli import config_from_args, launcher_parser
    from dit_core.model import DiT
    from dit_core.parity import read_jsonl
    from dit_core.train import train
    out = {"args": vars(a), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "cpu",
           "runs": []}
    for h in a.widths:
        d = Path(f"/tmp/scaling-{h}")
        args = ["--config", "configs/mnist.yaml", "--device", a.device, "--max-steps", str(a.steps),
                "--global-batch-size", str(a.batch), "--set", f"model.hidden_size={h}", "--set",
                f"model.depth={a.depth}", "--set", "model.num_heads=4", "--set", f"train.lr={a.lr}",
                "--set", "train.min_lr_ratio=1.0", "--set", "train.warmup_steps=100", "--set", "train.compile_mode=none",
                "--set", "train.tensorboard=false", "--set", "run.save_final=false", "--results-dir", str(d),
                "--overwrite", "--log-jsonl", str(d / "log.jsonl")]
        if a.device == "cpu":
            args += ["--set", "train.precision=fp32"]
        cfg = config_from_args(launcher_parser("scaling").parse_args(args))
        params = sum(q.numel() for q in DiT(cfg.model).parameters())
        t0 = time.perf_counter()
        train(cfg, quiet=True)
        log = read_jsonl(d / "log.jsonl")
        tokens = (cfg.model.image_size // cfg.model.patch_size) ** 2
        out["runs"].append({"hidden": h, "params": params, "seconds": time.perf_counter() - t0,
                            "tokens_per_step": a.batch * tokens, "loss": [r["loss"] for r in log]})
        print(f"hidden {h}: {params:,} parameters, {len(log)} steps in {time.perf_counter() - t0:.1f} s, "
              f"last-100 mean loss {sum(r['loss'] for r in log[-100:]) / min(100, len(log)):.4f}", flush=True)
        Path(a.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
