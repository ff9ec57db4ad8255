"""DeepSpeed ZeRO stages 0-3: the same DiT, the same global batch, DeepSpeed's engine.

    deepspeed --num_gpus 2 launchers/zero.py --stage 2 --config configs/mnist.yaml
    torchrun --nproc_per_node 2 launchers/zero.py --stage 3 --config configs/tiny.yaml --device cpu
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.parallel.zero import ZeroStrategy, check_stage  # noqa: E402
from dit_core.rundir import check_outputs  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage: 0, 1, 2 or 3")
    p.add_argument("--ds-config", help="a DeepSpeed JSON (configs/ds_zero*.json) to add settings from; "
                                       "its batch, accumulation, clipping, stage and precision must agree")
    p.add_argument("--persistence-threshold", type=int,
                   help="ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed: 1e5)")
    p.add_argument("--bucket-elements", type=int, default=50_000_000,
                   help="ZeRO communication bucket size in elements (DeepSpeed's default 5e8 is 2 GB of fp32)")
    p.add_argument("--report", help="write the measured memory and communication of one step (JSON) here")
    p.add_argument("--break", dest="broken", choices=ZeroStrategy.BROKEN,
                   help="(teaching) accum-twice: divide the loss by the accumulation count as well as DeepSpeed does")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    check_stage(args.stage)           # before any process group exists
    env = init_from_env(cfg.run.device, launcher="deepspeed --num_gpus N", timeout=cfg.run.dist_timeout)
    strategy = ZeroStrategy(env, args.stage, args.ds_config, args.persistence_threshold, args.bucket_elements,
                            args.broken)
    check_outputs(strategy, {"--report": args.report})          # before the work, not after it
    hooks = None
    if args.report:
        from dit_core.parallel.zero_report import StepReport
        hooks = StepReport(args.report, cfg, strategy)
    result = train(cfg, strategy=strategy, quiet=not env.is_main, hooks=hooks)
    if env.is_main:
        print(f"[ZeRO-{args.stage}, {env.world_size} x {env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
