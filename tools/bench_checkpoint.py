"""What the checkpoint manifest costs: a checkpoint of DiT-XL/2's shape written, hashed and verified on the CPU.

    python tools/bench_checkpoint.py --out bench_checkpoint.json [--dir /tmp/ckbench]

The largest checkpoint this workbook writes: a DiT of DiT-XL/2's shape (hidden 1152, depth 28, 16 heads, patch 2,
a 32 x 32 x 4 latent, 1000 classes; without Meta's learned variance, so 4 output channels, not 8), its AdamW
moments after one step and its EMA: model.pt + ema.pt + optimizer.pt, as `launchers/single.py` writes them. Timed:
the whole `save_checkpoint` (torch.save of every file, the manifest, the fsync, the rename), the manifest alone
(`write_manifest`: every file read and hashed with sha256) and the verification a reader makes
(`verify_checkpoint`), each once, on this machine's disk and page cache.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dit_core import checkpoint as C  # noqa: E402
from dit_core.config import load_config  # noqa: E402
from dit_core.engine import TorchEngine  # noqa: E402
from dit_core.strategy import Strategy  # noqa: E402
from dit_core.model import DiT  # noqa: E402

XL2 = {"model.hidden_size": 1152, "model.depth": 28, "model.num_heads": 16, "model.patch_size": 2,
       "model.image_size": 32, "model.in_channels": 4, "model.num_classes": 1000, "run.device": "cpu",
       "train.tensorboard": False}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON to write")
    p.add_argument("--dir", default="/tmp/dit-bench-checkpoint", help="a scratch folder on the disk to measure")
    a = p.parse_args(argv)
    cfg = load_config("configs/tiny.yaml", XL2)
    torch.manual_seed(0)
    model = DiT(cfg.model)
    params = sum(q.numel() for q in model.parameters())
    engine = TorchEngine(model, Strategy(), cfg, torch.device("cpu"))
    x = torch.randn(1, 4, 32, 32)
    model(x, torch.tensor([10]), torch.tensor([3])).square().mean().backward()   # AdamW's moments exist after a step
    engine.step()
    ema = engine.make_ema()
    folder = Path(a.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    ckpt = C.save_checkpoint(folder, 1, engine, ema, cfg, samples_seen=1)
    t_save = time.perf_counter() - t0
    files = {f.name: f.stat().st_size for f in sorted(ckpt.iterdir())}
    total = sum(v for k, v in files.items() if k != C.MANIFEST)
    t0 = time.perf_counter()
    C.write_manifest(ckpt)
    t_manifest = time.perf_counter() - t0
    C._VERIFIED.clear()
    t0 = time.perf_counter()
    C.verify_checkpoint(ckpt)
    t_verify = time.perf_counter() - t0
    out = {"parameters": params, "files": files, "bytes_hashed": total, "save_checkpoint_s": t_save,
           "write_manifest_s": t_manifest, "verify_s": t_verify,
           "hash_mib_per_s": total / 2 ** 20 / t_manifest, "torch": torch.__version__}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"{params:,} parameters; {total / 2 ** 30:.2f} GiB in {len(files) - 1} files; save_checkpoint {t_save:.1f} s "
          f"(manifest included), the manifest alone {t_manifest:.1f} s ({out['hash_mib_per_s']:.0f} MiB/s), "
          f"verification {t_verify:.1f} s")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
