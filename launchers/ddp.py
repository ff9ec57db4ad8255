"""Data parallelism: N processes, each on a slice of the same global batch.

    torchrun --nproc_per_node 2 launchers/ddp.py --impl hand --config configs/tiny.yaml --device cpu
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.ddp import IMPLS, DDPStrategy  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--impl", choices=IMPLS, default="hand",
                   help="hand: bucketed, overlapped (dit_core.parallel.ddp); torch: DistributedDataParallel; "
                        "naive: one blocking all-reduce per parameter")
    p.add_argument("--bucket-cap-mb", type=float, default=25)
    p.add_argument("--seed-by-rank", action="store_true", help="(teaching) initialise every rank differently")
    p.add_argument("--break", dest="broken", choices=("average", "broadcast"),
                   help="(teaching, hand/naive) skip the gradient averaging or the initial broadcast")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    env = init_from_env(cfg.run.device, timeout=cfg.run.dist_timeout)
    result = train(cfg, strategy=DDPStrategy(env, args.impl, args.bucket_cap_mb, args.seed_by_rank, args.broken),
                   quiet=not env.is_main)
    if env.is_main:
        print(f"[{args.impl}, {env.world_size} x {env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
