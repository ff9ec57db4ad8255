"""Context parallelism: each image's tokens split over --cp-degree ranks with ring attention (x --ulysses-degree: USP).

    torchrun --nproc_per_node 2 launchers/context.py --cp-degree 2 --config configs/ulysses.yaml --device cpu
    torchrun --nproc_per_node 4 launchers/context.py --cp-degree 2 --ulysses-degree 2 --config configs/ulysses.yaml
    torchrun --nproc_per_node 4 launchers/context.py --cp-degree 2 --config configs/ulysses.yaml   # DP 2 x CP 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.context import ContextStrategy, check_context_parallel  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--cp-degree", type=int, default=2, help="ranks of the ring that pass K/V blocks (default 2)")
    p.add_argument("--ulysses-degree", type=int, default=1,
                   help="Ulysses inside each ring step (USP): ranks that trade tokens for heads (default 1: ring only)")
    p.add_argument("--break", dest="broken", choices=ContextStrategy.BROKEN,
                   help="(teaching) cp-average: average the context-parallel ranks' partial gradients instead of summing")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    env = init_from_env(cfg.run.device, timeout=cfg.run.dist_timeout)
    check_context_parallel(cfg.model, args.cp_degree, args.ulysses_degree, env.world_size)
    strategy = ContextStrategy(env, args.cp_degree, args.ulysses_degree, args.broken)
    result = train(cfg, strategy=strategy, quiet=not env.is_main)
    if env.is_main:
        m = strategy.mesh
        print(f"[context parallel, DP {m.dp_size} x (Ulysses {args.ulysses_degree} x Ring {args.cp_degree}), "
              f"{env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
