"""Pipeline parallelism: the DiT's blocks split over P stages, micro-batches flowing through them.

    torchrun --nproc_per_node 2 launchers/pipeline.py --pp-degree 2 --schedule 1f1b --microbatches 4 --device cpu
    torchrun --nproc_per_node 4 launchers/pipeline.py --pp-degree 2 ...   # DP 2 x PP 2
    torchrun --nproc_per_node 2 launchers/pipeline.py --impl torch ...    # torch.distributed.pipelining
    torchrun --nproc_per_node 2 launchers/pipeline.py --schedule interleaved --virtual-stages 2 --set model.depth=4
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.config import ConfigError  # noqa: E402
from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.parallel.pipeline import SCHEDULES, check_pipeline, describe_split  # noqa: E402
from dit_core.parallel.pipeline_train import PipelineStrategy, TimelineHooks, TorchPipelineEngine  # noqa: E402
from dit_core.rundir import check_outputs  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--pp-degree", type=int, default=2, help="pipeline stages (consecutive ranks; default 2)")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per accumulation step (M)")
    p.add_argument("--virtual-stages", type=int, default=1,
                   help="chunks of layers per rank, with --schedule interleaved (v >= 2; chunk k on rank k mod P)")
    p.add_argument("--impl", choices=("hand", "torch"), default="hand",
                   help="hand: dit_core.parallel.pipeline; torch: torch.distributed.pipelining, the same stages")
    p.add_argument("--break", dest="broken", choices=PipelineStrategy.BROKEN,
                   help="(teaching, hand) rescale-grads: divide every gradient by M after each accumulation step; "
                        "sum-microbatches: leave the 1/M out of each micro-batch's loss")
    p.add_argument("--timeline", help="write when every stage computed and waited, step by step (JSON), here")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.broken and args.impl == "torch":
        raise ConfigError(f"--break {args.broken} changes the hand-written schedules; use it with --impl hand.")
    env = init_from_env(cfg.run.device, timeout=cfg.run.dist_timeout)
    dp = env.world_size // args.pp_degree if args.pp_degree >= 1 and env.world_size % args.pp_degree == 0 else 1
    check_pipeline(cfg, args.pp_degree, env.world_size, args.microbatches, args.schedule, dp, args.virtual_stages)
    strategy = PipelineStrategy(env, args.pp_degree, args.microbatches, args.schedule, args.broken,
                                timeline=bool(args.timeline), chunks=args.virtual_stages)
    check_outputs(strategy, {"--timeline": args.timeline})      # before the work, not after it
    if args.impl == "torch":
        strategy.make_engine = lambda model, c, device: TorchPipelineEngine(model, strategy, c, device)
    if env.is_main:
        print(f"[pipeline] {describe_split(cfg.model.depth, args.pp_degree, args.virtual_stages)}")
    hooks = None
    if args.timeline:
        hooks = TimelineHooks(strategy)
    result = train(cfg, strategy=strategy, quiet=not env.is_main, hooks=hooks)
    if args.timeline:
        hooks.write(args.timeline, cfg)
    if env.is_main:
        m = strategy.mesh
        print(f"[pipeline {args.impl} {args.schedule}, DP {m.dp_size} x PP {m.inner_size}, M {args.microbatches}, "
              f"{env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
