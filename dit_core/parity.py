"""JSONL loss logs: one JSON object per optimizer step, written by rank 0.

Two runs that honour the determinism contract write the same numbers here, which
is what the parity comparisons read.
"""
from __future__ import annotations

import json
from pathlib import Path

LOG_KEYS = ("step", "loss", "grad_norm", "lr", "samples_seen")


class JsonlLogger:
    """Append-or-truncate JSONL writer; flushes every line so a crash keeps the log."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a" if append else "w")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Loss log '{path}' does not exist; run a launcher with --log-jsonl {path} first.")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"Line {n} of '{path}' is not JSON; the log is corrupt, run again.") from None
    return rows
