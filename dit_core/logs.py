"""JSONL loss logs: one JSON object per optimizer step, written by rank 0, and their comparison.

Two runs that honour the determinism contract write the same numbers here, which
is what the parity comparisons read. (No imports from the project: train, plots and
parity all read logs through this module.)
"""
from __future__ import annotations

import json
from pathlib import Path

LOG_KEYS = ("step", "loss", "grad_norm", "lr", "samples_seen")


class JsonlLogger:
    """Append-or-truncate JSONL writer; flushes every line so a crash keeps the log (dit_core.rundir
    truncates it to the resumed step before a resume appends)."""

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


# ---------------------------------------------------------------- comparing two runs

def compare(a: list[dict], b: list[dict], key: str = "loss") -> list[dict]:
    """Per-step rows {step, a, b, abs, rel} over the steps both logs hold."""
    bb = {r["step"]: r[key] for r in b}
    rows = []
    for r in a:
        if r["step"] in bb:
            x, y = r[key], bb[r["step"]]
            d = abs(x - y)
            rows.append({"step": r["step"], "a": x, "b": y, "abs": d, "rel": d / max(abs(x), 1e-12)})
    return rows


def max_rel(rows: list[dict]) -> float:
    return max((r["rel"] for r in rows), default=float("nan"))


def format_table(rows: list[dict], name_a: str = "A", name_b: str = "B") -> str:
    lines = [f"{'step':>6} {'loss ' + name_a:>14} {'loss ' + name_b:>14} {'abs diff':>10} {'rel diff':>10}"]
    lines += [f"{r['step']:>6} {r['a']:>14.8f} {r['b']:>14.8f} {r['abs']:>10.2e} {r['rel']:>10.2e}" for r in rows]
    return "\n".join(lines)
