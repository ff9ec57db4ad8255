"""A multi-machine launch that cannot start ends within its timeout with one sentence, and leaves no process behind.

Each "machine" is `python -m dit_core.multinode` (torchrun's flags and agent, the rendezvous bounded by the script's
own timeout) on 127.0.0.1, started with a tag in its environment that every process it starts inherits. The
timeouts are 2 s; each case ends within the timeout plus MARGIN, the start-up of the agent (python and torch
imported: about 2 s on the idle 2-core machine, up to 9.8 s measured while other test runs shared its cores), and
not before the timeout (a launch that gave up at once would pass a bound alone)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, load_launcher, parity_flags, run_py
from dit_core.parallel.dist import free_port

T = 2            # seconds: run.dist_timeout, which the launch's rendezvous waits
MARGIN = 15      # seconds: start-up of the agent (and of its rank), on a loaded runner
HOST = socket.gethostname()


def start(tag: str, flags: list[str], script: str = "launchers/ddp.py", args: list[str] | None = None, results=None):
    """One machine: python -m dit_core.multinode FLAGS SCRIPT ARGS; it and every process it starts carry `tag`."""
    args = parity_flags(2) + ["--set", f"run.dist_timeout={T}", "--results-dir", str(results)] if args is None else args
    cmd = [sys.executable, "-m", "dit_core.multinode", "--nproc-per-node=1", *flags, str(ROOT / script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DIT_LAUNCH_TEST=tag)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, t0: float) -> tuple[int, float, str]:
    _, err = p.communicate(timeout=120)
    return p.returncode, time.monotonic() - t0, err


def left(tag: str) -> list[int]:
    """Processes carrying `tag` still running (not zombies): what a launch left behind. (torch starts each rank in a
    session of its own, so the launch's process group would miss them; the environment they inherit does not.)"""
    mark = f"DIT_LAUNCH_TEST={tag}\0".encode()
    out = []
    for d in os.listdir("/proc"):
        try:
            state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
            if state != "Z" and mark in open(f"/proc/{d}/environ", "rb").read():
                out.append(int(d))
        except (OSError, IndexError):
            continue
    return out


@pytest.fixture
def tag(request):
    """A name for this test's processes; whatever still carries it afterwards is killed."""
    name = f"{os.getpid()}-{request.node.name}"
    yield name
    for suffix in ("", "-0", "-1"):
        for pid in left(name + suffix):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:                    # it ended meanwhile
                pass


def check_one_sentence(err: str, *parts: str) -> str:
    """stderr ends with the launch's one sentence, holding each of `parts`; no Python or C++ traceback before it."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    for part in parts:
        assert part in last, (part, last)
    assert "Traceback" not in err and "Exception raised from" not in err, err[-3000:]
    return last


def refusal(value: str) -> str:
    return (f"error: argument --timeout: must be a number of seconds above 0 (e.g. 60, the default), not '{value}'; "
            f"see rendezvous.py --help.")


def test_the_launch_check_refuses_a_zero_timeout():
    # before: each rank said "a collective waited longer than run.dist_timeout=0 s", then torchrun's traceback
    r = run_py(["launchers/rendezvous.py", "--timeout", "0"], timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines() == [refusal("0")], r.stderr


@pytest.mark.parametrize("value", ["-5", "abc", "nan", "inf"])
def test_the_launch_check_refuses_a_timeout_that_is_not_a_positive_number(value, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rendezvous.py"])
    with pytest.raises(SystemExit) as stop:
        load_launcher("rendezvous").main(["--timeout", value])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines() == [refusal(value)]


def test_a_two_machine_launch_refuses_the_checks_zero_timeout_before_anything_waits(tag):
    # the launch reads --timeout to bound its rendezvous: the same sentence, from the launch, before it waits
    t0 = time.monotonic()
    p = start(tag, ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"],
              "launchers/rendezvous.py", ["--timeout", "0", "--device", "cpu"])
    rc, took, err = finish(p, t0)
    assert rc == 2 and took < MARGIN, (rc, took, err[-2000:])
    assert err.splitlines() == [refusal("0")], err
    assert not left(tag)


def test_a_machine_whose_peers_never_come_ends_a_c10d_launch_within_the_timeout(tag, tmp_path):
    port = free_port()
    t0 = time.monotonic()
    p = start(tag, ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=alone"],
              results=tmp_path / "r")
    rc, took, err = finish(p, t0)
    assert rc == 1 and T <= took < T + MARGIN, (rc, took, err[-2000:])
    check_one_sentence(err, f"this machine ({HOST}) waited {T} s (run.dist_timeout) at the rendezvous "
                       f"127.0.0.1:{port} for 2 machines", "RendezvousTimeoutError", "start the same command on every "
                       "machine", "--set run.dist_timeout=SECONDS")
    assert not left(tag)
    assert not (tmp_path / "r").exists()                  # no rank started, nothing written


def test_a_node_whose_master_never_comes_ends_a_static_launch_within_the_timeout(tag, tmp_path):
    port = free_port()
    t0 = time.monotonic()
    p = start(tag, ["--nnodes=2", "--node-rank=1", "--master-addr=127.0.0.1", f"--master-port={port}"],
              results=tmp_path / "r")
    rc, took, err = finish(p, t0)
    assert rc == 1 and T <= took < T + MARGIN, (rc, took, err[-2000:])
    check_one_sentence(err, f"node 1 ({HOST}) could not reach node 0's rendezvous store at 127.0.0.1:{port}",
                       f"within {T} s (run.dist_timeout)", "start node 0 (--node-rank 0)",
                       "check --master-addr and --master-port", "--set run.dist_timeout=SECONDS")
    assert not left(tag)
    assert not (tmp_path / "r").exists()


def test_a_c10d_machine_whose_store_host_never_comes_ends_within_the_timeout(tag, tmp_path):
    # is_host=false: this machine only dials the store (as every machine but the endpoint's does on a real cluster)
    port = free_port()
    t0 = time.monotonic()
    p = start(tag, ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    "--rdzv-conf=is_host=false"], results=tmp_path / "r")
    rc, took, err = finish(p, t0)
    assert rc == 1 and T <= took < T + MARGIN, (rc, took, err[-2000:])
    check_one_sentence(err, f"this machine ({HOST}) could not reach the rendezvous store at 127.0.0.1:{port}",
                       f"within {T} s (run.dist_timeout)", "check --rdzv-endpoint")
    assert not left(tag)


def _ranks(agent: int) -> list[int]:
    """The ranks an agent started: its children with LOCAL_RANK in their environment."""
    out = []
    for d in os.listdir("/proc"):
        try:
            parent = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            if parent == agent and b"LOCAL_RANK=" in open(f"/proc/{d}/environ", "rb").read():
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_a_node_whose_master_rank_never_joins_ends_within_the_timeout(tag, tmp_path):
    """Static launch, both agents up, node 0's rank stopped while it starts: node 1's rank waits in
    init_process_group for run.dist_timeout, says so, and node 1's launch ends with its own sentence. (Node 0, whose
    rank is the stuck one, waits on it: stopping that machine's job is its owner's.)"""
    port = free_port()
    flags = ["--nnodes=2", "--master-addr=127.0.0.1", f"--master-port={port}"]
    first = start(tag + "-0", flags + ["--node-rank=0"], results=tmp_path / "r")
    second = start(tag + "-1", flags + ["--node-rank=1"], results=tmp_path / "r")
    try:
        deadline = time.monotonic() + 60
        while not _ranks(first.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        (rank0,) = _ranks(first.pid)
        os.kill(rank0, signal.SIGSTOP)
        t0 = time.monotonic()
        rc, took, err = finish(second, t0)
        assert not left(tag + "-1")                       # node 1: its agent and its rank are gone
    finally:
        for pid in left(tag + "-0"):                      # node 0: the stopped rank and the agent waiting on it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.communicate()
    assert rc == 1 and T <= took < T + MARGIN, (rc, took, err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and f"within run.dist_timeout={T} s" in errors[0], err[-3000:]
    check_one_sentence(err, f"node 1 ({HOST}): rank 1 (local rank 0) exited with code 1", "own message is above")
    assert not list((tmp_path / "r").glob("checkpoint-*"))
