"""A results folder belongs to one run.

Rank 0 takes an exclusive lock on `<results_dir>/.lock` (an OS file lock: it dies with the process,
so a crash never leaves a stale lock) before the run writes anything, and holds it for the run's
life. Then, still before anything is written:

* a new run (no --resume) into a folder that holds another run's log or checkpoints stops, naming
  the two ways on, unless --overwrite says to discard that run;
* a resume truncates the log to the steps before the resumed one (a new file renamed over the old),
  so however often a run crashes and resumes, its log holds one row per step; checkpoints later than
  the resumed one belong to the future the resume discards: they stop the run unless --overwrite.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .checkpoint import checkpoint_steps
from .config import Config, ConfigError
from .scratch import write_atomic

try:
    import fcntl
except ImportError:            # Windows: no advisory locks; the folder checks still run
    fcntl = None

_HELD: dict[str, list] = {}    # resolved folder -> [open lock file, holds]; one process may nest holds


class RunFolder:
    def __init__(self, cfg: Config):
        run = cfg.run
        self.dir = Path(run.results_dir)
        self.log = Path(run.log_jsonl) if run.log_jsonl else self.dir / "log.jsonl"
        self.resume = Path(run.resume) if run.resume else None
        self.overwrite = run.overwrite
        self.dump_grads = run.dump_grads
        self.key = None

    # ------------------------------------------------------------ the lock
    def lock(self) -> "RunFolder":
        """Take (or, in the same process, re-enter) the folder's lock; one sentence if another run has it."""
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"--results-dir '{self.dir}' is a file, not a folder; pass a folder path.")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--results-dir '{self.dir}' cannot be created ({e.strerror}); pass a folder you can "
                              f"write to.") from None
        if not os.access(self.dir, os.W_OK):
            raise ConfigError(f"--results-dir '{self.dir}' is not writable; pass a folder you can write to.")
        if self.log.is_dir():
            raise ConfigError(f"--log-jsonl '{self.log}' is a folder; give a file path (default: "
                              f"<results-dir>/log.jsonl).")
        if self.dump_grads:
            check_output(self.dump_grads, "--dump-grads", "grads.pt")     # written at a step: known good before
        self.key = str(self.dir.resolve())
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return self
        f = _take(self.dir / ".lock", lambda holder: ConfigError(
            f"--results-dir '{self.dir}' is in use by another run ({holder}); wait for it to finish, or give this "
            f"run another --results-dir."), stamp=False)
        _stamp(f)
        held = [f]
        # A log outside the results folder is not covered by the folder's lock: it gets its own, beside it, so two
        # runs given one --log-jsonl are refused as two runs in one folder are (else both exit 0, one's rows lost).
        if self.log.resolve().parent != self.dir.resolve():
            try:
                self.log.parent.mkdir(parents=True, exist_ok=True)
                held.append(_take(self.log.parent / f".{self.log.name}.lock", lambda holder: ConfigError(
                    f"--log-jsonl '{self.log}' is being written by another run ({holder}); wait for it to finish, "
                    f"or give this run another --log-jsonl.")))
            except BaseException:
                f.close()
                raise
        _HELD[self.key] = [held, 1]
        return self

    def release(self) -> None:
        if self.key is None or self.key not in _HELD:
            return
        held = _HELD[self.key]
        held[1] -= 1
        if held[1] == 0:
            for f in held[0]:
                f.close()             # closing the file releases the lock
            del _HELD[self.key]
        self.key = None

    def __enter__(self) -> "RunFolder":
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------ what is already there
    def _log_steps(self) -> list[int]:
        return [r["step"] for r in _read_rows(self.log)] if self.log.is_file() else []

    def prepare(self, start: int) -> None:
        """Decide what happens to what the folder holds, then make it so (rank 0, holding the lock).
        `start` is the resumed step (0 for a new run). Nothing is touched before every check passed."""
        steps = checkpoint_steps(self.dir)
        logged = self._log_steps()
        inside = self.resume is not None and self.resume.resolve().parent == self.dir.resolve()
        if self.resume is None or not inside:
            if logged and not steps and self.log.resolve().parent != self.dir.resolve() and not self.overwrite:
                raise ConfigError(f"--log-jsonl '{self.log}' already holds another run's {len(logged)} steps; give "
                                  f"this run another --log-jsonl, or pass --overwrite to discard them.")
            held = ([f"{self.log.name} with {len(logged)} steps"] if logged else []) + \
                   [f"checkpoint-{s}" for s in steps]
            if held and not self.overwrite:
                way = f"resume it (--resume {self.dir / f'checkpoint-{steps[-1]}'}), " if steps else ""
                raise ConfigError(f"--results-dir '{self.dir}' already holds another run ({', '.join(held)}); "
                                  f"{way}give this run another --results-dir, or pass --overwrite to discard it.")
            discard = steps
        else:
            later = [s for s in steps if s > start]
            if later and not self.overwrite:
                raise ConfigError(
                    f"--results-dir '{self.dir}' holds checkpoint-{later[-1]}, later than the resumed "
                    f"checkpoint-{start}; resume the latest (--resume {self.dir / f'checkpoint-{steps[-1]}'}), "
                    f"or pass --overwrite to discard the steps after {start}.")
            discard = later
        for s in discard:
            shutil.rmtree(self.dir / f"checkpoint-{s}")
        for p in self.dir.glob(".checkpoint-*"):       # what a crash during a checkpoint left behind
            shutil.rmtree(p, ignore_errors=True)
        if self.resume is None or not inside:
            shutil.rmtree(self.dir / "tb", ignore_errors=True)
        truncate_log(self.log, start)


def check_output(path, flag: str, example: str | None = None) -> None:
    """A file the run writes later (a report, a timeline, a gradient dump): refused now, before any training step,
    if it cannot be written: a folder, or a place whose folder cannot be made or written to. Makes the missing
    folders (the writer would) and tests the folder with a file of its own, removed at once: as root, permission
    bits allow everything, but a read-only or lost mount does not."""
    import tempfile
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} '{path}' is a folder; give a file path, e.g. "
                          f"{path / (example or flag.lstrip('-') + '.json')}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
                pass
    except OSError as e:
        why = e.strerror or e.__class__.__name__
        raise ConfigError(f"{flag} '{path}' cannot be written ({why}{f': {e.filename!r}' if e.filename else ''}); "
                          f"give a path in a folder you can write to.") from None


def check_outputs(strategy, outputs: dict) -> None:
    """Rank 0 checks every {flag: path} the run writes at its end (check_output; None: not asked for), and every rank
    stops with its sentence, before the run's work starts."""
    error = None
    if strategy.is_main:
        try:
            for flag, path in outputs.items():
                if path:
                    check_output(path, flag)
        except ConfigError as e:
            error = e
    strategy.agree(error)


def _take(path: Path, refused, stamp: bool = True):
    """An exclusive OS lock on `path` (created if needed), held while the returned file stays open; `refused(holder)`
    is the error raised when another process holds it (holder: what that process wrote into the file)."""
    f = open(path, "a+")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise refused(holder) from None
    if stamp:
        _stamp(f)
    return f


def _stamp(f) -> None:
    """Who holds the lock, for the sentence a second run gets."""
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(sys.argv)[:300]}\n")
    f.flush()


def _read_rows(path: Path) -> list[dict]:
    """The log's rows; a torn last line (a crash while writing it) is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            rows.append(r)
    return rows


def truncate_log(path: Path, start: int) -> None:
    """Keep the rows of steps before `start` (all of them once each), atomically: write a new file,
    then rename it over the old one, so a crash here leaves one of the two, both whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    if path.is_file() and start > 0:
        for r in _read_rows(path):
            if r["step"] < start:
                rows[r["step"]] = r
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(rows[s]) + "\n" for s in sorted(rows))))
