"""Fully sharded data parallelism: N processes, each holding 1/N of the weights, gradients and AdamW state.

    torchrun --nproc_per_node 2 launchers/fsdp.py --impl hand --config configs/tiny.yaml --device cpu
    torchrun --nproc_per_node 4 launchers/fsdp.py --impl torch --resume results/fsdp/checkpoint-100  # any N
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.parallel.fsdp_train import IMPLS, FSDPReport, FSDPStrategy  # noqa: E402
from dit_core.rundir import check_outputs  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--impl", choices=IMPLS, default="hand",
                   help="hand: flat shards, gathered per unit (dit_core.parallel.fsdp); torch: FSDP2's fully_shard")
    p.add_argument("--unit", choices=("block", "model"), default="block",
                   help="(hand) one unit per DiT block (default), or the whole model as one unit")
    p.add_argument("--no-prefetch", action="store_true", help="(hand) gather each unit only when it is needed")
    p.add_argument("--report", help="write the measured memory and communication of step 1 (JSON) here")
    p.add_argument("--break", dest="broken", choices=FSDPStrategy.BROKEN,
                   help="(teaching, hand) average: sum the gradient shards over the ranks without dividing by N")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    env = init_from_env(cfg.run.device, timeout=cfg.run.dist_timeout)
    strategy = FSDPStrategy(env, args.impl, prefetch=not args.no_prefetch, unit=args.unit,
                            broken=args.broken)
    check_outputs(strategy, {"--report": args.report})          # before the work, not after it
    hooks = FSDPReport(args.report, cfg, strategy) if args.report else None
    result = train(cfg, strategy=strategy, quiet=not env.is_main, hooks=hooks)
    if env.is_main:
        print(f"[FSDP {args.impl}, {env.world_size} x {env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
