"""Check a multi-machine launch before training: every rank says where it runs, one all-reduce proves they talk,
and rank 0 lists what the rendezvous store holds.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT launchers/rendezvous.py
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --master-addr HOST --master-port PORT launchers/rendezvous.py
    ... launchers/rendezvous.py --out rdzv.json        # the same, written as JSON (chapter 16 reads it)

`python -m dit_core.multinode` in place of torchrun (the same flags) waits at most --timeout for the other machines
and ends a launch that cannot start with one sentence.
"""
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dit_core.process import parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.multinode import CHECK_TIMEOUT, seconds  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402

ENV = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
       "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def main(argv=None):
    p = parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--timeout", type=seconds, default=CHECK_TIMEOUT,
                   help=f"seconds the launch and each collective may wait (default {CHECK_TIMEOUT:g})")
    p.add_argument("--out", help="write every rank's report and the store's keys here (JSON)")
    args = p.parse_args(argv)
    env = init_from_env(args.device, timeout=args.timeout)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(env.device), "backend": env.backend,
          **{k: os.environ.get(k) for k in ENV}}
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, me)
    one = torch.ones((), device=env.device)
    dist.all_reduce(one)                                  # every rank adds 1: the sum is the world size
    # What the store holds now: the keys torch wrote while the ranks met (each rank's address for gloo, the NCCL
    # unique id, the barrier counters) and the keys all_gather_object used. The store is a key-value server on
    # MASTER_ADDR:MASTER_PORT (the c10d agent's, or rank 0's under a static launch).
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):            # the process group's view is a PrefixStore over the TCPStore
        store = store.underlying_store
    try:
        keys = {k: len(store.get(k)) for k in sorted(store.list_keys())}     # key -> bytes of its value
    except (AttributeError, RuntimeError) as e:          # older torch, or a store without the extended API
        keys = {f"(cannot list keys: {e})": 0}
    dist.barrier()
    if env.is_main:
        print(f"[rendezvous] {env.world_size} ranks, all-reduce of ones = {int(one.item())} "
              f"({'every rank answered' if int(one.item()) == env.world_size else 'MISSING RANKS'})")
        for r in everyone:
            print(f"  rank {r['RANK']:>3} (node {r['GROUP_RANK']}, local {r['LOCAL_RANK']}) on {r['host']} "
                  f"pid {r['pid']} {r['device']} via {r['MASTER_ADDR']}:{r['MASTER_PORT']}")
        print(f"[rendezvous] the store holds {len(keys)} keys:")
        for k, n in keys.items():
            print(f"  {k!r}: {n} bytes")
        if args.out:
            Path(args.out).write_text(json.dumps({"ranks": everyone, "sum": int(one.item()), "keys": keys}, indent=1))


if __name__ == "__main__":
    run_main(main)
    finish()
