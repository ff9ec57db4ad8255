"""Turn what a user can cause into one clear line: bad input (exit 2), a stuck or dead peer (exit 1).

Bad input is the project's own errors (config, data, checkpoint, launch, a diverged run) and the
operating system's refusals (a full disk, an unusable path). A collective that timed out, or whose
peer vanished, is named with the timeout that bounds it. Anything else is a bug: its traceback stays.
"""
import errno
import sys

from .config import ConfigError
from .data import DataError


def user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .parallel.dist import LaunchError
    from .train import DivergenceError
    return (ConfigError, DataError, CheckpointError, LaunchError, DivergenceError)


def peer_failure(e: BaseException) -> str | None:
    """The sentence for a collective that waited too long or lost its peer; None if `e` is not one."""
    from .parallel.dist import TIMEOUT
    text = str(e)
    limit = TIMEOUT["seconds"]
    if limit is None or not isinstance(e, RuntimeError):
        return None
    low = text.lower()
    if type(e).__name__ == "DistStoreError" or "/default_pg/" in text:
        # init_process_group's rendezvous in the store: a rank that never came (not started, stopped, killed while
        # it started) leaves the others waiting there, not in a collective
        return (f"not every rank joined the process group within run.dist_timeout={limit:g} s (one never started, or "
                f"was stopped or killed while starting), so this rank stops; check the launch, or raise the limit "
                f"(--set run.dist_timeout=SECONDS) if ranks legitimately start slowly.")
    if "timed out" in low or "timeout" in low:
        return (f"a collective waited longer than run.dist_timeout={limit:g} s for another rank (stuck, stopped or "
                f"dead), so this rank stops; if a step legitimately takes longer, raise it "
                f"(--set run.dist_timeout=SECONDS).")
    if any(w in low for w in ("connection closed", "connection reset", "broken pipe", "connection refused")):
        return "another rank of this job died (its connection closed), so this rank stops too."
    return None


def os_failure(e: OSError) -> str:
    where = f" '{e.filename}'" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full (writing{where}); free space, then resume from the latest checkpoint."
    return f"{e.strerror or e.__class__.__name__}{where}; check the path and its permissions."


def run_main(main, argv=None) -> None:
    """Run a command-line main(); a bad input prints one sentence, not a traceback."""
    try:
        main(argv)
    except user_errors() as e:
        _leave(f"error: {e}", 2)
    except OSError as e:
        _leave(f"error: {os_failure(e)}", 2)
    except RuntimeError as e:
        msg = peer_failure(e)
        if msg is None:
            raise
        if "run.dist_timeout" in msg:
            from .parallel.dist import stop_local_peers
            stop_local_peers()           # the stuck rank cannot stop itself; end the job now
        _leave(f"error: {msg}", 1)


def say(line: str, stream=None) -> None:
    """Write one whole line in a single write: lines that several ranks print to one pipe stay whole.

    `print` writes the text and its newline separately, so two ranks can interleave as
    "error: A.error: A.\n\n" (seen in CI); one write of at most PIPE_BUF bytes to a pipe is atomic.
    """
    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()


def _leave(line: str, code: int) -> None:
    say(line)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        # A rank that stops early must not wait in interpreter teardown for peers that went on.
        from .parallel.dist import exit_process
        exit_process(code)
    sys.exit(code)
