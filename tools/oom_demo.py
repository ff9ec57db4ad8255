"""Out of memory on purpose, then fixed (chapter 17): one training step of the bench DiT at a batch too large for the
GPU, then the same batch with each block recomputed, and with half the batch twice (accumulation).

    python tools/oom_demo.py --out oom.json [--batch 4096]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dit_core.config import load_config  # noqa: E402
from dit_core.memory import step_memory  # noqa: E402


def attempt(cfg, batch, recompute="none", blocks=0):
    try:
        r = step_memory(cfg, batch, recompute, blocks, steps=1)
        return {"batch": batch, "recompute": recompute, "ok": True, "peak": r["peak"], "step_s": r["step_s"]}
    except torch.cuda.OutOfMemoryError as e:
        return {"batch": batch, "recompute": recompute, "ok": False, "error": " ".join(str(e).split())[:400]}
    finally:
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=4096)
    a = p.parse_args()
    cfg = load_config("configs/bench.yaml", {})
    rows = [attempt(cfg, a.batch), attempt(cfg, a.batch, "full", 0), attempt(cfg, a.batch // 4)]
    for r in rows:
        print(r, flush=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "total_memory":
                                       torch.cuda.get_device_properties(0).total_memory, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
