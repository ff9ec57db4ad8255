"""Many machines: the command each launcher needs on machine `node` of `nodes`, and two "machines" on one host.

Every launcher of the workbook spans machines with its ecosystem's own flags; nothing in the training code changes
(the ranks, the world size and the rendezvous address arrive in the environment). `command(...)` writes them out;
`run_nodes` starts one launcher process per "machine" on this host (127.0.0.1), which is how the tests and chapter
16 prove that they train the same curve as one process. On real machines run the same command on each, with the
first machine's address instead of 127.0.0.1 and a shared filesystem for --results-dir (rank 0 writes the log and
the checkpoints; under ZeRO and the per-rank engines every rank writes its own files into the same folder).

`python -m dit_core.multinode` is torchrun (the same flags, torch's own agent, run in this process) with two things
added for many machines: the rendezvous waits at most the script's own timeout (run.dist_timeout, or --timeout of
launchers/rendezvous.py) instead of torch's 600 s, and a launch that fails before the script runs (a machine that
never comes, a first machine nobody can reach, a port in use) ends with one sentence naming this machine, the
rendezvous address, the timeout and the fix, instead of torch's traceback (a rank that fails: one line naming it,
after the rank's own).

    python -m dit_core.multinode --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        --rdzv-id JOB launchers/ddp.py --config configs/mnist.yaml --set run.dist_timeout=600
"""
from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from .cli import config_from_args, launcher_parser
from .errors import os_failure, user_errors
from .parallel.dist import free_port
from .process import parser, say

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("torchrun-c10d", "torchrun-static", "deepspeed", "accelerate")
CHECK_TIMEOUT = 60.0        # launchers/rendezvous.py --timeout's default


def command(launcher: str, script: str, node: int, nodes: int, per_node: int, host: str, port: int,
            job: str = "dit", join_timeout: int | None = None, workdir: Path | None = None) -> list[str]:
    """The launch command of machine `node` (0 is the one whose address the others dial). The torchrun launches go
    through `python -m dit_core.multinode` (torchrun's flags): its rendezvous waits the script's own timeout
    unless `join_timeout` says otherwise."""
    py = [sys.executable, "-m"]
    if launcher == "torchrun-c10d":       # elastic rendezvous: node ranks are handed out by the rendezvous
        return py + ["dit_core.multinode", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
                     "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}", f"--rdzv-id={job}",
                     *([f"--rdzv-conf=join_timeout={join_timeout}"] if join_timeout else []), script]
    if launcher == "torchrun-static":     # fixed node ranks, node 0 hosts the store
        return py + ["dit_core.multinode", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
                     f"--node-rank={node}", f"--master-addr={host}", f"--master-port={port}",
                     *([f"--rdzv-conf=timeout={join_timeout}"] if join_timeout else []), script]
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
              start: list[int] | None = None, workdir: Path | None = None,
              join_timeout: int | None = None) -> list[tuple]:
    """Start machines `start` (default: all) of a `nodes`-machine job as separate launcher processes on this host;
    returns (exit code, seconds, stderr) per started machine. A machine that never comes is a rendezvous that waits
    (torchrun: the script's run.dist_timeout, or `join_timeout` seconds)."""
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


# ---------------------------------------------------------------- python -m dit_core.multinode: torchrun, bounded

def seconds(text: str) -> float:
    """argparse type of a timeout: a finite number of seconds above 0 (0 or less would make every wait fail at once,
    or never time out)."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 (e.g. {CHECK_TIMEOUT:g}, the "
                                         f"default), not '{text}'")
    return value


class LaunchFailed(Exception):
    """A multi-machine launch that cannot go on; `code` is the exit code (1: a machine missing, 2: bad input)."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


class Launch:
    """What one machine's launch waits for, and where: the rendezvous address, this machine's name, the timeout and
    the flag that sets it (for the sentence), filled into torchrun's --rdzv-conf where the user did not set it."""

    def __init__(self, args):
        from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config, parse_rendezvous_endpoint
        from torch.distributed.run import parse_min_max_nnodes
        self.args = args
        self.static = args.rdzv_backend == "static"
        self.fewest, self.nodes = parse_min_max_nnodes(args.nnodes)     # an elastic job starts with the fewest
        conf = _parse_rendezvous_config(args.rdzv_conf)
        if self.static:
            self.host, self.port = args.master_addr, args.master_port or 29500
            self.me = f"node {args.node_rank} ({socket.gethostname()})"
        else:
            self.host, self.port = parse_rendezvous_endpoint(args.rdzv_endpoint, 29400)
            self.me = f"this machine ({socket.gethostname()})"
        own = "timeout" if self.static else "join_timeout"
        if own in conf:                                   # the user's own rendezvous timeout wins
            self.limit, self.knob, self.how = float(conf[own]), own, f"--rdzv-conf {own}=SECONDS"
        else:
            self.limit, self.knob, self.how = script_timeout(args.training_script, args.training_script_args)
        # torch reads these as whole seconds: c10d's join (every machine arrives) and read (reaching the store and
        # each store operation), the static store's connect and its wait for the other machines
        for key in ("join_timeout", "read_timeout", "timeout"):
            conf.setdefault(key, str(math.ceil(self.limit)))
        args.rdzv_conf = ",".join(f"{k}={v}" for k, v in conf.items())
        self.is_host = conf.get("is_host")

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def within(self) -> str:
        return f"{self.limit:g} s ({self.knob})"

    def dials_another_machine(self) -> bool:
        """Whether this machine is a client of a store that another machine hosts (and so can wait for it)."""
        if self.nodes <= 1 or self.args.standalone:
            return False
        if self.static:
            return self.args.node_rank != 0
        if self.is_host is not None:
            return self.is_host.lower() in ("0", "false", "no", "n", "off")
        try:                                              # torch's own test of "this machine hosts the store"
            from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
        except ImportError:                               # (private): then torch's read_timeout bounds the wait
            return False
        return not _matches_machine_hostname(self.host)

    def wait_for_store(self) -> None:
        """Dial the rendezvous store until it answers, at most the timeout. torch's own client, once its connect has
        timed out, sleeps a backoff about as long again before it gives up (10.2 s at a 5 s timeout, measured), so
        the wait is bounded here instead; the store takes a connection that closes unused without a word."""
        deadline = time.monotonic() + self.limit
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=max(0.1, min(1.0, deadline -
                                                                                              time.monotonic()))):
                    return
            except socket.gaierror as e:
                raise LaunchFailed(f"{self.me} cannot resolve the rendezvous address {self.host} ({e.strerror}); "
                                   f"check {'--master-addr' if self.static else '--rdzv-endpoint'}.", 2) from None
            except OSError:                               # refused (nobody listens yet), unreachable, timed out
                if time.monotonic() >= deadline:
                    raise LaunchFailed(self.unreachable()) from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def unreachable(self) -> str:
        if self.static:
            return (f"{self.me} could not reach node 0's rendezvous store at {self.where}: nothing answered there "
                    f"within {self.within}, so it stops; start node 0 (--node-rank 0) on {self.host}, check "
                    f"--master-addr and --master-port, or give it longer ({self.how}) if node 0 starts later.")
        return (f"{self.me} could not reach the rendezvous store at {self.where}: nothing answered there within "
                f"{self.within}, so it stops; start the machine at {self.host} too, check --rdzv-endpoint, or "
                f"give it longer ({self.how}) if it starts later.")

    def sentence(self, e: BaseException) -> tuple[str, int] | None:
        """The sentence and exit code for torch's failure `e` of this launch; None for one this does not know."""
        from torch.distributed import DistNetworkError, DistStoreError
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.elastic.rendezvous.api import (RendezvousClosedError, RendezvousConnectionError,
                                                              RendezvousTimeoutError)
        text = f"{e} {e.__cause__ or ''}"
        if isinstance(e, ChildFailedError):
            rank, failure = e.get_first_failure()
            how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                   else f"exited with code {failure.exitcode}")
            return (f"{self.me}: rank {rank} (local rank {failure.local_rank}) {how}, so this machine's ranks were "
                    f"stopped; that rank's own message is above.", failure.exitcode if failure.exitcode in (1, 2)
                    else 1)
        if isinstance(e, RendezvousTimeoutError):
            return (f"{self.me} waited {self.within} at the rendezvous {self.where} for {self.fewest} machines and "
                    f"not all came (RendezvousTimeoutError), so it stops; start the same command on every machine "
                    f"(each must reach {self.where}), or give them longer ({self.how}) if they start later.", 1)
        if isinstance(e, RendezvousClosedError):
            return (f"{self.me}: the rendezvous {self.where} (--rdzv-id {self.args.rdzv_id}) was closed by another "
                    f"machine (its job ended), so it stops; give a new --rdzv-id to start a new job.", 1)
        if "EADDRINUSE" in text or "address already in use" in text:
            return (f"{self.me} cannot host the rendezvous store: port {self.port} on {self.host} is in use (another "
                    f"job, or two machines given --node-rank 0), so it stops; choose another "
                    f"{'--master-port' if self.static else '--rdzv-endpoint port'}, or check the node ranks.", 2)
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        if isinstance(e, DistStoreError) and joined:      # the static store on node 0, the others never came
            others = "--node-rank 1" if self.nodes == 2 else f"--node-rank 1 to {self.nodes - 1}"
            return (f"{self.me} waited {self.within} at {self.where} and only {joined[1]} of {self.nodes} machines "
                    f"came, so it stops; start the others ({others} --master-addr {self.host} --master-port "
                    f"{self.port}) and check that they reach it, or give them longer ({self.how}) if they start "
                    f"later.", 1)
        if isinstance(e, (DistNetworkError, RendezvousConnectionError)):
            return self.unreachable(), 1
        return None


def script_timeout(script: str, script_args: list[str]) -> tuple[float, str, str]:
    """The timeout the script itself will use, its name and how to set it: launchers/rendezvous.py's --timeout, any
    other launcher's run.dist_timeout (its --config and --set, as the launcher reads them); torch's 600 s for a
    script that is not one of the workbook's launchers."""
    name = Path(script).name
    if name == "rendezvous.py":
        p = parser(prog=name, add_help=False)
        p.add_argument("--timeout", type=seconds, default=CHECK_TIMEOUT)
        return p.parse_known_args(script_args)[0].timeout, "--timeout", "--timeout SECONDS"
    if not (ROOT / "launchers" / name).is_file():
        return 600.0, "torch's default", "--rdzv-conf join_timeout=SECONDS, or timeout=SECONDS when static"
    p = launcher_parser("")
    p.prog = name
    cfg = config_from_args(p.parse_known_args(script_args)[0])
    return cfg.run.dist_timeout, "run.dist_timeout", "--set run.dist_timeout=SECONDS"


def main(argv: list[str] | None = None) -> None:
    # torch's C++ store logs each failed connect with a C++ stack; the sentence below says what happened. Quiet for
    # this agent only: the level is read when torch loads, and the ranks it starts get the environment as it was.
    quiet = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    from torch.distributed import run as torchrun
    if quiet:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)

    def stop(msg: str, code: int):
        say(f"error: {msg}")
        sys.exit(code)

    try:
        launch = Launch(args)            # the script's own timeout: a bad config or --timeout stops here, at once
    except user_errors() as e:
        stop(str(e), 2)
    except OSError as e:
        stop(os_failure(e), 2)
    try:
        if launch.dials_another_machine():
            launch.wait_for_store()
        torchrun.run(args)
    except LaunchFailed as e:
        stop(str(e), e.code)
    except Exception as e:
        known = launch.sentence(e)
        if known is None:
            raise
        stop(*known)


if __name__ == "__main__":
    main()
