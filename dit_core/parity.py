"""The parity harness: run a launcher as real processes and read its log; compare two logs.

    python -m dit_core.parity compare single.jsonl ddp.jsonl --rtol sum-order --plot parity.png
    python -m dit_core.parity grads single.pt ddp.pt      # two runs' --dump-grads, parameter by parameter

A comparison is `parity(a, b, rtol)`: the loss **and** the gradient norm before clipping, at every step, each within
the tolerance (a rung of LADDER). The loss alone cannot see a gradient wrong by a constant factor (under AdamW, and
while clipping acts, the update does not change); the gradient norm shows the factor at once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .logs import (LOG_KEYS, PARITY_KEYS, JsonlLogger, Verdict, compare, format_table, max_rel,  # noqa: F401
                   parity, read_jsonl)                                               # (the API)
from .cli import config_from_args, launcher_parser
from .parallel.dist import free_port
from .plots import parity_curves
from .process import parser
from .scratch import scratch_dir
from .train import train


ROOT = Path(__file__).resolve().parents[1]

# The tolerance ladder: one rule for every chapter and test, chosen by what a strategy changes in the arithmetic.
# (The relative difference to the single-process run, max over steps, of the loss and of the gradient norm.)
BITWISE = 0.0      # the same operations on the same numbers in the same order (resume, the fast path's draws)
SUM_ORDER = 1e-5   # fp32, only the order of a sum changes: a sum over 16 samples vs two sums over 8, a reduce-scatter
                   # vs an all-reduce; each step rounds ~1e-7 differently and Adam carries it on (observed <= 1e-6 in
                   # the loss and the gradient norm, chapters 04-16 and tests/, 2026-12-06)
CURVE = 5e-2       # bf16/fp16 against fp32: 8 (bf16) or 11 (fp16) significand bits (7 / 10 stored) round every
                   # matmul; the curves must follow each other, step by step they need not agree
LADDER = {"bitwise": BITWISE, "sum order (fp32)": SUM_ORDER, "curve (bf16/fp16 vs fp32)": CURVE}
RUNGS = {"bitwise": BITWISE, "sum-order": SUM_ORDER, "curve": CURVE}     # the names --rtol accepts


def rtol_arg(text: str) -> float:
    """--rtol: a rung of the ladder by name (bitwise, sum-order, curve) or a number."""
    import argparse
    if text in RUNGS:
        return RUNGS[text]
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--rtol {text!r} is neither a number >= 0 nor a rung of the ladder "
                                         f"({', '.join(RUNGS)})")
    return value


def _command(script: str, nproc: int, launcher: str, launch_args=None, module: bool = False) -> list[str]:
    """How each ecosystem starts `script` (a file of this repository, or with module=True a module)."""
    import sys

    target = [script] if module else [str(ROOT / script)]
    if launcher == "python":
        return [sys.executable, *(["-m"] if module else []), *target]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *(["-m"] if module else []), *target]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
                f"--master_port={free_port()}", *(["--module"] if module else []), *target]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={nproc}",
                f"--main_process_port={free_port()}", *(launch_args or []), *(["-m"] if module else []), *target]
    raise ValueError(f"launcher={launcher!r} is not python, torchrun, deepspeed or accelerate.")


def _run(cmd: list[str], timeout: int, env: dict | None):
    import os
    import subprocess

    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1", **(env or {}))
    r = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-4:])} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return r


def run_launcher(script: str, args: list[str], nproc: int = 1, log: str | Path | None = None,
                 launcher: str = "torchrun", timeout: int = 900, env: dict | None = None,
                 launch_args: list[str] | None = None) -> list[dict]:
    """Run a launcher (`python`, `torchrun --nproc_per_node nproc`, `deepspeed --num_gpus nproc` or
    `accelerate launch --num_processes nproc [launch_args]`) and return its JSONL log.

    Tests and notebooks use this to run the real thing: separate processes, real collectives.
    """

    log = Path(log) if log else scratch_dir("dit-log-") / "log.jsonl"
    _run(_command(script, nproc, launcher, launch_args) + [str(a) for a in args] + ["--log-jsonl", str(log)],
         timeout, env)
    return read_jsonl(log)


def run_launchers(script: str, runs: list[list[str]], nproc: int = 1, launcher: str = "torchrun",
                  timeout: int = 1800, env: dict | None = None) -> list:
    """Several runs of one launcher in one job: the same processes run `script`'s main(argv) once per
    argument list (`python -m dit_core.many`), so a table of runs pays the start-up (torch and its
    compiler stack import in ~8 s on a 2-core CPU, DeepSpeed in ~5 s more) once. Each run is the
    launcher's own code from its arguments on: its process group, strategy, loop and files.
    Returns, in order, every run's JSONL log, or the one sentence it stopped with (a str) if its
    input was bad."""
    return run_mixed([(script, r) for r in runs], nproc, launcher, timeout, env)


def run_mixed(rows: list[tuple[str, list[str]]], nproc: int = 1, launcher: str = "torchrun",
              timeout: int = 1800, env: dict | None = None) -> list:
    """`run_launchers` for rows of (launcher script, arguments) that may name different launchers (the test
    suite runs every strategy's table of 2-process runs in one job)."""
    import json


    tmp = scratch_dir("dit-many-")
    logs = [tmp / f"run{i}.jsonl" for i in range(len(rows))]
    (tmp / "runs.json").write_text(json.dumps([{"script": str(ROOT / script),
                                                "args": [str(a) for a in args] + ["--log-jsonl", str(log)]}
                                               for (script, args), log in zip(rows, logs)]))
    _run(_command("dit_core.many", nproc, launcher, module=True) + [str(tmp / "runs.json")], timeout, env)
    errors_file = tmp / "runs.json.errors"
    errors = {int(k): v for k, v in json.loads(errors_file.read_text()).items()} if errors_file.is_file() else {}
    return [errors[i] if i in errors else read_jsonl(log) for i, log in enumerate(logs)]


def run_here(script: str, runs: list[list[str]]) -> list[list[dict]]:
    """One-process runs in this process, on one thread: the config `script` (launchers/single.py) parses
    from each argument list, trained by the same `train` call, without its progress bar. Bitwise the
    numbers of `python launchers/single.py` started as its own process with OMP_NUM_THREADS=1
    (tests/test_ddp.py checks it), without a process start-up per run."""
    import torch

    if Path(script).name != "single.py":
        raise ValueError(f"run_here runs launchers/single.py, not {script}: other launchers need their processes.")
    logs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for args in runs:
            log = scratch_dir("dit-here-") / "log.jsonl"
            cfg = config_from_args(launcher_parser("").parse_args([str(a) for a in args] + ["--log-jsonl", str(log)]))
            train(cfg, quiet=True)
            logs.append(read_jsonl(log))
    finally:
        torch.set_num_threads(threads)
    return logs


def read_grads(path) -> dict:
    """The gradients a run wrote with --dump-grads (name -> tensor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; write it with a launcher's --dump-grads {path}.")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "grads" not in blob:
        raise ValueError(f"'{path}' is not a gradient dump; write it with a launcher's --dump-grads.")
    return blob["grads"]


def compare_grads(a: dict, b: dict) -> list[dict]:
    """Per parameter, in the model's order: norms, max |a - b| and the relative difference |a - b| / |a|
    (0 when both are exactly zero: adaLN-Zero leaves most first-step gradients so)."""
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))[:3]
        raise ValueError(f"the two dumps name different parameters (e.g. {only}); compare runs of one model.")
    rows = []
    for name, ga in a.items():
        gb = b[name]
        if ga.shape != gb.shape:
            raise ValueError(f"'{name}' has shape {tuple(ga.shape)} in one dump and {tuple(gb.shape)} in the other; "
                             f"compare runs of one model config.")
        na, diff = float(ga.norm()), float((ga - gb).norm())
        rows.append({"name": name, "numel": ga.numel(), "norm_a": na, "norm_b": float(gb.norm()),
                     "max_abs": float((ga - gb).abs().max()) if ga.numel() else 0.0,
                     "rel": diff / na if na > 0 else (0.0 if diff == 0 else float("inf"))})
    return rows


def format_grads(rows: list[dict], rtol: float, limit: int = 0) -> str:
    lines = [f"{'parameter':<44} {'numel':>8} {'|grad a|':>10} {'|grad b|':>10} {'max|a-b|':>10} {'rel':>9}"]
    shown = rows if not limit else [r for r in rows if r["rel"] > rtol][:limit] or rows[:limit]
    for r in shown:
        mark = "  <-- past tolerance" if r["rel"] > rtol else ""
        lines.append(f"{r['name']:<44} {r['numel']:>8} {r['norm_a']:>10.3e} {r['norm_b']:>10.3e} "
                     f"{r['max_abs']:>10.2e} {r['rel']:>9.1e}{mark}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser(prog="python -m dit_core.parity",
                                description="Compare two runs step by step: the loss and the gradient norm.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="loss and gradient norm at every step; exit 1 if either is past --rtol")
    c.add_argument("a", help="the reference log (e.g. the single process's)")
    c.add_argument("b", help="the log to check against it")
    c.add_argument("--rtol", type=rtol_arg, default=SUM_ORDER,
                   help="relative tolerance for both: a number or a rung (bitwise, sum-order: 1e-5, curve: 5e-2)")
    c.add_argument("--plot", help="also draw both runs' loss and gradient norm and their differences to this PNG")
    c.add_argument("--rows", type=int, default=0, help="print only the first ROWS steps of the table (0: all)")
    g = sub.add_parser("grads", help="per-parameter difference of two --dump-grads files; exit 1 past --rtol")
    g.add_argument("a")
    g.add_argument("b")
    g.add_argument("--rtol", type=rtol_arg, default=SUM_ORDER)
    g.add_argument("--all", action="store_true", help="every parameter, not only those past --rtol")
    args = p.parse_args(argv)
    if args.cmd == "grads":
        return _grads_main(args)
    try:
        a, b = read_jsonl(args.a), read_jsonl(args.b)
        verdict = parity(a, b, args.rtol)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    if not verdict.steps:
        print(f"error: '{args.a}' and '{args.b}' share no steps; compare runs of the same steps.")
        return 2
    names = _names(Path(args.a), Path(args.b))
    print(format_table(a, b, *names, limit=args.rows or None))
    print(f"\n{verdict}")
    if args.plot:
        parity_curves(a, b, args.plot, names=names)
    return 0 if verdict.ok else 1


def _names(a: Path, b: Path) -> tuple[str, str]:
    """Column names for two logs: their file names, or their folders' where the names are the same (run/log.jsonl)."""
    if a.stem != b.stem:
        return a.stem, b.stem
    return (a.parent.name or a.stem, b.parent.name or b.stem) if a.parent.name != b.parent.name else ("A", "B")


def _grads_main(args) -> int:
    try:
        rows = compare_grads(read_grads(args.a), read_grads(args.b))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    bad = [r for r in rows if r["rel"] > args.rtol]
    print(format_grads(rows, args.rtol, limit=0 if args.all else 12))
    zero = sum(r["norm_a"] == 0 and r["norm_b"] == 0 for r in rows)
    print(f"\n{len(rows)} parameters compared ({zero} with a zero gradient in both); "
          f"{len(bad)} past relative difference {args.rtol:.0e}"
          + (f"; the first, in the model's order: {bad[0]['name']} ({bad[0]['rel']:.1e})" if bad else "")
          + f": {'FAIL' if bad else 'PASS'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
