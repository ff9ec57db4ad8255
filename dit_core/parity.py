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


def run_launcher(script: str, args: list[str], nproc: int = 1, log: str | Path | None = None,
                 launcher: str = "torchrun", timeout: int = 900, env: dict | None = None,
                 launch_args: list[str] | None = None) -> list[dict]:
    """Run a launcher (`python`, `torchrun --nproc_per_node nproc`, `deepspeed --num_gpus nproc` or
    `accelerate launch --num_processes nproc [launch_args]`) and return its JSONL log.

    Tests and notebooks use this to run the real thing: separate processes, real collectives.
    """
    import os
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    log = Path(log) if log else Path(tempfile.mkdtemp(prefix="dit-log-")) / "log.jsonl"
    if launcher == "python":
        cmd = [sys.executable, str(root / script)]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(root / script)]
    elif launcher == "deepspeed":
        from .parallel.dist import free_port
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
               f"--master_port={free_port()}", str(root / script)]
    elif launcher == "accelerate":
        from .parallel.dist import free_port
        cmd = [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={nproc}",
               f"--main_process_port={free_port()}", *(launch_args or []), str(root / script)]
    else:
        raise ValueError(f"launcher={launcher!r} is not python, torchrun, deepspeed or accelerate.")
    full_env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", TQDM_DISABLE="1", **(env or {}))
    r = subprocess.run(cmd + list(args) + ["--log-jsonl", str(log)], cwd=root, env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-2:])} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return read_jsonl(log)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dit_core.parity",
                                description="Compare the loss logs of two runs step by step.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="per-step table and max relative difference; exit 1 past --rtol")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--rtol", type=float, default=1e-5)
    c.add_argument("--plot", help="also draw both curves and their difference to this PNG")
    args = p.parse_args(argv)
    a, b = read_jsonl(args.a), read_jsonl(args.b)
    rows = compare(a, b)
    if not rows:
        print(f"error: '{args.a}' and '{args.b}' share no steps; compare runs of the same steps.")
        return 2
    print(format_table(rows))
    worst = max(rows, key=lambda r: r["rel"])
    ok = worst["rel"] <= args.rtol
    print(f"\n{len(rows)} steps compared; max rel diff {worst['rel']:.2e} at step {worst['step']} "
          f"(tolerance {args.rtol:.0e}): {'PASS' if ok else 'FAIL'}")
    if args.plot:
        from .plots import parity_curves
        parity_curves(a, b, args.plot, names=(Path(args.a).stem, Path(args.b).stem))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
