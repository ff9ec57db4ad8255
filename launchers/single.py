"""One process, one device: the reference run every strategy is compared with.

    python launchers/single.py --config configs/tiny.yaml --max-steps 200
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.train import train  # noqa: E402


def main(argv=None):
    args = launcher_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = config_from_args(args)
    result = train(cfg)
    print(result.summary())


if __name__ == "__main__":
    run_main(main)
