"""Leaving a process: one line for what a user can cause, exit codes, a bounded wait, stuck siblings stopped.

The bottom floor with dit_core.errors (the error classes): bad input ends with one `error:` line and exit 2; a
collective that timed out or lost its peer ends with one line naming the timeout and exit 1; anything else is a bug
and keeps its traceback. A launched rank leaves without interpreter teardown (exit_process), and a rank whose
launcher died stops (watch_launcher). The process group's timeout lives here (TIMEOUT) because the sentence of a
timed-out collective quotes it.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from .errors import os_failure, user_errors

# The process group's timeout, for the one sentence a timed-out collective becomes (peer_failure, below).
TIMEOUT = {"seconds": None}


def parser(**kw):
    """An argparse parser whose usage errors are one line and exit 2, like every other bad input."""
    import argparse

    class OneLine(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, f"error: {message}; see {self.prog} --help.\n")

    return OneLine(**kw)


def peer_failure(e: BaseException) -> str | None:
    """The sentence for a collective that waited too long or lost its peer; None if `e` is not one."""
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
        exit_process(code)
    sys.exit(code)


def exit_process(code: int = 0) -> None:
    """End a launched rank without Python's interpreter finalization.

    Gloo's worker threads can still hold finished asynchronous work (and its tensors) when the
    interpreter tears down; destroying those under a dying interpreter occasionally aborts the rank
    with "terminate called without an active exception" (a known PyTorch issue, seen here about once
    in 30 CPU runs). Everything this project writes is closed by then, so leave directly.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def watch_launcher(interval: float = 0.5) -> None:
    """Stop this rank when the process that launched it dies (kill -9 of the torchrun agent): without a
    supervisor nobody would stop it, and it would train on alone. A daemon thread notices that the
    parent changed (the orphan is re-parented) within `interval` seconds."""
    parent = os.getppid()
    if parent <= 1:
        return

    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                say(f"error: this rank's launcher (pid {parent}) is gone; rank "
                    f"{os.environ.get('RANK', '?')} stops too.")
                os._exit(1)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def stop_local_peers() -> list[int]:
    """After a collective timed out: SIGKILL the other ranks this rank's launcher started on this node.

    One of them is stuck (stopped, deadlocked, in an endless loop) and cannot answer a polite signal: a
    stopped process keeps a SIGTERM pending, so torchrun would wait its 30 s grace period before its own
    SIGKILL. Ending the siblings now ends the job within run.dist_timeout. (Ranks on other nodes time out
    in their own collectives and do the same there.) Linux only: elsewhere the launcher's grace applies."""
    if "LOCAL_RANK" not in os.environ or not os.path.isdir("/proc"):
        return []
    me, parent = os.getpid(), os.getppid()
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                is_rank = b"LOCAL_RANK=" in f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and is_rank:
            try:
                os.kill(int(entry), 9)
                killed.append(int(entry))
            except OSError:
                pass
    return killed
