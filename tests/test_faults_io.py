"""The fault bank, part two (issue 36, item 5): what the operating system refuses and what an old or foreign checkpoint
holds, each stopped with one sentence and nothing half-written.

A full disk during a checkpoint (a real small tmpfs: one process, and FSDP's DCP on two), a legacy checkpoint (no
manifest) with a .distcp shard or a DeepSpeed partition cut short, missing or damaged (resumed on two ranks,
converted, read by one process), an ema.pt of another model size, and output paths that cannot be written (refused
before the first step). The two-rank cases are rows of the suite's 2-process job (tests/faults_io_checks.py prepares
the faults between rows). A tmpfs needs root (CI has it); without the right to mount, those cases skip.
"""
import errno
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import MICRO, ROOT, declare, job_dir, launcher_flags, load_launcher
from dit_core.checkpoint import (CheckpointError, load_ema, read_training_state, verify_checkpoint, write_error,
                                 write_failed, write_manifest, written_whole)
from dit_core.process import run_main
from faults_io_checks import mount, umount

D = job_dir() / "faults_io"
SINGLE = load_launcher("single")
CK2 = "checkpoint-2"


def every_step(steps, *extra):
    """MICRO on the CPU, a checkpoint after every step; a stuck rank ends a row within 60 s, not the job's 30 min."""
    return launcher_flags(steps, **{"train.ckpt_every": 1, "run.dist_timeout": 60}) + [str(a) for a in extra]


# The suite's 2-process job: an FSDP2 and a ZeRO-2 run to doctor, the doctoring (and the mounts), resumes of the
# doctored copies, an FSDP run onto a disk with room for one checkpoint, and output paths that cannot be written.
declare(2, "io fsdp", "launchers/fsdp.py", every_step(2, "--impl", "torch", "--results-dir", D / "fsdp"))
declare(2, "io zero", "launchers/zero.py", every_step(2, "--stage", "2", "--results-dir", D / "zero"))
declare(2, "io prepare", "tests/faults_io_checks.py", ["prepare", D])
for _name in ("cut", "missing", "damaged"):
    declare(2, f"io fsdp {_name}", "launchers/fsdp.py", every_step(4, "--impl", "torch", "--resume",
                                                                   D / f"fsdp-{_name}" / CK2,
                                                                   "--results-dir", D / f"resumed-{_name}"))
declare(2, "io zero cut", "launchers/zero.py", every_step(4, "--stage", "2", "--resume", D / "zero-cut" / CK2,
                                                          "--results-dir", D / "resumed-zero-cut"))
declare(2, "io fsdp full", "launchers/fsdp.py", every_step(3, "--impl", "torch", "--results-dir", D / "full" / "run"))
OUTPUTS = {  # row -> (launcher, its flags, the sentence's words); D is a folder, D/ro a read-only mount
    "io timeline dir": ("launchers/pipeline.py", ["--pp-degree", "2", "--timeline", D],
                        f"--timeline '{D}' is a folder"),
    "io zero report dir": ("launchers/zero.py", ["--stage", "2", "--report", D], f"--report '{D}' is a folder"),
    "io grads dir": ("launchers/ddp.py", ["--dump-grads", D], f"--dump-grads '{D}' is a folder"),
    "io report ro": ("launchers/fsdp.py", ["--report", D / "ro" / "reports" / "fsdp.json"],
                     f"--report '{D / 'ro' / 'reports' / 'fsdp.json'}' cannot be written"),
    "io grads ro": ("launchers/ddp.py", ["--dump-grads", D / "ro" / "grads" / "g.pt"],
                    f"--dump-grads '{D / 'ro' / 'grads' / 'g.pt'}' cannot be written"),
}
for _row, (_script, _flags, _) in OUTPUTS.items():
    declare(2, _row, _script, every_step(2, *_flags, "--results-dir", D / _row.replace(" ", "-")))
declare(2, "io finish", "tests/faults_io_checks.py", ["finish", D])


@pytest.fixture(scope="module")
def two(jobs):
    try:
        yield jobs(2)
    finally:
        for m in ("full", "ro"):                  # the finish row unmounts; a job that died before it may not have
            umount(D / m)


@pytest.fixture(scope="module")
def prepared(two):
    p = two["io prepare"]
    assert isinstance(p, list) and len(p) == 1, p
    return p[0]


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a folder on a tmpfs of that size, unmounted after the test."""
    made = []

    def make(size: str, name: str = "disk"):
        d = tmp_path / name
        why = mount(d, f"size={size}")
        if why:
            pytest.skip(f"no tmpfs can be mounted here ({why})")
        made.append(d)
        return d
    yield make
    for d in made:
        umount(d)


def one_sentence(main, argv, capsys) -> tuple[int, list[str]]:
    """A command-line main through run_main in this process: (exit code, stderr lines without progress bars)."""
    capsys.readouterr()
    try:
        run_main(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if line.strip() and not line.startswith("train:")]
    return code, err


# ---------------------------------------------------------------- a full disk while a checkpoint is written

def test_a_full_disk_during_a_checkpoint_is_one_sentence_and_keeps_the_last_checkpoint(small_disk):
    """launchers/single.py onto a 2 MiB tmpfs, a checkpoint (880 KiB) after every step: the third cannot be written.
    torch.save reports it as a RuntimeError of its C++ writer; the run stops with the disk-full sentence, removes the
    half-written folder, and the checkpoint before it is whole (every file as its manifest says)."""
    d = small_disk("2m") / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, str(ROOT / "launchers/single.py"), *every_step(6), "--results-dir", str(d)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    kept = sorted(int(p.name.split("-")[1]) for p in d.glob("checkpoint-*"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert kept and kept[-1] < 6, kept
    latest = d / f"checkpoint-{kept[-1]}"
    assert r.stderr.splitlines() == [
        f"error: Writing '{d / f'checkpoint-{kept[-1] + 1}'}' failed because the disk is full; its half-written files "
        f"were removed and checkpoint-{kept[-1]} is the latest complete one: free space, then resume with --resume "
        f"{latest}."], r.stderr[-3000:]
    assert not list(d.glob(".*.tmp"))
    verify_checkpoint(latest)                                   # sha256 of every file against its manifest
    assert read_training_state(latest)["step"] == kept[-1]


def test_each_librarys_report_of_a_full_disk_is_read_as_one(small_disk):
    """The ways a full disk reaches a checkpoint writer, each produced for real on a 1 MiB tmpfs: torch.save into a
    path (DeepSpeed's partitions; the OSError lost in a RuntimeError), into a Python file, DCP (FSDP: a
    CheckpointException, not an Exception) and safetensors (Accelerate's model files). Inside written_whole each
    becomes the sentence and the temporary folder is gone; any other error passes unchanged."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    disk = small_disk("1m")
    big = torch.zeros(400_000)                                  # 1.6 MB

    def torch_path(tmp):
        torch.save(big, tmp / "a.pt")

    def torch_file(tmp):
        with open(tmp / "a.pt", "wb") as f:
            torch.save(big, f)

    def dcp_save(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"w": big}, checkpoint_id=str(tmp / "dcp"), no_dist=True)

    def safetensors(tmp):
        save_file({"w": big}, str(tmp / "a.safetensors"))

    for write in (torch_path, torch_file, dcp_save, safetensors):
        tmp = disk / f".checkpoint-{write.__name__}.tmp"
        tmp.mkdir()
        try:
            write(tmp)
        except BaseException as e:                              # noqa: B036 (DCP's is a BaseException)
            assert write_error(e, tmp).errno == errno.ENOSPC, (write.__name__, repr(e))
        else:
            pytest.fail(f"{write.__name__} wrote 1.6 MB onto a 1 MiB disk")
        with pytest.raises(CheckpointError, match=r"failed because the disk is full; its half-written files were "
                                                  r"removed and this run has no complete checkpoint yet: free "
                                                  r"space, then start the run again\.$"):
            with written_whole(tmp, lambda why: write_failed(disk / "checkpoint-9", why)):
                write(tmp)
        assert not tmp.exists(), write.__name__
    tmp = disk / ".other.tmp"
    tmp.mkdir()
    with pytest.raises(KeyError):                               # not a refused write: a bug keeps its traceback
        with written_whole(tmp, lambda why: write_failed(disk / "checkpoint-9", why)):
            raise KeyError("a bug")
    assert tmp.exists()


def test_a_full_disk_during_an_fsdp_checkpoint_stops_both_ranks_with_one_sentence(two, prepared):
    """Two FSDP2 ranks onto a tmpfs with room for one checkpoint: DCP's collective save fails on both (a
    CheckpointException, a BaseException), both stop with the same sentence, the half-written folder is gone and
    checkpoint-1 is whole."""
    if prepared["full"]:
        pytest.skip(f"no tmpfs could be mounted ({prepared['full']})")
    run = D / "full" / "run"
    assert two["io fsdp full"] == (f"Writing '{run / CK2}' failed because the disk is full; its half-written files "
                                   f"were removed and checkpoint-1 is the latest complete one: free space, then "
                                   f"resume with --resume {run / 'checkpoint-1'}.")
    after = D / "full-after" / "run"                 # what the disk held, copied before it was unmounted
    assert sorted(p.name for p in after.iterdir()) == ["checkpoint-1"] + (["log.jsonl"] if (after / "log.jsonl")
                                                                          .exists() else [])
    verify_checkpoint(after / "checkpoint-1")
    assert read_training_state(after / "checkpoint-1")["step"] == 1


# ---------------------------------------------------------------- a legacy checkpoint with a shard cut short

def test_a_legacy_fsdp_checkpoint_with_a_bad_shard_stops_two_ranks_with_one_sentence(two, prepared):
    """No manifest to tell: a shard cut short or missing is named from DCP's own metadata before the collective load;
    one with its last bytes zeroed (its size right) fails inside DCP, whose CheckpointException is caught too. Each
    sentence points at the checkpoint before it."""
    cut, missing, damaged = (two[f"io fsdp {n}"] for n in ("cut", "missing", "damaged"))
    assert isinstance(cut, str) and cut.startswith(f"'{D / 'fsdp-cut' / CK2 / 'dcp' / '__1_0.distcp'}' is "
                                                   f"truncated ("), cut
    assert isinstance(missing, str) and missing.startswith(f"Checkpoint '{D / 'fsdp-missing' / CK2}' lacks the "
                                                           f"shard dcp/__0_0.distcp, which its DCP metadata lists"), \
        missing
    assert isinstance(damaged, str) and damaged.startswith(f"'{D / 'fsdp-damaged' / CK2 / 'dcp'}' cannot be read ("), \
        damaged
    assert "the checkpoint is corrupt or truncated" in damaged
    for name, msg in (("cut", cut), ("missing", missing), ("damaged", damaged)):
        assert "\n" not in msg and "Traceback" not in msg
        assert msg.endswith(f"resume from the checkpoint before it, '{D / f'fsdp-{name}' / 'checkpoint-1'}'."), msg
        assert not list((D / f"resumed-{name}").glob("checkpoint-*"))       # nothing trained


def test_one_process_and_convert_read_a_bad_legacy_fsdp_checkpoint_as_one_sentence(two, prepared, tmp_path, capsys):
    """The same folders through the one-process reader (DCP without a process group: launchers/single.py) and
    `python -m dit_core.parallel.fsdp convert`: exit 2, one line, nothing written."""
    from dit_core.parallel.fsdp import main as fsdp_cli
    code, err = one_sentence(SINGLE.main, every_step(4, "--resume", D / "fsdp-damaged" / CK2, "--results-dir",
                                                     tmp_path / "r"), capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: '{D / 'fsdp-damaged' / CK2 / 'dcp'}' cannot be read ("), err
    for name, words in (("cut", "__1_0.distcp' is truncated"), ("missing", "lacks the shard dcp/__0_0.distcp"),
                        ("damaged", "dcp' cannot be read (")):
        code, err = one_sentence(fsdp_cli, ["convert", D / f"fsdp-{name}" / CK2, tmp_path / name], capsys)
        assert code == 2 and len(err) == 1 and words in err[0], err
        assert err[0].endswith(f"'{D / f'fsdp-{name}' / 'checkpoint-1'}'."), err
        assert not list(tmp_path.glob(f"*{name}*"))


def test_a_legacy_zero_checkpoint_cut_short_or_missing_a_partition_is_one_sentence(two, prepared, tmp_path, capsys):
    """DeepSpeed, no manifest: a partition cut short is named (from its zip archive's end) before DeepSpeed reads it,
    for a resume on two ranks and for convert; a partition missing stops zero_to_fp32, whose error becomes the
    sentence."""
    from dit_core.parallel.zero import main as zero_cli
    cut = prepared["zero_cut"]
    want = f"'{cut}' is truncated (it ends before its archive's directory); the checkpoint is corrupt: resume from " \
           f"the checkpoint before it, '{D / 'zero-cut' / 'checkpoint-1'}'."
    assert two["io zero cut"] == want
    code, err = one_sentence(zero_cli, ["convert", D / "zero-cut" / CK2, tmp_path / "plain"], capsys)
    assert (code, err) == (2, [f"error: {want}"])
    gone = tmp_path / "zero-missing"
    shutil.copytree(D / "zero", gone, ignore=shutil.ignore_patterns(".lock", "log.jsonl", "manifest.json"))
    sorted((gone / CK2 / "ds").glob("*optim_states.pt"))[-1].unlink()
    code, err = one_sentence(zero_cli, ["convert", gone / CK2, tmp_path / "plain"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: DeepSpeed cannot merge the partitions in '{gone / CK2 / 'ds'}' ("), err
    assert err[0].endswith(f"the checkpoint is incomplete or corrupt: resume from the checkpoint before it, "
                           f"'{gone / 'checkpoint-1'}'."), err
    assert not (tmp_path / "plain").exists() and not (tmp_path / ".plain.tmp").exists()
    short = tmp_path / "ema-cut"                    # convert copies ema.pt without reading it: checked whole first
    shutil.copytree(D / "zero", short, ignore=shutil.ignore_patterns(".lock", "log.jsonl", "manifest.json"))
    (short / CK2 / "ema.pt").write_bytes((short / CK2 / "ema.pt").read_bytes()[:5000])
    code, err = one_sentence(zero_cli, ["convert", short / CK2, tmp_path / "plain"], capsys)
    assert (code, err) == (2, [f"error: '{short / CK2 / 'ema.pt'}' is truncated (it ends before its archive's "
                               f"directory); the checkpoint is corrupt: resume from the checkpoint before it, "
                               f"'{short / 'checkpoint-1'}'."])
    assert not (tmp_path / "plain").exists() and not (tmp_path / ".plain.tmp").exists()


# ---------------------------------------------------------------- an ema.pt of another model size

@pytest.fixture(scope="module")
def foreign_ema(tmp_path_factory):
    """A 2-step run of the MICRO DiT (hidden 32, depth 2), and copies of its checkpoint-2 whose ema.pt (or model.pt)
    comes from another model size, the manifest rewritten to match (so what is tested lies past it)."""
    from dit_core.config import load_config
    from dit_core.model import DiT
    d = tmp_path_factory.mktemp("ema")
    SINGLE.main([str(a) for a in every_step(2, "--results-dir", d / "run")])

    def copy(name, file, **model):
        out = d / name
        shutil.copytree(d / "run", out, ignore=shutil.ignore_patterns(".lock"))
        over = {**{k: v for k, v in MICRO.items() if k.startswith("model.")}, **model}
        torch.save(DiT(load_config(None, over).model).state_dict(), out / CK2 / file)
        write_manifest(out / CK2)
        return out / CK2
    return {"wide": copy("wide", "ema.pt", **{"model.hidden_size": 64}),
            "deep": copy("deep", "ema.pt", **{"model.depth": 3}),
            "shallow": copy("shallow", "ema.pt", **{"model.depth": 1}),
            "model": copy("model", "model.pt", **{"model.hidden_size": 64})}


def test_an_ema_of_another_model_size_is_one_sentence(foreign_ema, tmp_path, capsys):
    """The checker (what a resume calls), python -m dit_core.evaluate and python -m dit_core.export: the file, the
    first entry that differs with both shapes, and what to do; a model.pt of another size stops a resume the same
    way. No size-mismatch traceback."""
    from dit_core import evaluate, export
    ck = foreign_ema["wide"]
    fix = (f"; it belongs to another model, not to this checkpoint: put the checkpoint's own ema.pt back, or resume "
           f"from the checkpoint before it, '{ck.parent / 'checkpoint-1'}'.")
    wide = (f"'{ck / 'ema.pt'}' holds x_embedder.weight of shape (64, 1, 7, 7), but the model this checkpoint was "
            f"trained as has (32, 1, 7, 7){fix}")
    with pytest.raises(CheckpointError) as e:
        load_ema(ck)
    assert str(e.value) == wide
    with pytest.raises(CheckpointError, match=r"ema.pt' holds blocks\.2\.[a-z_.0-9]+, which the model this "
                                              r"checkpoint was trained as does not have \(\d+ such entries\); it "
                                              r"belongs to another model"):
        load_ema(foreign_ema["deep"])
    with pytest.raises(CheckpointError, match=r"ema.pt' has no blocks\.1\.[a-z_.0-9]+ \(this checkpoint's model has "
                                              r"\d+ entries, the file \d+\); it belongs to another model"):
        load_ema(foreign_ema["shallow"])
    assert load_ema(ck.parent.parent / "run" / CK2).keys() == torch.load(ck / "ema.pt").keys()   # a good one loads
    code, err = one_sentence(evaluate.main, ["--checkpoint", ck, "--device", "cpu", "--n-per-class", "1"], capsys)
    assert (code, err) == (2, [f"error: {wide}"])
    code, err = one_sentence(export.main, [ck, tmp_path / "dit.onnx"], capsys)
    assert (code, err) == (2, [f"error: {wide}"])
    assert not (tmp_path / "dit.onnx").exists()
    model = foreign_ema["model"]
    code, err = one_sentence(SINGLE.main, every_step(4, "--resume", model, "--results-dir", tmp_path / "r"), capsys)
    assert (code, err) == (2, [f"error: '{model / 'model.pt'}' holds x_embedder.weight of shape (64, 1, 7, 7), but "
                                f"the model this checkpoint was trained as has (32, 1, 7, 7); it belongs to another "
                                f"model, not to this checkpoint: put the checkpoint's own model.pt back, or resume "
                                f"from the checkpoint before it, '{model.parent / 'checkpoint-1'}'."])
    # the resume itself (the loop's load_ema): the EMA of another width in a checkpoint whose model.pt fits
    code, err = one_sentence(SINGLE.main, every_step(4, "--resume", ck, "--results-dir", tmp_path / "r2"), capsys)
    assert (code, err) == (2, [f"error: {wide}"])


# ---------------------------------------------------------------- output paths checked before the work starts

def test_output_paths_that_cannot_be_written_are_refused_before_the_first_step(two, prepared):
    """--timeline (pipeline), --report (FSDP, ZeRO) and --dump-grads (the loop's, here under DDP): a folder, or a
    place under a read-only mount, stops both ranks with one sentence before any step (no checkpoint-1, though every
    step would write one; the launchers' checks come before the run folder is even made)."""
    for row, (_, _, words) in OUTPUTS.items():
        if "ro" in row.split() and prepared["ro"]:
            continue                                # no read-only mount here (checked below with a skip)
        msg = two[row]
        assert isinstance(msg, str) and msg.startswith(words), (row, msg)
        assert "\n" not in msg
        folder = D / row.replace(" ", "-")
        assert not list(folder.glob("checkpoint-*")), row
        assert not folder.exists() or "grads" in row, row     # --dump-grads: checked as the run folder is taken
    assert two["io timeline dir"] == f"--timeline '{D}' is a folder; give a file path, e.g. {D / 'timeline.json'}."
    if prepared["ro"]:
        pytest.skip(f"no read-only mount ({prepared['ro']})")
    ro = D / "ro" / "reports"
    assert two["io report ro"] == (f"--report '{ro / 'fsdp.json'}' cannot be written ({prepared['ro_says']}: "
                                   f"'{ro}'); give a path in a folder you can write to.")
