"""What a user can cause, by kind: each is one sentence that names the value and the fix (exit 2 through
dit_core.process.run_main). The bottom floor: imports nothing of the project."""
import errno


class ConfigError(ValueError):
    """A config key or value is wrong; the message says which and how to fix it."""


class DataError(RuntimeError):
    """The data could not be obtained, failed its integrity check, or does not fit the model."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, diverged, foreign, or does not match the config."""


class LaunchError(RuntimeError):
    """The process was not started by a distributed launcher (or the launch is inconsistent)."""


class DivergenceError(RuntimeError):
    """The run diverged (a non-finite loss, gradient or weight, a loss far above its running level, or weights far
    from where they began): the run stops and saves nothing after it."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, LaunchError, DivergenceError)


def user_errors() -> tuple:
    return USER_ERRORS


def os_failure(e: OSError) -> str:
    where = f" '{e.filename}'" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full (writing{where}); free space, then resume from the latest checkpoint."
    return f"{e.strerror or e.__class__.__name__}{where}; check the path and its permissions."


def first_error(fn, *args) -> Exception | None:
    """Run `fn(*args)`; the user error it raised (one of USER_ERRORS), or None. Rank 0 checks something this way and
    the strategy's `agree` hands the verdict to every rank."""
    try:
        fn(*args)
    except USER_ERRORS as e:
        return e
    return None
