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

# What a parity check compares at every step: the loss, and the gradient norm before clipping. Under AdamW a gradient
# wrong by a constant factor (a missing / N) barely moves the loss, and not at all while clipping acts at every step
# (the clipped update is the same direction at the same length); the norm shows the factor at once.
PARITY_KEYS = ("loss", "grad_norm")


def compare(a: list[dict], b: list[dict], key: str = "loss") -> list[dict]:
    """Per-step rows {step, a, b, abs, rel} of one logged value over the steps both logs hold."""
    bb = {r["step"]: r for r in b}
    rows = []
    for r in a:
        if r["step"] in bb:
            x, y = _value(r, key), _value(bb[r["step"]], key)
            d = abs(x - y)
            rows.append({"step": r["step"], "a": x, "b": y, "abs": d, "rel": d / max(abs(x), 1e-12)})
    return rows


def _value(row: dict, key: str) -> float:
    if key not in row:
        raise ValueError(f"the log row of step {row.get('step')} has no {key!r}; compare logs written by this "
                         f"project's launchers (they log {', '.join(LOG_KEYS)}).")
    return float(row[key])


def max_rel(rows: list[dict]) -> float:
    """The largest relative difference in `compare`'s rows (NaN where a difference is NaN: it must fail)."""
    worst = float("nan") if not rows else 0.0
    for r in rows:
        if not r["rel"] <= worst:      # NaN (a diverged run) wins over every number
            worst = r["rel"]
            if worst != worst:
                break
    return worst


class Verdict:
    """Two runs compared at every step on the loss **and** the gradient norm: the parity verdict.

    `ok` only if both logs hold the same steps (at least one) and each value is within `rtol` (relative to A)
    at every one of them. `failed` names what did not hold; `str()` is the one line a test or a chapter prints."""

    def __init__(self, a: list[dict], b: list[dict], rtol: float):
        self.rtol = rtol
        self.rows = {k: compare(a, b, k) for k in PARITY_KEYS}
        self.steps = len(self.rows["loss"])
        steps_a, steps_b = [r["step"] for r in a], [r["step"] for r in b]
        self.only_a = sorted(set(steps_a) - set(steps_b))
        self.only_b = sorted(set(steps_b) - set(steps_a))
        self.worst = {k: max_rel(rows) for k, rows in self.rows.items()}
        ratios = [r["b"] / r["a"] for r in self.rows["grad_norm"] if r["a"] != 0]
        # B's gradient norm over A's, smallest and largest: a constant factor shows as one number (2.0: twice)
        self.norm_ratio = (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))

    @property
    def loss(self) -> float:
        """The largest relative loss difference over the steps compared."""
        return self.worst["loss"]

    @property
    def grad_norm(self) -> float:
        """The largest relative gradient-norm difference over the steps compared."""
        return self.worst["grad_norm"]

    @property
    def failed(self) -> tuple:
        """What did not hold: 'steps' (the logs hold different steps), 'loss', 'grad_norm'."""
        bad = ("steps",) if (self.only_a or self.only_b or not self.steps) else ()
        return bad + tuple(k for k in PARITY_KEYS if not self.worst[k] <= self.rtol)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        def where(k):
            rows = self.rows[k]
            if not rows:
                return "n/a"
            w = self.worst[k]
            step = next(r["step"] for r in rows if (r["rel"] == w or (w != w and r["rel"] != r["rel"])))
            return f"{w:.1e} (step {step})"
        lo, hi = self.norm_ratio
        ratio = f"{lo:.4g}" if abs(hi - lo) <= 1e-4 * abs(lo) else f"{lo:.6g} to {hi:.6g}"
        text = (f"{self.steps} steps; max rel diff: loss {where('loss')}, grad norm {where('grad_norm')} "
                f"(B/A {ratio}); tolerance {self.rtol:.0e}: ")
        if self.ok:
            return text + "PASS"
        why = []
        if "steps" in self.failed:
            why.append(f"only A holds steps {_span(self.only_a)}" if self.only_a else "")
            why.append(f"only B holds steps {_span(self.only_b)}" if self.only_b else "")
            why.append("" if self.steps else "no step in common")
        why += [f"{'the loss' if k == 'loss' else 'the gradient norm'} is past it" for k in PARITY_KEYS
                if k in self.failed]
        return text + "FAIL (" + "; ".join(w for w in why if w) + ")"


def _span(steps: list[int]) -> str:
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}..{steps[-1]} ({len(steps)})"


def parity(a: list[dict], b: list[dict], rtol: float) -> Verdict:
    """Run B against reference A, at every step, on the loss and the gradient norm (before clipping); see
    `dit_core.parity.LADDER` for which `rtol` a strategy earns."""
    return Verdict(a, b, rtol)


def format_table(a: list[dict], b: list[dict], name_a: str = "A", name_b: str = "B", limit: int | None = None) -> str:
    """Both logs side by side, step by step: loss and gradient norm of each, and their relative differences."""
    loss, norm = compare(a, b, "loss"), compare(a, b, "grad_norm")
    na, nb = name_a[:13], name_b[:13]
    lines = [f"{'step':>5} {'loss ' + na:>18} {'loss ' + nb:>18} {'rel':>8} {'norm ' + na:>18} {'norm ' + nb:>18} "
             f"{'rel':>8}"]
    for lo, no in list(zip(loss, norm))[:limit]:
        lines.append(f"{lo['step']:>5} {lo['a']:>18.8f} {lo['b']:>18.8f} {lo['rel']:>8.1e} {no['a']:>18.8f} "
                     f"{no['b']:>18.8f} {no['rel']:>8.1e}")
    return "\n".join(lines)
