"""Out of memory on purpose, then fixed (chapter 17), on any Linux machine: one training step of the tiny DiT at a
batch whose activations do not fit a memory limit this process sets on itself (RLIMIT_DATA, which caps the heap and
anonymous mappings, so every tensor the CPU allocator makes), with and without activation recomputation.

    python tools/oom_demo.py --limit-mib 2048 --batch 8192 --recompute none     # fails: can't allocate memory
    python tools/oom_demo.py --limit-mib 2048 --batch 8192 --recompute full     # the same step fits

Prints one line: ok with the process's peak resident memory (torch's own libraries included), or the allocator's
error. (On a GPU the same error is torch.cuda.OutOfMemoryError, with the sizes of what was allocated and reserved.)
"""
import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dit_core.config import load_config  # noqa: E402
from dit_core.diffusion import Diffusion  # noqa: E402
from dit_core.model import DiT  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--limit-mib", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--recompute", choices=("none", "full", "attention"), default="none")
    a = p.parse_args()
    cfg = load_config("configs/tiny.yaml", {})
    torch.manual_seed(0)
    model = DiT(cfg.model)
    model.set_recompute(a.recompute)
    d = Diffusion(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(a.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    resource.setrlimit(resource.RLIMIT_DATA, (a.limit_mib * 2 ** 20,) * 2)     # from here on, at most this much
    try:
        d.loss(model, x0, y, t, noise, None).backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10       # KiB on Linux
        print(f"recompute={a.recompute}, batch {a.batch}, limit {a.limit_mib} MiB: ok, forward and backward ran; "
              f"peak resident memory of the process {peak:.0f} MiB")
    except RuntimeError as e:
        print(f"recompute={a.recompute}, batch {a.batch}, limit {a.limit_mib} MiB: RuntimeError: "
              f"{' '.join(str(e).split())[:160]}")


if __name__ == "__main__":
    main()
