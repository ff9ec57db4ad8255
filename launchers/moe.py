"""Expert parallelism: a mixture-of-experts DiT whose experts are split over --ep-degree ranks (N > P: DP x EP).

    torchrun --nproc_per_node 2 launchers/moe.py --ep-degree 2 --config configs/moe.yaml --device cpu
    torchrun --nproc_per_node 4 launchers/moe.py --ep-degree 2 --config configs/moe.yaml   # DP 2 x EP 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.parallel.expert import ExpertStrategy, check_expert_parallel  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--ep-degree", type=int, default=2, help="ranks that share one model's experts (default 2)")
    p.add_argument("--break", dest="broken", choices=ExpertStrategy.BROKEN,
                   help="(teaching) expert-average: divide expert gradients by their replica count instead of N")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    env = init_from_env(cfg.run.device, timeout=cfg.run.dist_timeout)
    check_expert_parallel(cfg.model, args.ep_degree, env.world_size)
    strategy = ExpertStrategy(env, args.ep_degree, args.broken)
    result = train(cfg, strategy=strategy, quiet=not env.is_main)
    if env.is_main:
        print(f"[expert parallel, DP {strategy.dp_size} x EP {args.ep_degree}, {cfg.model.num_experts} experts, "
              f"top-{cfg.model.top_k}, {env.backend}] {result.summary()}")
    return result


if __name__ == "__main__":
    run_main(main)
    finish()          # wait for every rank, close the group, leave
