"""Ulysses sequence parallelism: each image's tokens split over --sp-degree ranks; data parallelism across groups.

    torchrun --nproc_per_node 2 launchers/ulysses.py --sp-degree 2 --config configs/tiny.yaml --device cpu
    torchrun --nproc_per_node 4 launchers/ulysses.py --sp-degree 2 --config configs/ulysses.yaml   # DP 2 x SP 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.parallel.ulysses import UlyssesStrategy, check_sequence_parallel  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--sp-degree", type=int, default=2, help="ranks that share one sample's tokens (default 2)")
    p.add_argument("--break", dest="broken", choices=UlyssesStrategy.BROKEN,
                   help="(teaching) loss-norm: each rank normalises by its own tokens; grad-group: gradients "
                        "all-reduced over the data-parallel group only")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    env = init_from_env(cfg.run.device, timeout=cfg.run.dist_timeout)
    check_sequence_parallel(cfg.model, args.sp_degree, env.world_size)
    strategy = UlyssesStrategy(env, args.sp_degree, args.broken)
    result = train(cfg, strategy=strategy, quiet=not env.is_main)
    if env.is_main:
        m = strategy.mesh
        print(f"[Ulysses, DP {m.dp_size} x SP {m.inner_size}, {env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
