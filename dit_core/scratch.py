"""Scratch folders that go away by themselves, and the one way a file is written whole or not at all.

Every temporary folder the library, the tools, the tests and the chapters make (run logs, checkpoints of a parity
run, a chapter's small experiments) is made here, inside one folder per process that is removed when that process
ends. Before this, each parity run left its logs and checkpoints in the system's temporary folder: a few hundred
runs of the suite or the chapters filled a disk (seen on the machine this project is developed on).

    from dit_core.scratch import scratch_dir
    folder = scratch_dir("ch04-")          # a new, empty folder; gone when the process (or the notebook's kernel) exits

Set DIT_KEEP_SCRATCH=1 to keep them (to read a failed run's files); the path is printed once at exit then.
"""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

_ROOT: Path | None = None
_OWNER: int | None = None


def _remove(root: Path, owner: int) -> None:
    if os.getpid() != owner:          # a forked child inherits the handler: only the process that made it removes it
        return
    if os.environ.get("DIT_KEEP_SCRATCH") == "1":
        print(f"[scratch] kept {root}", file=sys.stderr)
        return
    shutil.rmtree(root, ignore_errors=True)


def scratch_root() -> Path:
    """This process's scratch folder (made on first use, removed at exit)."""
    global _ROOT, _OWNER
    if _ROOT is None or _OWNER != os.getpid() or not _ROOT.is_dir():
        _ROOT, _OWNER = Path(tempfile.mkdtemp(prefix="dit-workbook-")), os.getpid()
        atexit.register(_remove, _ROOT, _OWNER)
    return _ROOT


def scratch_dir(prefix: str = "dit-") -> Path:
    """A new empty folder inside this process's scratch folder."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))


def write_atomic(path, write) -> Path:
    """Write `path` whole or not at all: `write(tmp)` writes a temporary file beside it (same folder, so same disk),
    which is flushed to disk and renamed over `path`. A crash leaves the old file or the new one, never half of one;
    a write that fails removes the temporary file. Every file the project rewrites in place goes through here
    (caches, the log truncated on resume, gradient dumps); checkpoint folders are published the same way, a folder
    at a time (`checkpoint.publish`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
