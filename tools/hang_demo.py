"""Two ranks that do not call the same collectives (chapter 17): torchrun --nproc_per_node 2 tools/hang_demo.py MODE

    skip      rank 1 skips an all_reduce: rank 0 waits for it until the process group's timeout (--timeout seconds)
    mismatch  the ranks all_reduce tensors of different shapes; under TORCH_DISTRIBUTED_DEBUG=DETAIL torch checks
              every collective's signature across ranks first and names the mismatch
Each rank prints one line: what it did, how long it waited, and the error it got (if any).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dit_core.parallel.dist import exit_process, init_from_env  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("skip", "mismatch"))
    p.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args()
    env = init_from_env("cpu", timeout=a.timeout)
    t0 = time.perf_counter()
    try:
        if a.mode == "skip":
            if env.rank == 0:
                dist.all_reduce(torch.ones(4))           # rank 1 never comes
            else:
                time.sleep(a.timeout + 3)                # busy elsewhere (a data loader, a branch on its rank)
        else:
            dist.all_reduce(torch.ones(4 + env.rank))
        print(f"[rank {env.rank}] {a.mode}: finished after {time.perf_counter() - t0:.1f} s", flush=True)
    except Exception as e:                               # what the learner would see in the traceback
        msg = " ".join(str(e).split())[:1200]
        waited = time.perf_counter() - t0
        print(f"[rank {env.rank}] {a.mode}: {type(e).__name__} after {waited:.1f} s: {msg}", flush=True)
    exit_process(0)


if __name__ == "__main__":
    main()
