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
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .config import Config, ModelConfig
from .model import DiT


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, diverged, foreign, or does not match the config."""


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
_VERIFIED: dict = {}             # (folder, manifest's mtime) -> True: a resume reads the state several times


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


def _earlier(folder: Path) -> str:
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
    key = (str(folder.resolve()), man.stat().st_mtime_ns)
    if key in _VERIFIED:
        return
    try:
        files = json.loads(man.read_text())["files"]
        items = [(str(rel), int(e["bytes"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"'{man}' is not a valid manifest; the checkpoint is corrupt: "
                              f"{_earlier(folder)}.") from None
    for rel, size, digest in items:
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"Checkpoint '{folder}' lacks {rel}, which its manifest lists; it is incomplete: "
                                  f"{_earlier(folder)}.")
        if f.stat().st_size != size or file_sha256(f) != digest:
            raise CheckpointError(f"'{f}' is not the file written with this checkpoint (its sha256 differs from the "
                                  f"manifest's): it was changed or corrupted on disk; {_earlier(folder)}.")
    _VERIFIED[key] = True


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
                                                "label_dropout"))]
# The settings a resume recomputes from the command line, at the resumed step.
SCHEDULE_ON_RESUME = [("train", k) for k in ("lr", "warmup_steps", "min_lr_ratio", "max_steps", "betas",
                                             "weight_decay")]


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


def load_model_weights(path: str | Path, model: nn.Module, file: str = "model.pt") -> None:
    path = Path(path)
    if not (path / file).is_file() and file == "model.pt" and (path / "ds").is_dir():
        raise CheckpointError(f"'{path}' is a DeepSpeed checkpoint without plain weights; convert it first: "
                              f"python -m dit_core.parallel.zero convert {path} {path}-plain")
    check_files(path, (file,))
    sd = load_state_file(path / file)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"'{path / file}' does not fit this model ({first}); "
                              f"use the config it was trained with.") from None


def model_from_checkpoint(path: str | Path, device="cpu", ema: bool = True) -> tuple[DiT, Config]:
    """Rebuild the DiT a checkpoint was trained with and load its (EMA) weights."""
    from .config import ConfigError, load_config

    state = read_training_state(path)
    overrides = {f"{s}.{k}": v for s, body in state["config"].items() if isinstance(body, dict)
                 for k, v in body.items()}
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        raise CheckpointError(f"Checkpoint '{path}' holds a config this version cannot read ({e})") from None
    model = DiT(cfg.model)
    load_model_weights(path, model, "ema.pt" if ema else "model.pt")
    return model.to(device).eval(), cfg


# ---------------------------------------------------------------- writing

def write_plain(src: Path, dst: Path, state: dict, sd: dict) -> Path:
    """A plain checkpoint folder converted from `src` (a sharded one): `sd` as model.pt, src's ema.pt, its training
    state marked as converted. Written into a hidden folder and renamed, like every checkpoint."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(sd, tmp / "model.pt")
    shutil.copy(src / "ema.pt", tmp / "ema.pt")
    (tmp / "training_state.json").write_text(json.dumps({**state, "engine": "torch", "converted_from": str(src)},
                                                        indent=1))
    write_manifest(tmp)
    tmp.rename(dst)
    return dst


def convert_main(prog: str, what: str, convert, argv=None) -> int:
    """`python -m <prog> convert SRC DST`: `convert(src, dst)` writes the plain checkpoint."""
    from .config import parser
    from .errors import run_main
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
                    par=None) -> Path | None:
    """Write checkpoint-<step>/ into a hidden temporary folder, then rename: never half-written.

    Every rank calls this. Rank 0 writes the EMA and the training state; the engine's files come
    from rank 0 alone (full weights) or, under DeepSpeed and tensor parallelism, from every rank.
    The caller has checked the weights finite (`train` does at every read-back); the EMA is checked
    here. The final name never exists already: the run folder's rules (dit_core.rundir) remove or
    refuse later checkpoints before a run starts, so a rename never has to replace one."""
    from .engine import Parallel
    par = par or Parallel()
    final = Path(results_dir) / f"checkpoint-{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        if par.is_main:
            if final.exists():
                raise CheckpointError(f"'{final}' already exists; another run writes into '{results_dir}': "
                                      f"give each run its own --results-dir.")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        ema_sd = ema.state_dict()            # a collective when the EMA is sharded (ZeRO-3, TP)
        if engine.saves_on_every_rank:
            par.barrier()                    # the folder exists before anyone writes into it
            engine.save(tmp)
            par.barrier()                    # every partition is on disk before the rename
        elif par.is_main:
            engine.save(tmp)
        if not par.is_main:
            return None
        check_finite(ema_sd, tmp / "ema.pt")
        torch.save(ema_sd, tmp / "ema.pt")
        (tmp / "training_state.json").write_text(json.dumps(
            {"step": step, "samples_seen": samples_seen, "engine": engine.name, **engine.state_info(),
             "config": cfg.to_dict()}, indent=1))
        write_manifest(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)
        return final
    except OSError as e:
        if par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(final, e) from None


def write_failed(final: Path, e: OSError) -> CheckpointError:
    """The sentence for a checkpoint whose write failed (its temporary folder already removed)."""
    latest = checkpoint_steps(final.parent)
    keep = f"checkpoint-{latest[-1]} is the latest complete one" if latest else "no checkpoint was kept"
    why = "the disk is full" if e.errno == errno.ENOSPC else f"{e.strerror or e.__class__.__name__}"
    return CheckpointError(f"Writing '{final}' failed ({why}); nothing half-written was left and {keep}: "
                           f"free space or fix the folder, then resume.")


def _fsync_tree(folder: Path) -> None:
    """Flush the new files to disk before the rename makes them the checkpoint (a power cut then keeps
    either the old state or the whole new one)."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def main(argv=None) -> int:
    """`python -m dit_core.checkpoint verify CHECKPOINT`: every file against the manifest written with it."""
    from .config import parser
    from .errors import run_main
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
