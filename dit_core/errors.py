"""Turn the project's own input errors into one clear line and exit code 2."""
import sys

from .config import ConfigError
from .data import DataError


def user_errors() -> tuple:
    from .parallel.dist import LaunchError
    from .train import CheckpointError
    return (ConfigError, DataError, CheckpointError, LaunchError)


def run_main(main, argv=None) -> None:
    """Run a command-line main(); a bad input prints one sentence, not a traceback."""
    try:
        main(argv)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
