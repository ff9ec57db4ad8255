"""N-D parallelism: data x pipeline x context x tensor parallelism in one DeviceMesh (dit_core.parallel.nd).

    torchrun --nproc_per_node 8 launchers/nd.py --dp 2 --pp 2 --tp 2 --device cpu          # 3-D, as Megatron
    torchrun --nproc_per_node 8 launchers/nd.py --pp 2 --cp 2 --tp 2 --device cpu          # --dp left out: 8 / 8 = 1
    torchrun --nproc_per_node 4 launchers/nd.py --dp 2 --cp 2 --microbatches 1 --schedule gpipe   # any degree may be 1

On GPUs (NCCL, one process per GPU): the same commands with --device cuda, e.g. on one machine of 8 GPUs
    torchrun --nproc_per_node 8 launchers/nd.py --dp 2 --pp 2 --tp 2 --device cuda
(this launcher has run only over gloo on CPU processes; never on NCCL with 2 or more GPUs).

Axes from the innermost (consecutive ranks) out: tp, cp, pp, dp; rank = ((dp*P + pp)*C + cp)*T + tp.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.parallel.nd import NDStrategy, check_nd, mesh_picture, mesh_record, resolve_layout  # noqa: E402
from dit_core.parallel.pipeline import SCHEDULES, describe_split  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default: world size / (pp x cp x tp))")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks: ring attention on token slices")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: Megatron slices of every block")
    p.add_argument("--schedule", choices=SCHEDULES[:2], default="1f1b", help="the pipeline's schedule (default 1f1b)")
    p.add_argument("--microbatches", type=int, default=None,
                   help="micro-batches per accumulation step through the pipeline (default: 2 x --pp, 1 when --pp 1)")
    p.add_argument("--break", dest="broken", choices=NDStrategy.BROKEN,
                   help="(teaching) do one reduction the wrong way: see dit_core.parallel.nd.NDStrategy.BROKEN")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    env = init_from_env(cfg.run.device, timeout=cfg.run.dist_timeout)
    layout = resolve_layout(env.world_size, args.dp, args.pp, args.cp, args.tp)
    microbatches = args.microbatches if args.microbatches is not None else (2 * args.pp if args.pp > 1 else 1)
    check_nd(cfg, layout, env.world_size, microbatches, args.schedule)
    strategy = NDStrategy(env, layout, microbatches, args.schedule, args.broken)
    record = mesh_record(strategy)          # each rank's coordinates and groups: ours and init_device_mesh's
    if env.is_main:
        print(f"[nd] {mesh_picture(layout)}")
        if layout.pp > 1:
            print(f"[nd] {describe_split(cfg.model.depth, layout.pp)}")
    result = train(cfg, strategy=strategy, quiet=not env.is_main)
    if env.is_main:
        (Path(cfg.run.results_dir) / "mesh.json").write_text(json.dumps(record, indent=1))
        print(f"[nd {layout}, {args.schedule} M {microbatches}, {env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
