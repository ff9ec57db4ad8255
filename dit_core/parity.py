"""The parity harness: run a launcher as real processes and read its log; compare two logs.

    python -m dit_core.parity compare single.jsonl ddp.jsonl --rtol 1e-5 --plot parity.png
"""
from __future__ import annotations

from pathlib import Path

from .logs import LOG_KEYS, JsonlLogger, compare, format_table, max_rel, read_jsonl  # noqa: F401  (the API)


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
    from .config import parser
    p = parser(prog="python -m dit_core.parity",
                                description="Compare the loss logs of two runs step by step.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="per-step table and max relative difference; exit 1 past --rtol")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--rtol", type=float, default=1e-5)
    c.add_argument("--plot", help="also draw both curves and their difference to this PNG")
    args = p.parse_args(argv)
    try:
        a, b = read_jsonl(args.a), read_jsonl(args.b)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
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
