"""Two "machines" on one host: each launcher started twice, node ranks 0 and 1, over 127.0.0.1 (gloo, CPU), against
the single-process run; two machines given the same node rank both stop within the timeout."""
import pytest

from conftest import PARITY_STEPS as STEPS
from conftest import assert_parity, parity_flags
from dit_core.multinode import run_nodes
from dit_core.parity import read_jsonl

CASES = {"torchrun-c10d": ("launchers/ddp.py", []), "torchrun-static": ("launchers/ddp.py", []),
         "deepspeed": ("launchers/zero.py", ["--stage", "2"]), "accelerate": ("launchers/accelerate.py", [])}


@pytest.mark.parametrize("launcher", list(CASES))
def test_two_machines_train_the_single_process_curve(launcher, reference, tmp_path):
    script, extra = CASES[launcher]
    log = tmp_path / "log.jsonl"
    res = run_nodes(launcher, script, parity_flags() + extra + ["--results-dir", tmp_path / "r", "--log-jsonl", log],
                    workdir=tmp_path)
    assert all(rc == 0 for rc, _, _ in res), [err[-1500:] for _, _, err in res]
    rows = read_jsonl(log)
    assert_parity(reference(1)[0], rows)


# A machine that never comes, a first machine that never comes, a first rank that never joins: test_faults_launch.py


def test_two_machines_claiming_node_rank_0_both_stop_within_the_timeout(tmp_path, monkeypatch):
    # a static launch where machine 1 was also given --node-rank 0: on one host the second store cannot bind the
    # port (EADDRINUSE) and stops at once; the first waits run.dist_timeout for a second machine that never joins
    import dit_core.multinode as mn
    real = mn.command
    monkeypatch.setattr(mn, "command", lambda launcher, script, node, *a, **k: real(launcher, script, 0, *a, **k))
    res = run_nodes("torchrun-static", "launchers/ddp.py", parity_flags(2) + ["--results-dir", tmp_path / "r",
                    "--set", "run.dist_timeout=3"], timeout=120)
    # the timeout, the second torch's store waits past it ("Timed out after 4 seconds"), start-up on a loaded runner
    assert all(rc != 0 and seconds < 3 + 1 + 15 for rc, seconds, _ in res), [(rc, s) for rc, s, _ in res]
    # each ends with its own sentence: the one whose port was taken (bad input, 2), the one left waiting (1)
    (busy, busy_rc), (alone, alone_rc) = sorted((err.strip().splitlines()[-1], rc) for rc, _, err in res)
    assert busy.startswith("error: node 0 (") and "cannot host the rendezvous store: port" in busy, busy
    assert "is in use" in busy and busy_rc == 2, (busy, busy_rc)
    assert alone.startswith("error: node 0 (") and "waited 3 s (run.dist_timeout)" in alone, alone
    assert "only 1 of 2 machines came" in alone and alone_rc == 1, (alone, alone_rc)
    assert not any("Traceback" in err for _, _, err in res), [err[-2000:] for _, _, err in res]


def test_the_slurm_script_starts_one_torchrun_agent_per_node():
    import os
    import subprocess
    env = dict(os.environ, DRY_RUN="1", SLURM_JOB_NUM_NODES="2", GPUS_PER_NODE="8", SLURM_JOB_ID="42")
    r = subprocess.run(["bash", "launchers/slurm/train.sbatch"], capture_output=True, text=True, env=env,
                       cwd=str(__import__("conftest").ROOT))
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    for part in ("srun python -m dit_core.multinode", "--nnodes 2", "--nproc-per-node 8", "--rdzv-backend c10d",
                 ":29500", "--rdzv-id 42", "join_timeout=600", "launchers/ddp.py"):
        assert part in cmd, (part, cmd)


def _children(pid: int) -> list[int]:
    from pathlib import Path
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _start_and_kill(tmp_path, restarts: int, kill_after_step: int):
    """torchrun (2 workers, --resume auto, a checkpoint every 5 steps); kill -9 one worker once the log reaches
    `kill_after_step`. Returns (exit code, seconds from the kill to the end, the log rows seen at the kill)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    log = tmp_path / "r" / "log.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={restarts}", str(ROOT / "launchers" / "ddp.py"),
           *parity_flags(**{"train.ckpt_every": 5}), "--results-dir", str(tmp_path / "r"), "--resume", "auto"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(read_jsonl(log)) > kill_after_step):
        time.sleep(0.05)
    seen = read_jsonl(log)
    workers = _children(p.pid)
    assert workers, "no worker found to kill"
    os.kill(workers[-1], signal.SIGKILL)
    t_kill = time.time()
    _, err = p.communicate(timeout=180)
    return p.returncode, time.time() - t_kill, seen, err


def test_an_elastic_restart_resumes_from_the_last_checkpoint_and_logs_the_same_curve(reference, tmp_path):
    rc, _, seen, err = _start_and_kill(tmp_path, restarts=1, kill_after_step=7)
    assert rc == 0, err[-2000:]
    assert "[resume auto] from" in err and "restart 1" in err, err[-2000:]
    rows = read_jsonl(tmp_path / "r" / "log.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS))            # one row per step, merged
    assert_parity(reference(1)[0], rows)
    # the steps the first attempt logged, run again after the restart: bitwise the same
    assert [r["loss"] for r in seen] == [r["loss"] for r in rows[:len(seen)]]


def test_a_killed_worker_without_restarts_ends_the_job(tmp_path):
    rc, after_kill, _, _ = _start_and_kill(tmp_path, restarts=0, kill_after_step=3)
    assert rc != 0 and after_kill < 30, (rc, after_kill)
