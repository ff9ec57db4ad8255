"""The fault bank: bad input, crashes, two runs on one folder, a stuck rank, a dead agent, divergence.

Every case asserts what survives (the files, the log, the other run), not only that something failed.
docs/faults.md states the guarantees these tests hold the code to.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, launcher_flags, load_launcher, parity_flags
from dit_core.checkpoint import write_manifest
from dit_core.process import run_main
from dit_core.logs import read_jsonl

SINGLE = load_launcher("single")


def single(argv, capsys):
    """launchers/single.py in this process: (exit code, stderr lines)."""
    capsys.readouterr()
    try:
        run_main(SINGLE.main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if line.strip() and not line.startswith("train:")]          # the progress bar is not a message
    return code, err


def flags(steps=4, **over):
    return launcher_flags(steps, **{"train.ckpt_every": 2, **over})


def popen(script, args, nproc=None, **kw):
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen(base + [str(ROOT / script)] + [str(a) for a in args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:          # already gone
        pass
    p.wait()


def wait_for(cond, timeout=120, every=0.005):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return False


def rows(path):
    return read_jsonl(path) if path.is_file() else []


def complete(ckpt):
    return all((ckpt / f).is_file() for f in ("training_state.json", "ema.pt", "model.pt", "optimizer.pt"))


# ---------------------------------------------------------------- bad input: one sentence, exit 2

@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished 4-step run, and checkpoints doctored from it."""
    d = tmp_path_factory.mktemp("good")
    SINGLE.main([str(a) for a in flags() + ["--results-dir", d / "run"]])
    ck = d / "run" / "checkpoint-4"

    def doctored(name, edit):
        import shutil
        out = d / name / "checkpoint-4"
        shutil.copytree(ck, out)
        edit(out)
        write_manifest(out)             # as if a writer had produced it so: what each case tests is past the manifest
        return out

    def nan_weights(p):
        sd = torch.load(p / "model.pt")
        next(iter(sd.values())).view(-1)[0] = float("nan")
        torch.save(sd, p / "model.pt")

    def state(**change):
        def edit(p):
            s = json.loads((p / "training_state.json").read_text())
            for k, v in change.items():
                if v is None:
                    s.pop(k)
                else:
                    s[k] = v
            (p / "training_state.json").write_text(json.dumps(s))
        return edit

    def deepspeed(p):
        state(engine="deepspeed", zero_stage=2, world_size=2)(p)
        (p / "ds").mkdir()

    def flipped(name, file):
        """The whole run folder copied, one bit of one file of its checkpoint-4 flipped (a disk's silent error)."""
        import shutil
        run = d / name / "run"
        shutil.copytree(d / "run", run)
        target = run / "checkpoint-4" / file
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
        return run / "checkpoint-4"

    return {"dir": d, "ckpt": ck, "nan": doctored("nan", nan_weights), "nostep": doctored("nostep", state(step=None)),
            "ds": doctored("ds", deepspeed), "acc": doctored("acc", state(engine="accelerate")),
            "tp": doctored("tp", state(tp_degree=2, world_size=4)),
            **{f"flip {f}": flipped(f"flip-{f}", f) for f in ("model.pt", "optimizer.pt", "ema.pt",
                                                              "training_state.json")}}


BAD = {  # case -> (extra argv (callable of the good_run fixture and a tmp folder), words the sentence holds)
    "steps inf": (lambda g, t: ["--set", "train.warmup_steps=inf"], ["train.warmup_steps=", "not finite"]),
    "seed -1": (lambda g, t: ["--seed", "-1"], ["train.seed=-1", "must be in [0"]),
    "lr true": (lambda g, t: ["--set", "train.lr=true"], ["train.lr=True", "not a number"]),
    "3 channels": (lambda g, t: ["--set", "model.in_channels=3"], ["model.in_channels=3", "does not fit the data"]),
    "11 classes": (lambda g, t: ["--set", "model.num_classes=11"], ["model.num_classes=11", "use 10"]),
    "empty mlp": (lambda g, t: ["--set", "model.mlp_ratio=0.001"], ["model.mlp_ratio=0.001", "0 hidden units"]),
    "subset too big": (lambda g, t: ["--set", "train.train_subset=70000"], ["train.train_subset=70000", "60000"]),
    "bad flag value": (lambda g, t: ["--max-steps", "many"], ["--max-steps", "invalid int value"]),
    "unknown key": (lambda g, t: ["--set", "train.lrr=1"], ["train.lrr", "valid keys"]),
    "missing config": (lambda g, t: ["--config", t / "nope.yaml"], ["nope.yaml", "does not exist"]),
    "results dir is a file": (lambda g, t: ["--results-dir", (t / "f").write_text("x") and t / "f"], ["is a file"]),
    "log is a folder": (lambda g, t: ["--log-jsonl", t], ["is a folder"]),
    "resume missing": (lambda g, t: ["--resume", t / "checkpoint-9"], ["not a folder"]),
    "resume without step": (lambda g, t: ["--resume", g["nostep"]], ["no valid 'step'"]),
    "resume nan weights": (lambda g, t: ["--resume", g["nan"]], ["non-finite weights", "diverged"]),
    "resume deepspeed": (lambda g, t: ["--resume", g["ds"]], ["deepspeed run", "launchers/zero.py",
                                                              "dit_core.parallel.zero convert"]),
    "resume accelerate": (lambda g, t: ["--resume", g["acc"]], ["accelerate run", "launchers/accelerate.py"]),
    "resume tensor parallel": (lambda g, t: ["--resume", g["tp"]], ["tensor-parallel run", "--tp-degree 2"]),
    "resume other seed": (lambda g, t: ["--resume", g["ckpt"], "--seed", "7"], ["train.seed=0", "asks for 7"]),
    "resume other batch": (lambda g, t: ["--resume", g["ckpt"], "--global-batch-size", "32"],
                           ["train.global_batch_size=16", "asks for 32"]),
    "resume other timesteps": (lambda g, t: ["--resume", g["ckpt"], "--set", "diffusion.timesteps=500"],
                               ["diffusion.timesteps=1000"]),
    "resume past the end": (lambda g, t: ["--resume", g["ckpt"], "--max-steps", "2"], ["past train.max_steps"]),
    # one flipped bit (today's disks and copies do it silently): refused by name, pointing at the checkpoint before
    **{f"resume with a bit flipped in {f}": (lambda g, t, f=f: ["--resume", g[f"flip {f}"]],
                                             [f"{f}' is not the file written with this checkpoint",
                                              "sha256", "checkpoint-2'"])
       for f in ("model.pt", "optimizer.pt", "ema.pt", "training_state.json")},
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_leaves_nothing(case, good_run, tmp_path, capsys):
    extra, words = BAD[case]
    argv = flags(6) + ["--results-dir", tmp_path / "out"] + extra(good_run, tmp_path)
    before = sorted(p.name for p in good_run["ckpt"].iterdir())
    code, err = single(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w in err[0], (w, err[0])
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"]   # nothing written
    assert sorted(p.name for p in good_run["ckpt"].iterdir()) == before              # the source untouched


def test_every_reader_verifies_the_manifest(good_run, capsys):
    """evaluate and export load through model_from_checkpoint, convert through read_training_state: all verify; and
    `python -m dit_core.checkpoint verify` says which file changed, or that all match."""
    from dit_core.checkpoint import CheckpointError, model_from_checkpoint
    from dit_core.checkpoint import main as checkpoint_cli
    with pytest.raises(CheckpointError, match=r"ema.pt' is not the file written with this checkpoint.*checkpoint-2'"):
        model_from_checkpoint(good_run["flip ema.pt"])
    capsys.readouterr()
    assert checkpoint_cli(["verify", str(good_run["ckpt"])]) == 0
    assert "all 4 files match the sha256 recorded when it was written" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        checkpoint_cli(["verify", str(good_run["flip model.pt"])])
    assert e.value.code == 2 and "model.pt' is not the file written" in capsys.readouterr().err


CLI_BAD = {  # the other command lines: module, argv (callable of good_run and a tmp folder), words of the sentence
    "export: folder as output": ("dit_core.export", lambda g, t: [g["ckpt"], t], ["is a folder", "give a file path"]),
    "export: not .onnx": ("dit_core.export", lambda g, t: [g["ckpt"], t / "m.txt"], ["should end in .onnx"]),
    "export: grid nowhere": ("dit_core.export", lambda g, t: [g["ckpt"], t / "m.onnx", "--grid", t / "no" / "g.png"],
                             ["--grid", "does not exist"]),
    "export: flipped ema": ("dit_core.export", lambda g, t: [g["flip ema.pt"], t / "m.onnx"],
                            ["ema.pt' is not the file written with this checkpoint"]),
    "memory: batch 0": ("dit_core.memory", lambda g, t: ["--batch", "0", "--out", t / "m.json"], ["--batch 0"]),
    "memory: out nowhere": ("dit_core.memory", lambda g, t: ["--out", t / "no" / "m.json"], ["--out", "does not exist"]),
    "memory: a GPU asked for": ("dit_core.memory", lambda g, t: ["--device", "cuda", "--out", t / "m.json"],
                                ["no CUDA GPU is visible", "--device cpu"]),
    "memory: bad override": ("dit_core.memory", lambda g, t: ["--set", "model.depth=x", "--out", t / "m.json"],
                             ["model.depth='x'", "not an integer"]),
    "checkpoint verify: not a folder": ("dit_core.checkpoint", lambda g, t: ["verify", t / "nope"], ["not a folder"]),
}


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_other_command_lines_refuse_bad_input_in_one_sentence(case, good_run, tmp_path, capsys):
    import importlib
    module, argv, words = CLI_BAD[case]
    main = importlib.import_module(module).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(a) for a in argv(good_run, tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not [p for p in tmp_path.iterdir()], "nothing written"


def test_memory_on_the_cpu_counts_instead_of_dying(tmp_path, capsys):
    """`python -m dit_core.memory` on a machine without a GPU counts the saved activations per recomputation mode."""
    from dit_core.memory import main as memory_main
    out = tmp_path / "m.json"
    memory_main(["--config", "configs/tiny.yaml", "--set", "model.depth=2", "--set", "model.hidden_size=32",
                 "--batch", "4", "--device", "cpu", "--out", str(out)])
    rep = json.loads(out.read_text())
    saved = {(r["recompute"], r["blocks"]): r["saved_bytes"] for r in rep["rows"]}
    assert rep["device"].startswith("cpu") and saved[("none", 0)] > saved[("full", 1)] > saved[("full", 2)] > 0


def test_config_mistakes_are_one_sentence(tmp_path, capsys):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(bytes(range(256)))
    for argv, want in ((["--config", binary], "is not a text file"),
                       (["--max-steps", "5", "--set", "train.max_steps=abc"], "train.max_steps='abc' (override) is not an"),
                       (["--set", "run.dist_timeout=0"], "e.g. the default (--set run.dist_timeout=300.0)")):
        code, err = single(flags(2) + ["--results-dir", tmp_path / "r"] + argv, capsys)
        assert code == 2 and len(err) == 1 and want in err[0], err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- a results folder belongs to one run

def test_a_folder_with_a_run_refuses_a_new_one_until_overwrite(tmp_path, capsys):
    d = tmp_path / "run"
    assert single(flags() + ["--results-dir", d], capsys)[0] == 0
    log_before, ck = (d / "log.jsonl").read_text(), sorted(p.name for p in d.iterdir())
    code, err = single(flags(6) + ["--results-dir", d, "--seed", "3"], capsys)
    assert code == 2 and "already holds another run" in err[0] and "--overwrite" in err[0]
    assert f"--resume {d / 'checkpoint-4'}" in err[0]
    assert (d / "log.jsonl").read_text() == log_before and sorted(p.name for p in d.iterdir()) == ck   # untouched
    assert single(flags(6) + ["--results-dir", d, "--seed", "3", "--overwrite"], capsys)[0] == 0
    assert [r["step"] for r in rows(d / "log.jsonl")] == list(range(6))
    assert sorted(p.name for p in d.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert json.loads((d / "checkpoint-4" / "training_state.json").read_text())["config"]["train"]["seed"] == 3


def test_resuming_an_older_checkpoint_keeps_the_future_until_overwrite(tmp_path, capsys):
    d = tmp_path / "run"
    assert single(flags(6) + ["--results-dir", d], capsys)[0] == 0
    full = rows(d / "log.jsonl")
    code, err = single(flags(6) + ["--results-dir", d, "--resume", d / "checkpoint-2"], capsys)
    assert code == 2 and "checkpoint-6, later than the resumed checkpoint-2" in err[0]
    assert rows(d / "log.jsonl") == full
    assert single(flags(6) + ["--results-dir", d, "--resume", d / "checkpoint-2", "--overwrite"], capsys)[0] == 0
    assert rows(d / "log.jsonl") == full                         # one row per step, the same numbers


def test_two_runs_on_one_folder(tmp_path):
    d = tmp_path / "run"
    first = popen("launchers/single.py", launcher_flags(400) + ["--results-dir", d])
    assert wait_for(lambda: len(rows(d / "log.jsonl")) >= 2)
    # Hold the first run still while the second starts: on a loaded machine the second's start-up (importing
    # torch) can outlast the first's 400 steps, and a finished run no longer holds its folder.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run([sys.executable, str(ROOT / "launchers/single.py"), *launcher_flags(5),
                                 "--results-dir", str(d), "--overwrite"], cwd=ROOT, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "in use by another run" in second.stderr
    assert f"pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1, second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert [r["step"] for r in rows(d / "log.jsonl")] == list(range(400))     # the first run's, whole
    assert json.loads((d / "checkpoint-400" / "training_state.json").read_text())["step"] == 400


def test_one_log_belongs_to_one_run(tmp_path, capsys):
    """Two runs given one --log-jsonl outside their folders: the second is refused while the first holds it (the log
    gets a lock of its own beside it), and after it with the first run's rows kept; --resume auto into a folder that
    holds another run's log and no checkpoint refuses too. --overwrite discards on purpose."""
    from dit_core.config import ConfigError, load_config
    from dit_core.rundir import RunFolder
    log = tmp_path / "shared" / "log.jsonl"
    cfg = {n: load_config(None, {"run.results_dir": str(tmp_path / n), "run.log_jsonl": str(log)}) for n in "ab"}
    with RunFolder(cfg["a"]):
        with pytest.raises(ConfigError, match=r"--log-jsonl '.*log.jsonl' is being written by another run \(pid "):
            RunFolder(cfg["b"]).lock()
    assert [p.name for p in (tmp_path / "b").iterdir()] == [".lock"]          # nothing written but its lock file
    code, err = single(flags(2) + ["--results-dir", tmp_path / "a", "--log-jsonl", log], capsys)
    assert code == 0 and len(rows(log)) == 2
    code, err = single(flags(2) + ["--results-dir", tmp_path / "b", "--log-jsonl", log], capsys)
    assert code == 2 and err == [f"error: --log-jsonl '{log}' already holds another run's 2 steps; give this run "
                                 f"another --log-jsonl, or pass --overwrite to discard them."], err
    assert len(rows(log)) == 2                                    # the first run's rows kept
    # --resume auto over a folder with another run's log and no checkpoint (a run that saved none)
    other = tmp_path / "other"
    code, _ = single(flags(2) + ["--results-dir", other, "--set", "run.save_final=false", "--set",
                                 "train.ckpt_every=0"], capsys)
    assert code == 0 and len(rows(other / "log.jsonl")) == 2 and not list(other.glob("checkpoint-*"))
    code, err = single(flags(2) + ["--results-dir", other, "--resume", "auto"], capsys)
    assert code == 2 and "--resume auto:" in err[-1] and "holds another run's log" in err[-1], err
    assert len(rows(other / "log.jsonl")) == 2                    # not replaced
    code, err = single(flags(2) + ["--results-dir", other, "--resume", "auto", "--overwrite"], capsys)
    assert code == 0 and [r["step"] for r in rows(other / "log.jsonl")] == [0, 1]


# ---------------------------------------------------------------- crashes: kill -9, then resume

CRASH = {"model.hidden_size": 64, "model.depth": 4, "model.num_heads": 2, "train.ckpt_every": 1}


def test_kill9_in_training_and_in_a_checkpoint_then_resume_equals_the_uninterrupted_run(tmp_path, reference):
    steps = 30
    args = parity_flags(steps, **CRASH)
    want, ref = reference(1, steps, **CRASH)               # the uninterrupted run

    d = tmp_path / "crashy"
    run = popen("launchers/single.py", args + ["--results-dir", d])          # 1: killed between checkpoints
    assert wait_for(lambda: len(rows(d / "log.jsonl")) >= 6 and not list(d.glob(".checkpoint-*")))
    kill_group(run)
    hits = 0
    for attempt in range(12):                                                # 2: killed inside a checkpoint write
        latest = max(int(p.name.split("-")[1]) for p in d.glob("checkpoint-*"))
        run = popen("launchers/single.py", args + ["--results-dir", d, "--resume", d / f"checkpoint-{latest}"])
        seen = wait_for(lambda: any(p.name != f".checkpoint-{latest}.tmp" for p in d.glob(".checkpoint-*.tmp"))
                        or run.poll() is not None, every=0.0005)
        kill_group(run)
        left = list(d.glob(".checkpoint-*.tmp"))
        hits += bool(left)
        for ck in d.glob("checkpoint-*"):
            assert complete(ck), ck                          # every visible checkpoint is whole
        if hits >= 1 and seen:
            break
    assert hits >= 1, "no kill landed inside a checkpoint write"
    latest = max(int(p.name.split("-")[1]) for p in d.glob("checkpoint-*"))
    run = popen("launchers/single.py", args + ["--results-dir", d, "--resume", d / f"checkpoint-{latest}"])
    assert run.wait(timeout=300) == 0, run.stderr.read()
    got = rows(d / "log.jsonl")
    assert [x["step"] for x in got] == list(range(steps))    # one row per step after every crash
    assert got == want                                       # and bitwise the uninterrupted run
    assert not list(d.glob(".checkpoint-*"))                 # the crash's leftovers were cleaned
    a, b = (torch.load(x / f"checkpoint-{steps}" / "ema.pt") for x in (ref, d))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_during_a_checkpoint_leaves_the_last_one_whole(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    code, err = single(flags(6) + ["--results-dir", d], capsys)
    assert code == 2 and len(err) == 1 and "the disk is full" in err[0] and "checkpoint-2 is the latest" in err[0]
    assert sorted(p.name for p in d.iterdir() if p.name != ".lock") == ["checkpoint-2", "log.jsonl"]
    assert complete(d / "checkpoint-2")


# ---------------------------------------------------------------- no diverged state saved or trained on

DIVERGE = ["--precision", "fp16", "--set", "train.lr=1e3", "--set", "train.warmup_steps=0", "--set",
           "train.ckpt_every=5"]
NO_FINITE_GUARD = ["--set", "train.diverge_loss=0", "--set", "train.diverge_weights=0"]


def nonfinite_checkpoints(d):
    bad = []
    for ck in d.glob("checkpoint-*"):
        for f in ("model.pt", "ema.pt"):
            if (ck / f).is_file() and not all(torch.isfinite(v).all() for v in torch.load(ck / f).values()):
                bad.append(f"{ck.name}/{f}")
    return bad


def test_a_rate_of_1000_stops_at_its_first_step_and_saves_nothing(tmp_path, capsys):
    """Divergence without NaN: one AdamW step at lr 1e3 moves every weight by about 1e3; the weights' norm is then
    far above diverge_weights x its initial value (measured 1.99e3 x for this model), and the run stops there."""
    for name, extra in (("fp32", DIVERGE[2:]), ("fp16", DIVERGE)):
        d = tmp_path / name
        code, err = single(launcher_flags(40) + extra + ["--results-dir", d], capsys)
        assert code == 2 and len(err) == 1, err
        assert "the weights' norm grew to" in err[0] and "by step 0 (train.diverge_weights=100)" in err[0], err
        assert "lower train.lr (the rate at that step was 1e+03" in err[0] and "start again" in err[0], err
        assert len(rows(d / "log.jsonl")) == 1 and not list(d.glob("checkpoint-*"))


def test_nonfinite_is_the_last_line_with_the_finite_checks_off(tmp_path, capsys):
    d = tmp_path / "run"
    code, err = single(launcher_flags(40) + DIVERGE + NO_FINITE_GUARD + ["--results-dir", d], capsys)
    assert code == 2 and len(err) == 1
    assert "loss scaler skipped 10 steps in a row" in err[0] and "train.lr=1000" in err[0], err
    log = rows(d / "log.jsonl")
    assert len(log) < 40 and not nonfinite_checkpoints(d)
    # fp32: the first non-finite loss stops, naming the rate that step used
    code, err = single(launcher_flags(40) + DIVERGE[2:] + NO_FINITE_GUARD + ["--results-dir", tmp_path / "fp32"],
                       capsys)
    assert code == 2 and "became nan" in err[0] and "the rate at that step was" in err[0], err
    assert not nonfinite_checkpoints(tmp_path / "fp32")


def test_a_loss_far_above_its_level_stops_the_resumed_run(tmp_path, capsys):
    """The last 50 losses travel in the checkpoint, so a resume at a rate 300x higher is judged against the level
    the run had reached: its first step's loss is hundreds of times that level, and the run stops before saving."""
    d = tmp_path / "run"
    assert single(launcher_flags(30, **{"train.ckpt_every": 10}) + ["--results-dir", d], capsys)[0] == 0
    state = json.loads((d / "checkpoint-30" / "training_state.json").read_text())
    assert [s for s, _ in state["guard"]["recent_losses"]] == list(range(30))
    code, err = single(launcher_flags(60, **{"train.ckpt_every": 2, "train.lr": 1.0, "train.diverge_weights": 0})
                       + ["--results-dir", d, "--resume", d / "checkpoint-30"], capsys)
    assert code == 2 and err[-1].startswith("error: the loss was") and "x its running level" in err[-1], err
    stopped = int(err[-1].split(" at step ")[1].split(",")[0])         # 31 here: step 30's loss still looked healthy
    assert stopped >= 30 and f"resume from {d / 'checkpoint-30'}, the last written before step {stopped}." in err[-1]
    assert sorted(p.name for p in d.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_a_climb_sets_aside_the_checkpoints_written_during_it(tmp_path):
    """The guard on a loss curve written out: a level near 0.5 for 30 steps, then a climb from step 30 that passes
    10x the level at step 33. Checkpoints 30 and 32 hold weights whose losses were already climbing: renamed, and
    the sentence points at checkpoint-20."""
    from dit_core.config import load_config
    from dit_core.errors import DivergenceError
    from dit_core.guard import DivergenceGuard
    for n in (10, 20, 30, 32):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "training_state.json").write_text("{}")
    guard = DivergenceGuard(load_config("configs/tiny.yaml"), tmp_path)
    curve = [0.5 + 0.05 * ((7 * i) % 5 - 2) for i in range(30)] + [1.2, 2.0, 3.0, 6.0]
    with pytest.raises(DivergenceError) as e:
        for step, loss in enumerate(curve):
            guard.step(step, loss, 1.0, 1e-3)
    msg = str(e.value)
    assert msg.startswith("the loss was 6 at step 33, 12 x its running level 0.5"), msg
    assert f"resume from {tmp_path / 'checkpoint-20'}, the last written before the loss began to climb at step 30" \
        in msg and "checkpoint-30, checkpoint-32, written after it, are renamed diverged-checkpoint-N" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20",
                                                          "diverged-checkpoint-30", "diverged-checkpoint-32"]
    # the same curve, one step short of the trigger: nothing is judged diverged, nothing renamed
    guard = DivergenceGuard(load_config("configs/tiny.yaml"), tmp_path)
    for step, loss in enumerate(curve[:-1]):
        guard.step(step, loss, 1.0, 1e-3)


def test_a_checkpoint_far_from_a_healthy_norm_is_refused(tmp_path, capsys):
    """What happened before this guard: lr 1e3 wrote finite checkpoints whose weights were thousands of times a
    healthy run's, and a resume trained on from them. Such a checkpoint (made here with the guards off) is now
    refused before a step."""
    d = tmp_path / "bad"
    assert single(launcher_flags(2) + DIVERGE[2:4] + DIVERGE[4:6] + NO_FINITE_GUARD + ["--results-dir", d],
                  capsys)[0] == 0
    code, err = single(launcher_flags(4) + ["--results-dir", d, "--resume", d / "checkpoint-2"], capsys)
    assert code == 2 and len(err) == 1 and "holds weights whose norm is" in err[0], err
    assert "x a freshly initialised model's (train.diverge_weights=100" in err[0] and "had diverged" in err[0], err
    assert len(rows(d / "log.jsonl")) == 2          # nothing trained, nothing truncated


def test_nan_after_resuming_at_the_same_rate_blames_the_checkpoint(tmp_path, capsys):
    """A checkpoint whose optimizer state holds a NaN (a legacy folder without a manifest, damaged): the weights go
    NaN at the first step after the resume, at the rate the run trained with. The learning rate is not blamed."""
    d = tmp_path / "run"
    assert single(flags(4) + ["--results-dir", d], capsys)[0] == 0
    ck = d / "checkpoint-2"
    opt = torch.load(ck / "optimizer.pt")
    first = next(iter(opt["optimizer"]["state"].values()))
    first["exp_avg"].view(-1)[0] = float("nan")
    torch.save(opt, ck / "optimizer.pt")
    (ck / "manifest.json").unlink()
    code, err = single(flags(4) + ["--results-dir", d, "--resume", ck, "--overwrite"], capsys)
    assert code == 2 and "first step after resuming from" in err[-1] and "checkpoint (its weights or optimizer " \
        "state) is the likely cause, not the learning rate" in err[-1], err
    assert "lower train.lr" not in err[-1]
    # the same checkpoint resumed at another rate: now the rate is as likely a cause, and the sentence names it
    code, err = single(flags(4, **{"train.lr": 2e-3}) + ["--results-dir", d, "--resume", ck], capsys)
    assert code == 2 and "lower train.lr (the rate at that step was" in err[-1], err


def test_nonfinite_training_images_are_refused_as_data(tmp_path):
    from dit_core.config import load_config
    from dit_core.data import MNIST, DataError
    from dit_core.train import train
    images = torch.zeros(64, 28, 28)
    images[37, 3, 4] = float("nan")
    cfg = load_config("configs/tiny.yaml", {"run.results_dir": str(tmp_path), "run.device": "cpu",
                                            "train.max_steps": 1, "train.tensorboard": False})
    with pytest.raises(DataError, match=r"1 of the 64 training images hold non-finite values \(the first is "
                                        r"image 37\): the data are damaged, not the run"):
        train(cfg, data=MNIST(images, torch.zeros(64, dtype=torch.long)), quiet=True)
    assert not (tmp_path / "log.jsonl").exists()


def test_fp16_divergence_under_accelerate(tmp_path):
    # Accelerate's own loop runs the same guard: the weights' norm stops lr 1e3 at its first step
    r = popen("launchers/accelerate.py", launcher_flags(40) + DIVERGE + ["--results-dir", tmp_path / "norm"])
    out, err = r.communicate(timeout=300)
    assert r.returncode == 2 and err.count("error:") == 1 and "the weights' norm grew to" in err, err[-2000:]
    assert not list((tmp_path / "norm").glob("checkpoint-*"))
    d = tmp_path / "acc"
    r = popen("launchers/accelerate.py", launcher_flags(40) + DIVERGE + NO_FINITE_GUARD + ["--results-dir", d])
    out, err = r.communicate(timeout=300)
    # Accelerate's fp16 on a CPU has no loss scaler to skip steps: the weight check is what stops it
    assert r.returncode == 2 and err.count("error:") == 1, err[-2000:]
    assert "loss scaler skipped" in err or "weights became non-finite" in err, err[-2000:]
    assert not nonfinite_checkpoints(d)


def test_resume_takes_the_command_lines_schedule_and_says_so(tmp_path, capsys):
    d = tmp_path / "run"
    assert single(flags(4) + ["--results-dir", d], capsys)[0] == 0
    code, err = single(flags(6, **{"train.lr": 5e-4}) + ["--results-dir", d, "--resume", d / "checkpoint-4"], capsys)
    assert code == 0
    assert any("train.lr 0.001 -> 0.0005" in e and "train.max_steps 4 -> 6" in e for e in err), err
    from dit_core.engine import lr_factor
    t = json.loads((d / "checkpoint-6" / "training_state.json").read_text())["config"]["train"]
    log = rows(d / "log.jsonl")
    assert [r["step"] for r in log] == list(range(6))
    assert log[4]["lr"] == 5e-4 * lr_factor(4, t["warmup_steps"], 6, t["min_lr_ratio"])   # recomputed, exactly


# ---------------------------------------------------------------- no job hangs

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"       # a zombie has stopped
    except OSError:
        return False


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def stop_and_wait(job, worker: int, limit: float) -> tuple[float, str]:
    """SIGSTOP one worker of `job`, wait for the job to end (at most `limit` s, then kill it): (seconds it took after
    the stop, the job's stderr)."""
    os.kill(worker, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        job.wait(timeout=limit)
    finally:
        kill_group(job)
    return time.monotonic() - t0, job.stderr.read()


@pytest.mark.parametrize("script", ["launchers/ddp.py", "launchers/pipeline.py"])
def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path, script):
    """DDP waits in a collective, the pipeline in a point-to-point receive: both are bounded."""
    d = tmp_path / "run"
    job = popen(script, launcher_flags(100000) + ["--results-dir", d, "--set", "run.dist_timeout=5"], nproc=2)
    assert wait_for(lambda: len(rows(d / "log.jsonl")) >= 3)
    workers = children(job.pid)
    assert len(workers) == 2
    took, err = stop_and_wait(job, workers[1], 60)
    assert job.returncode != 0 and "run.dist_timeout=5" in err, err[-2000:]
    assert took < 5 + 10, took                                   # the timeout plus a few seconds
    assert not [w for w in workers if alive(w)]


@pytest.mark.parametrize("script", ["launchers/ddp.py", "launchers/pipeline.py"])
def test_a_rank_that_never_joins_ends_the_job_within_the_timeout(tmp_path, script):
    """Rank 1 stopped while it starts (still importing torch), before the process group forms: rank 0 waits in the
    rendezvous for run.dist_timeout, says so in one sentence, and stops its stuck sibling, so the job ends within the
    timeout plus a few seconds (not after torchrun's 30 s grace, with a DistStoreError traceback)."""
    d = tmp_path / "run"
    job = popen(script, launcher_flags(10) + ["--results-dir", d, "--set", "run.dist_timeout=5"], nproc=2)
    assert wait_for(lambda: len(children(job.pid)) == 2, timeout=60, every=0.01)
    workers = children(job.pid)
    took, err = stop_and_wait(job, workers[1], 120)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert job.returncode != 0 and errors, err[-2000:]
    # (torchrun's agent prints its own ChildFailedError report; the ranks print one sentence, no DistStoreError)
    assert "run.dist_timeout=5" in errors[0] and "joined" in errors[0] and "DistStoreError" not in err, err[-3000:]
    assert took < 5 + 15, took        # the timeout, rank 0's start-up (importing torch) and a few seconds
    assert not [w for w in workers if alive(w)]
    assert not list(d.glob("checkpoint-*"))


def test_workers_of_a_killed_agent_stop(tmp_path):
    d = tmp_path / "ddp"
    job = popen("launchers/ddp.py", launcher_flags(100000) + ["--results-dir", d], nproc=2)
    assert wait_for(lambda: len(rows(d / "log.jsonl")) >= 3)
    workers = children(job.pid)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    stopped = wait_for(lambda: not [w for w in workers if alive(w)], timeout=10)
    for w in workers:
        if alive(w):
            os.kill(w, signal.SIGKILL)
    assert stopped, "workers trained on without their agent"
    n = len(rows(d / "log.jsonl"))
    time.sleep(1)
    assert len(rows(d / "log.jsonl")) == n                                    # nobody writes any more
