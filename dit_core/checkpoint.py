"""Checkpoints: written whole or not at all, read back only if they are what they claim to be.

A checkpoint is a folder `checkpoint-<step>/` holding `training_state.json` (step, samples seen, the
engine that wrote it and the whole config), `ema.pt`, and the engine's own files (`model.pt` +
`optimizer.pt` for plain PyTorch; a `ds/` folder for DeepSpeed; `accelerate/` for Accelerate; one
optimizer file per rank for tensor parallelism). It is written into a hidden temporary folder and
renamed, so a crash leaves either the complete checkpoint or none; weights are checked finite
before they are written and again when they are read. `manifest.json` records every file's size and
sha256 at save time; every reader (resume, convert, export, evaluate: all through `read_training_state`)
verifies them first, so a file changed or corrupted on disk is refused by name, never trained on.

What a resume takes from where (docs/faults.md):
  from the checkpoint   the weights, the optimizer's moments, the loss scaler, the EMA, the step and
                        the samples seen; the model config (must equal the command line's)
  must not change       the batches of the determinism contract: train.seed, train.global_batch_size,
                        train.train_subset and every diffusion.* setting (a resume that changes one
                        stops with one sentence)
  from the command line everything else; the learning-rate schedule (train.lr, warmup_steps,
                        min_lr_ratio, max_steps) and AdamW's betas and weight_decay are recomputed
                        from it at the resumed step, and each change is printed
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .config import Config, ConfigError, ModelConfig
from .model import DiT
from .errors import CheckpointError, DataError  # noqa: F401  (CheckpointError's name stays importable here)
from .config import load_config
from .process import parser, run_main


# Who wrote a checkpoint, and the command that resumes it (training_state.json's "engine").
WRITERS = {
    "torch": "python launchers/single.py (or torchrun launchers/ddp.py / launchers/ulysses.py)",
    "deepspeed": "deepspeed launchers/zero.py --stage {zero_stage} on {world_size} processes",
    "accelerate": "accelerate launch launchers/accelerate.py",
    "tensor_parallel": "torchrun --nproc_per_node {world_size} launchers/tp.py --tp-degree {tp_degree}",
    "pipeline": "torchrun --nproc_per_node {world_size} launchers/pipeline.py --pp-degree {pp_degree}",
    "fsdp": "torchrun --nproc_per_node N launchers/fsdp.py (any N), python launchers/single.py or torchrun "
            "launchers/ddp.py",
    "expert_parallel": "torchrun --nproc_per_node {world_size} launchers/moe.py --ep-degree {ep_degree}",
    "nd": "torchrun --nproc_per_node {world_size} launchers/nd.py {nd_flags}",
}


def writer(state: dict) -> str:
    """The engine that wrote a checkpoint (tensor-parallel checkpoints say so by their layout)."""
    return "tensor_parallel" if "tp_degree" in state else state.get("engine", "torch")


def foreign(folder: Path, state: dict, reader: str) -> CheckpointError:
    """The one sentence for a checkpoint another launcher wrote: what it is and what reads it."""
    kind = writer(state)
    cmd = WRITERS.get(kind, kind).format(**{k: state.get(k, "?") for k in ("zero_stage", "world_size", "tp_degree",
                                                                            "pp_degree", "ep_degree", "nd_flags")})
    extra = {"deepspeed": f"; python -m dit_core.parallel.zero convert {folder} {folder}-plain makes plain weights",
             "accelerate": "; its model.pt and ema.pt are plain weights that python -m dit_core.evaluate reads",
             "tensor_parallel": "; its model.pt and ema.pt are whole weights that python -m dit_core.evaluate reads",
             "pipeline": "; its model.pt and ema.pt are whole weights that python -m dit_core.evaluate reads",
             "expert_parallel": "; its model.pt and ema.pt are whole weights that python -m dit_core.evaluate reads",
             "nd": "; its model.pt and ema.pt are whole weights that python -m dit_core.evaluate reads",
             "fsdp": f"; python -m dit_core.parallel.fsdp convert {folder} {folder}-plain writes plain weights",
             }.get(kind, "")
    who = {"fsdp": "an FSDP", "accelerate": "an accelerate"}.get(kind, f"a {kind.replace('_', '-')}")
    return CheckpointError(f"Checkpoint '{folder}' was written by {who} run, which {reader} "
                           f"cannot resume; resume it with {cmd}{extra}.")


# ---------------------------------------------------------------- the manifest: every file's sha256

MANIFEST = "manifest.json"
_VERIFIED: set = set()           # (folder, every listed file's size and mtime): a resume reads the state several times


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file, read in 8 MiB pieces (a DiT-XL/2 optimizer file is GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file below `folder` (the engine's, each rank's, DeepSpeed's and DCP's too) with its size and
    sha256, as `manifest.json`. Called on the finished temporary folder, just before the rename."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
               for p in files}
    (folder / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": entries}, indent=1))


def resume_instead(folder: Path) -> str:
    """What to do instead of reading a bad checkpoint: the one before it, where there is one."""
    tail = folder.name.split("-", 1)[-1]
    step = int(tail) if tail.isdigit() else None
    earlier = [s for s in checkpoint_steps(folder.parent) if step is None or s < step]
    if earlier:
        return f"resume from the checkpoint before it, '{folder.parent / f'checkpoint-{earlier[-1]}'}'"
    return f"no earlier checkpoint is in '{folder.parent}': restore the file from a copy or start the run again"


def verify_checkpoint(folder: str | Path) -> None:
    """Every file the manifest lists is there, with its size and sha256; else one sentence naming the file. (A
    folder without a manifest was written before manifests existed: it is read as before.)"""
    folder = Path(folder)
    man = folder / MANIFEST
    if not man.is_file():
        return
    try:
        files = json.loads(man.read_text())["files"]
        items = [(str(rel), int(e["bytes"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"'{man}' is not a valid manifest; the checkpoint is corrupt: "
                              f"{resume_instead(folder)}.") from None
    # A file rewritten since the last verification (same process) changes its size or mtime: hashed again then.
    try:
        key = (str(folder.resolve()), man.stat().st_mtime_ns,
               tuple((rel, (folder / rel).stat().st_size, (folder / rel).stat().st_mtime_ns) for rel, _, _ in items))
    except OSError:
        key = None
    if key in _VERIFIED:
        return
    for rel, size, digest in items:
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"Checkpoint '{folder}' lacks {rel}, which its manifest lists; it is incomplete: "
                                  f"{resume_instead(folder)}.")
        if f.stat().st_size != size or file_sha256(f) != digest:
            raise CheckpointError(f"'{f}' is not the file written with this checkpoint (its sha256 differs from the "
                                  f"manifest's): it was changed or corrupted on disk; {resume_instead(folder)}.")
    if key is not None:
        _VERIFIED.add(key)


# ---------------------------------------------------------------- reading

def check_files(path: Path, names) -> None:
    missing = [f for f in names if not (Path(path) / f).exists()]
    if missing:
        raise CheckpointError(f"Checkpoint '{path}' lacks {', '.join(missing)}; it is incomplete: "
                              f"pick another checkpoint-<step> folder.")


def read_training_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint '{path}' is not a folder; pass a checkpoint-<step> folder "
                              f"written by a launcher (e.g. results/run/checkpoint-1000).")
    verify_checkpoint(path)
    check_files(path, ("training_state.json", "ema.pt"))
    try:
        state = json.loads((path / "training_state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"'{path / 'training_state.json'}' is not valid JSON; the checkpoint is "
                              f"corrupt: pick another one.") from None
    for key, kind in (("step", int), ("samples_seen", int), ("config", dict)):
        if not isinstance(state, dict) or not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"'{path / 'training_state.json'}' has no valid '{key}'; the checkpoint is "
                                  f"corrupt or not this project's: pick another one.")
    if state["step"] < 0:
        raise CheckpointError(f"'{path / 'training_state.json'}' says step {state['step']}; the checkpoint is "
                              f"corrupt: pick another one.")
    return state


def check_archives(checkpoint: Path, files) -> None:
    """Every PyTorch file among `files` whole to its end: torch.save writes a zip archive whose directory is its last
    bytes, so a file cut short (a copy interrupted, a crash while a checkpoint without a manifest was written) has
    none. Reads each file's first and last bytes only; names the file, before a library's own reader fails somewhere
    inside it (on one rank, in a collective) with a traceback. Files in torch's old, unzipped format are skipped."""
    for f in sorted(files):
        with open(f, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        if zipped and not zipfile.is_zipfile(f):
            raise CheckpointError(f"'{f}' is truncated (it ends before its archive's directory); the checkpoint is "
                                  f"corrupt: {resume_instead(checkpoint)}.")


def torch_load(file: Path, map_location):
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"'{file}' cannot be read ({e.__class__.__name__}); the checkpoint is "
                              f"corrupt or truncated: pick another one.") from None


def nonfinite_entries(sd: dict) -> list[str]:
    return [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def check_finite(sd: dict, file: Path) -> dict:
    bad = nonfinite_entries(sd)
    if bad:
        raise CheckpointError(f"'{file}' holds non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}):"
                              f" that run had diverged; resume from an earlier checkpoint.")
    return sd


def load_state_file(file: Path, map_location="cpu") -> dict:
    """A weights file (model.pt, ema.pt): readable, a state dict, and finite."""
    sd = torch_load(file, map_location)
    if not isinstance(sd, dict):
        raise CheckpointError(f"'{file}' is not a state dict; the checkpoint is corrupt: pick another one.")
    return check_finite(sd, file)


def check_model_config(state: dict, cfg: Config, path: Path) -> None:
    saved = state.get("config", {}).get("model", {})
    now = cfg.to_dict()["model"]
    default = ModelConfig()          # a field added after the checkpoint was written: it had the default
    diff = [f"model.{k}: checkpoint {saved.get(k, getattr(default, k))!r} vs config {v!r}" for k, v in now.items()
            if saved.get(k, getattr(default, k)) != v]
    if diff:
        raise CheckpointError(f"Checkpoint '{path}' was trained with a different model ({'; '.join(diff)}); "
                              f"use the config it was trained with.")


# The settings that decide the batches (and the objective) of every step: a resume keeps them.
FIXED_ON_RESUME = [("train", "seed"), ("train", "global_batch_size"), ("train", "train_subset"),
                   *(("diffusion", k) for k in ("schedule", "timesteps", "beta_start", "beta_end", "loss",
                                                "label_dropout")),
                   ("data", "source"), ("data", "path"), ("data", "flip"), ("data", "vae")]   # absent before issue 38: not checked
# The settings a resume recomputes from the command line, at the resumed step.
SCHEDULE_ON_RESUME = [("train", k) for k in ("lr", "warmup_steps", "min_lr_ratio", "max_steps", "betas",
                                             "weight_decay")]


@dataclass
class ResumePoint:
    """Where a run starts: step 0 of a fresh run, or what --resume's checkpoint says (its step and sample count, the
    settings this command line changes, and its whole training state)."""
    start: int = 0
    samples_seen: int = 0
    changes: list = field(default_factory=list)
    state: dict = field(default_factory=dict)


def resume_point(cfg: Config) -> ResumePoint:
    """The resume preflight every loop runs before it builds anything: the checkpoint's state read and verified,
    the command line checked against what a resume must keep, and a step past train.max_steps refused."""
    if not cfg.run.resume:
        return ResumePoint()
    path = Path(cfg.run.resume)
    state = read_training_state(path)
    if state.get("weights_only"):
        raise CheckpointError(f"--resume '{path}' holds weights only (no optimizer state, step 0; converted from "
                              f"'{state.get('meta_source', '?')}'), which no run continues; start a new run from them "
                              f"with --set run.init_from={path}.")
    changes = check_resume(state, cfg, path)
    if state["step"] > cfg.train.max_steps:
        raise ConfigError(f"--resume '{path}' is at step {state['step']}, past train.max_steps={cfg.train.max_steps}; "
                          f"raise --max-steps.")
    return ResumePoint(state["step"], state["samples_seen"], changes, state)


def starts_from_weights(cfg: Config, resume_state: dict) -> bool:
    """Whether this run loads run.init_from's weights: a new run does; a resume of the run that started from the same
    weights continues that run instead (a requeued fine-tune with --resume auto); a resume of any other run with
    init_from given is one sentence. The folder's model must be this config's (checked against its manifest)."""
    run = cfg.run
    if not run.init_from:
        return False
    if run.resume:
        started_from = ((resume_state.get("config") or {}).get("run") or {}).get("init_from", "")
        if not started_from or Path(started_from).resolve() != Path(run.init_from).resolve():
            raise ConfigError(f"run.init_from='{run.init_from}' starts a new run from a checkpoint's weights, but "
                              f"run.resume='{run.resume}' continues a run that did not start from them; give one of "
                              f"them.")
        return False
    path = Path(run.init_from)
    check_model_config(read_training_state(path), cfg, path)
    return True


def check_resume(state: dict, cfg: Config, path: Path) -> list[str]:
    """Stop if the command line changes what a resume must keep; return the schedule changes it makes."""
    check_model_config(state, cfg, path)
    saved, now = state["config"], cfg.to_dict()
    for sec, key in FIXED_ON_RESUME:
        was = saved.get(sec, {}).get(key)
        if was is not None and was != now[sec][key]:
            raise CheckpointError(
                f"--resume '{path}' was trained with {sec}.{key}={was!r}, but this run asks for {now[sec][key]!r}; "
                f"a resume keeps the batches and the objective of the run it continues: drop that change, or "
                f"start a new run in another --results-dir.")
    changes = []
    for sec, key in SCHEDULE_ON_RESUME:
        was = saved.get(sec, {}).get(key)
        if was is not None and was != now[sec][key]:
            changes.append(f"{sec}.{key} {was!r} -> {now[sec][key]!r}")
    return changes


def check_fits(sd: dict, like: nn.Module, file: Path) -> dict:
    """`sd`, read from `file`, holds the weights of `like`: every parameter, each of its shape, nothing another model
    has. Else one sentence naming the first entry that differs (with both shapes), instead of load_state_dict's
    size-mismatch traceback. A file that does not fit the model its own checkpoint was trained as (training_state.json
    says which, and a resume has checked that against the config) belongs to another checkpoint."""
    want = like.state_dict()
    params = {n for n, _ in like.named_parameters()}
    fix = f"it belongs to another model, not to this checkpoint: put the checkpoint's own {file.name} back, or " \
          f"{resume_instead(file.parent)}"
    for k, v in want.items():
        if k not in sd:
            if k in params:
                raise CheckpointError(f"'{file}' has no {k} (this checkpoint's model has {len(want)} entries, the "
                                      f"file {len(sd)}); {fix}.")
            continue
        have = tuple(getattr(sd[k], "shape", ()))
        if have != tuple(v.shape):
            raise CheckpointError(f"'{file}' holds {k} of shape {have}, but the model this checkpoint was trained as "
                                  f"has {tuple(v.shape)}; {fix}.")
    extra = [k for k in sd if k not in want]
    if extra:
        raise CheckpointError(f"'{file}' holds {extra[0]}, which the model this checkpoint was trained as does not "
                              f"have ({len(extra)} such entries); {fix}.")
    return sd


def config_of(state: dict, path: Path) -> Config:
    """The whole config a checkpoint was trained with (its training_state.json), as this version reads it."""
    overrides = {f"{s}.{k}": v for s, body in state["config"].items() if isinstance(body, dict)
                 for k, v in body.items()}
    try:
        return load_config(None, overrides)
    except ConfigError as e:
        raise CheckpointError(f"Checkpoint '{path}' holds a config this version cannot read ({e})") from None


def load_ema(folder: str | Path, map_location="cpu", like: nn.Module | None = None, name: str = "ema.pt") -> dict:
    """A checkpoint's ema.pt (or `name`: model.pt for run.init_from) for a resume: readable, finite, and the weights of
    the model the checkpoint was trained as (`like`, or the DiT of its training_state.json built on the meta device:
    no memory, no time)."""
    folder = Path(folder)
    file = folder / name
    check_files(folder, (name,))
    sd = load_state_file(file, map_location)
    if like is None:
        with torch.device("meta"):
            like = DiT(config_of(read_training_state(folder), folder).model)
    return check_fits(sd, like, file)


def load_model_weights(path: str | Path, model: nn.Module, file: str = "model.pt") -> None:
    path = Path(path)
    if not (path / file).is_file() and file == "model.pt" and (path / "ds").is_dir():
        raise CheckpointError(f"'{path}' is a DeepSpeed checkpoint without plain weights; convert it first: "
                              f"python -m dit_core.parallel.zero convert {path} {path}-plain")
    check_files(path, (file,))
    sd = check_fits(load_state_file(path / file), model, path / file)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"'{path / file}' does not fit this model ({first}); "
                              f"use the config it was trained with.") from None


def model_from_checkpoint(path: str | Path, device="cpu", ema: bool = True) -> tuple[DiT, Config]:
    """Rebuild the DiT a checkpoint was trained with and load its (EMA) weights."""
    state = read_training_state(path)
    cfg = config_of(state, Path(path))
    model = DiT(cfg.model)
    load_model_weights(path, model, "ema.pt" if ema else "model.pt")
    return model.to(device).eval(), cfg


# ---------------------------------------------------------------- writing

# What torch's C++ writer says when the operating system refused a write (torch.save into a path: the OSError
# itself is lost; into a Python file, it is the RuntimeError's __context__).
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "inline_container.cc", "file write failed", "iostream error",
                       "basic_ios::clear")


def write_error(e: BaseException, folder: Path) -> OSError | None:
    """The operating system's refusal behind a failed checkpoint write into `folder`, or None if `e` is not one (a
    bug keeps its traceback). It hides in four places: an OSError (Python's own writes), the RuntimeError of torch's
    C++ writer (torch.save into a path, as DeepSpeed saves), safetensors' error (Accelerate), and DCP's
    CheckpointException (a BaseException gathering every rank's error). Where torch's writer lost the OSError, the
    disk's free space tells a full disk (a failed write leaves it at about zero): call this before the half-written
    files are removed."""
    if isinstance(e, (CheckpointError, DataError, ValueError)):        # a bad input (ConfigError is a ValueError)
        return None
    todo, seen, torch_said = [e], set(), None
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        if type(x) is RuntimeError and any(m in str(x) for m in _TORCH_WRITE_FAILED):
            torch_said = torch_said or str(x).strip().splitlines()[0]
        code = re.search(r"\(os error (\d+)\)", str(x)) if type(x).__name__ == "SafetensorError" else None
        if code:                                                     # safetensors (Accelerate's model files)
            return OSError(int(code[1]), os.strerror(int(code[1])), str(folder))
        todo += [x.__cause__, None if x.__suppress_context__ else x.__context__]
        failures = getattr(x, "failures", None)                      # DCP: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    if torch_said is None:
        return None
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
        full = st.f_bavail * st.f_frsize < 16 << 20
    except (OSError, AttributeError):        # AttributeError: no statvfs (Windows)
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    return OSError(errno.EIO, f"torch could not write a file: {torch_said}", str(folder))


@contextmanager
def written_whole(tmp: Path, sentence):
    """Around the writes of a checkpoint into its temporary folder `tmp`: a write the operating system refused (a full
    disk, a lost mount, a read-only folder), however the library reports it, removes `tmp` and becomes
    `sentence(oserror)`, one CheckpointError; anything else (a bad input, a bug) passes unchanged."""
    try:
        yield
    except BaseException as e:
        why = write_error(e, tmp)
        if why is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise sentence(why) from None


def _why(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "because the disk is full"
    if e.errno == errno.EDQUOT:
        return "because the disk quota is used up"
    at = f" at '{e.filename}'" if e.filename else ""
    return f"({e.strerror or e.__class__.__name__}{at})"


def _fix(e: OSError) -> str:
    return "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that (the folder, its disk or mount)"


def write_weights(dst: Path, files: dict, state: dict, source: str, again: str) -> Path:
    """A weights-only checkpoint folder (a conversion): `files` maps each file name to the function that writes it into
    the hidden folder, `state` is its training_state.json; published like every checkpoint (manifest, flush, one
    rename). A refused write removes the hidden folder: one sentence naming `source`, unchanged, and `again`."""
    tmp = dst.with_name(f".{dst.name}.tmp")

    def failed(e: OSError) -> CheckpointError:
        return CheckpointError(f"Writing '{dst}' failed {_why(e)}; its half-written files were removed and '{source}' "
                               f"is unchanged: {_fix(e)}, then {again}.")
    with written_whole(tmp, failed):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, write in files.items():
            write(tmp / name)
        (tmp / "training_state.json").write_text(json.dumps(state, indent=1))
        publish(tmp, dst)
    return dst


def write_plain(src: Path, dst: Path, state: dict, sd: dict) -> Path:
    """A plain checkpoint folder converted from `src` (a sharded one): `sd` as model.pt, src's ema.pt, its training
    state marked as converted."""
    check_archives(src, [src / "ema.pt"])          # copied unread: whole, or refused (a legacy folder has no manifest)
    return write_weights(dst, {"model.pt": lambda f: torch.save(sd, f), "ema.pt": lambda f: shutil.copy(src / "ema.pt", f)},
                         {**state, "engine": "torch", "converted_from": str(src)}, str(src), "convert again")


def convert_main(prog: str, what: str, convert, argv=None) -> int:
    """`python -m <prog> convert SRC DST`: `convert(src, dst)` writes the plain checkpoint."""
    p = parser(prog=prog)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help=f"{what} checkpoint folder -> plain checkpoint folder")
    c.add_argument("src")
    c.add_argument("dst")

    def run(_):
        args = p.parse_args(argv)
        out = convert(args.src, args.dst)
        print(f"wrote {out} (model.pt, ema.pt, training_state.json)")
    run_main(run)
    return 0


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in a results folder (hidden temporary folders are not)."""
    out = []
    for p in Path(folder).glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and (p / "training_state.json").is_file():
            out.append(int(tail))
    return sorted(out)


def save_checkpoint(results_dir: str | Path, step: int, engine, ema, cfg: Config, samples_seen: int,
                    strategy=None, guard: dict | None = None) -> Path | None:
    """Write checkpoint-<step>/ into a hidden temporary folder, then rename: never half-written.

    Every rank calls this. Rank 0 writes the EMA and the training state; the engine's files come
    from rank 0 alone (full weights) or, under DeepSpeed and tensor parallelism, from every rank.
    The caller has checked the weights finite (`train` does at every read-back); the EMA is checked
    here. The final name never exists already: the run folder's rules (dit_core.rundir) remove or
    refuse later checkpoints before a run starts, so a rename never has to replace one. `guard`: what the
    divergence guard needs to judge a resumed run's first steps (its recent losses). `strategy`: the strategy (rank,
    barrier); None is one process."""
    is_main = strategy is None or strategy.is_main
    barrier = strategy.barrier if strategy is not None else (lambda: None)
    final = Path(results_dir) / f"checkpoint-{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    # A write that fails (a full disk: an OSError, torch's RuntimeError, or DCP's CheckpointException on every rank)
    # removes the temporary folder on the rank that saw it and stops with one sentence; earlier checkpoints stay.
    with written_whole(tmp, lambda e: write_failed(final, e)):
        if is_main:
            if final.exists():
                raise CheckpointError(f"'{final}' already exists; another run writes into '{results_dir}': "
                                      f"give each run its own --results-dir.")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        ema_sd = ema.state_dict()            # a collective when the EMA is sharded (ZeRO-3, TP)
        if engine.saves_on_every_rank:
            barrier()                    # the folder exists before anyone writes into it
            engine.save(tmp)
            barrier()                    # every partition is on disk before the rename
        elif is_main:
            engine.save(tmp)
        if not is_main:
            return None
        check_finite(ema_sd, tmp / "ema.pt")
        torch.save(ema_sd, tmp / "ema.pt")
        (tmp / "training_state.json").write_text(json.dumps(
            {"step": step, "samples_seen": samples_seen, "engine": engine.name, **engine.state_info(),
             "config": cfg.to_dict(), **({"guard": guard} if guard else {})}, indent=1))
        publish(tmp, final)
        return final


def write_failed(final: Path, e: OSError) -> CheckpointError:
    """The sentence for a checkpoint whose write failed (its temporary folder already removed)."""
    latest = checkpoint_steps(final.parent)
    if latest:
        last = final.parent / f"checkpoint-{latest[-1]}"
        keep, then = f"checkpoint-{latest[-1]} is the latest complete one", f"resume with --resume {last}"
    else:
        keep, then = "this run has no complete checkpoint yet", "start the run again"
    return CheckpointError(f"Writing '{final}' failed {_why(e)}; its half-written files were removed and {keep}: "
                           f"{_fix(e)}, then {then}.")


def publish(tmp: Path, final: Path) -> None:
    """A checkpoint folder written into its hidden `tmp` becomes `final`: every file's sha256 into the manifest,
    every file flushed to disk, then one rename (a crash or power cut keeps either no `final` or the whole of it).
    Every checkpoint writer ends here (the loop's, the converters', Accelerate's); single files go through
    `scratch.write_atomic`."""
    write_manifest(tmp)
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    os.rename(tmp, final)


def main(argv=None) -> int:
    """`python -m dit_core.checkpoint verify CHECKPOINT`: every file against the manifest written with it."""
    p = parser(prog="python -m dit_core.checkpoint")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check every file of a checkpoint folder against its manifest (sha256)")
    v.add_argument("checkpoint")

    def run(_):
        args = p.parse_args(argv)
        folder = Path(args.checkpoint)
        read_training_state(folder)                    # verifies first
        if not (folder / MANIFEST).is_file():
            print(f"'{folder}' has no {MANIFEST} (written before manifests existed): nothing to verify against")
            return
        n = len(json.loads((folder / MANIFEST).read_text())["files"])
        print(f"'{folder}': all {n} files match the sha256 recorded when it was written")
    run_main(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
