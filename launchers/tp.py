"""Megatron-style tensor parallelism: each block's attention heads and MLP split over --tp-degree ranks.

    torchrun --nproc_per_node 2 launchers/tp.py --tp-degree 2 --config configs/tiny.yaml --device cpu
    torchrun --nproc_per_node 4 launchers/tp.py --tp-degree 2 --config configs/bench.yaml   # DP 2 x TP 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.parallel.tensor import TensorParallelStrategy, check_tensor_parallel  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--tp-degree", type=int, default=2, help="ranks that share every layer (default 2)")
    p.add_argument("--break", dest="broken", choices=TensorParallelStrategy.BROKEN,
                   help="(teaching) world-average: divide the data-parallel gradient sum by the world size")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    env = init_from_env(cfg.run.device, timeout=cfg.run.dist_timeout)
    check_tensor_parallel(cfg.model, args.tp_degree, env.world_size)
    strategy = TensorParallelStrategy(env, args.tp_degree, args.broken)
    result = train(cfg, strategy=strategy, quiet=not env.is_main)
    if env.is_main:
        m = strategy.mesh
        print(f"[tensor parallel, DP {m.dp_size} x TP {m.inner_size}, {env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
