"""Many machines: the command each launcher needs on machine `node` of `nodes`, and two "machines" on one host.

Every launcher of the workbook spans machines with its ecosystem's own flags; nothing in the training code changes
(the ranks, the world size and the rendezvous address arrive in the environment). `commands(...)` writes them out;
`run_nodes` starts one launcher process per "machine" on this host (127.0.0.1), which is how the tests and chapter
16 prove that they train the same curve as one process. On real machines run the same command on each, with the
first machine's address instead of 127.0.0.1 and a shared filesystem for --results-dir (rank 0 writes the log and
the checkpoints; under ZeRO and the per-rank engines every rank writes its own files into the same folder).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("torchrun-c10d", "torchrun-static", "deepspeed", "accelerate")


def command(launcher: str, script: str, node: int, nodes: int, per_node: int, host: str, port: int,
            job: str = "dit", join_timeout: int = 60, workdir: Path | None = None) -> list[str]:
    """The launch command of machine `node` (0 is the one whose address the others dial)."""
    py = [sys.executable, "-m"]
    if launcher == "torchrun-c10d":       # elastic rendezvous: node ranks are handed out by the rendezvous
        return py + ["torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
                     "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}", f"--rdzv-id={job}",
                     f"--rdzv-conf=join_timeout={join_timeout}", script]
    if launcher == "torchrun-static":     # fixed node ranks, node 0 hosts the store
        return py + ["torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
                     f"--node-rank={node}", f"--master-addr={host}", f"--master-port={port}",
                     f"--rdzv-conf=timeout={join_timeout}", script]
    if launcher == "deepspeed":           # no ssh: one launch per machine, the machines listed in a hostfile
        hostfile = Path(workdir or ".") / "hostfile"
        hostfile.write_text("".join(f"node{i} slots={per_node}\n" for i in range(nodes)))
        return py + ["deepspeed.launcher.runner", f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node}",
                     f"--master_addr={host}", f"--master_port={port}", script]
    if launcher == "accelerate":
        return py + ["accelerate.commands.launch", "--multi_gpu", f"--num_machines={nodes}", f"--machine_rank={node}",
                     f"--num_processes={nodes * per_node}", f"--main_process_ip={host}", f"--main_process_port={port}",
                     script]
    raise ValueError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}.")


def run_nodes(launcher: str, script: str, args: list[str], nodes: int = 2, per_node: int = 1, timeout: int = 300,
              start: list[int] | None = None, workdir: Path | None = None, join_timeout: int = 60) -> list[tuple]:
    """Start machines `start` (default: all) of a `nodes`-machine job as separate launcher processes on this host;
    returns (exit code, seconds, stderr) per started machine. A machine that never comes is a rendezvous that waits."""
    from .parallel.dist import free_port
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    t0 = time.perf_counter()
    for node in (range(nodes) if start is None else start):
        cmd = command(launcher, str(ROOT / script), node, nodes, per_node, "127.0.0.1", port,
                      workdir=workdir, join_timeout=join_timeout) + [str(a) for a in args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            err += f"\n[run_nodes] killed after {timeout} s"
        out.append((p.returncode, time.perf_counter() - t0, err))
    return out
