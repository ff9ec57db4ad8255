"""FSDP checkpoints: `torch.distributed.checkpoint` (DCP) folders that any number of ranks reads back.

Every weight and AdamW moment is stored under its single-process name, each rank writing the dim-0 chunk FSDP2 would
own (a DTensor sharded on dim 0), plus DCP's `.metadata`: which rank wrote which chunk of which tensor. A reader plans
its load from that metadata and asks for the pieces it needs, so the hand-written FSDP and FSDP2 on any N, DDP and
one plain process all resume the same folder. The EMA is written whole (`ema.pt`, by dit_core.checkpoint).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, resume_instead, check_files, read_training_state, write_plain
from .checkpoint import model_from_checkpoint


def chunks(full: dict, mesh) -> dict:
    """{name: whole tensor} -> {name: DTensor holding this rank's dim-0 chunk}: FSDP2's layout on disk."""
    from torch.distributed.tensor import Shard, distribute_tensor
    # src_data_rank=None: every rank holds the whole tensor already and keeps its chunk (no scatter)
    return {n: distribute_tensor(t.contiguous(), mesh, [Shard(0)], src_data_rank=None) for n, t in full.items()}


def check_shards(folder: Path, metadata) -> None:
    """Every shard file DCP's metadata names is there and long enough for every piece it says the file holds: a
    missing or cut-short `.distcp` (a checkpoint without a manifest, from before manifests) is named here, on every
    rank alike, instead of inside DCP's collective load."""
    need: dict = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        if hasattr(info, "relative_path"):
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(need.items()):
        f = folder / "dcp" / name
        if not f.is_file():
            raise CheckpointError(f"Checkpoint '{folder}' lacks the shard dcp/{name}, which its DCP metadata lists; "
                                  f"it is incomplete: {resume_instead(folder)}.")
        if f.stat().st_size < end:
            raise CheckpointError(f"'{f}' is truncated ({f.stat().st_size} bytes; the checkpoint's DCP metadata puts "
                                  f"data up to byte {end}); the checkpoint is corrupt: {resume_instead(folder)}.")


def dcp_failure(e: BaseException) -> str:
    """What went wrong in a DCP load, in a few words: the first rank's error (a CheckpointException's str is every
    rank's whole traceback)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    text = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(e).strip() else ""
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def read_dcp(folder: Path, shapes: dict, mesh, fqns: list[str]) -> dict:
    """Read an FSDP checkpoint's DCP folder into whole tensors ({"model": {...}, "optim": {...}, "optim_step"}).
    `mesh` None: one process (single.py, or every DDP rank reading all of it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    folder = Path(folder)
    check_files(folder, ("dcp/.metadata",))
    try:
        metadata = FileSystemReader(str(folder / "dcp")).read_metadata()
    except Exception as e:
        raise CheckpointError(f"'{folder / 'dcp' / '.metadata'}' cannot be read ({e.__class__.__name__}); the "
                              f"checkpoint is corrupt: {resume_instead(folder)}.") from None
    check_shards(folder, metadata)
    meta = metadata.state_dict_metadata
    missing = [n for n in fqns if f"model.{n}" not in meta]
    if missing:
        raise CheckpointError(f"'{folder / 'dcp'}' has no {missing[0]} ({len(missing)} weights missing): it was "
                              f"written for another model; use the config it was trained with.")
    for n in fqns:
        if tuple(meta[f"model.{n}"].size) != tuple(shapes[n]):
            raise CheckpointError(f"'{folder / 'dcp'}' holds {n} of shape {tuple(meta[f'model.{n}'].size)}, this "
                                  f"model's is {tuple(shapes[n])}; use the config it was trained with.")

    def dest():
        if mesh is None:
            return {n: torch.zeros(shapes[n]) for n in fqns}
        return chunks({n: torch.zeros(shapes[n]) for n in fqns}, mesh)
    state = {"model": dest()}
    has_optim = "optim_step" in meta
    if has_optim:
        state["optim"] = {k: dest() for k in ("exp_avg", "exp_avg_sq")}
        state["optim_step"] = torch.zeros(())
    try:
        with warnings.catch_warnings():      # one process on purpose: DCP's "assuming a single process" is noise
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder / "dcp"), **({"no_dist": True} if mesh is None else {}))
    except (Exception, CheckpointException) as e:       # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"'{folder / 'dcp'}' cannot be read ({dcp_failure(e)}); the checkpoint is corrupt or "
                              f"truncated: {resume_instead(folder)}.") from None

    def whole(d):
        return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in d.items()}
    out = {"model": whole(state["model"])}
    if has_optim:
        out["optim"] = {k: whole(v) for k, v in state["optim"].items()}
        out["optim_step"] = state["optim_step"]
    return out


def load_moments(optimizer, params, moments: dict, step: torch.Tensor, local=lambda p: p) -> None:
    """AdamW's state from per-parameter moments (shard-shaped or whole), through load_state_dict, which puts
    each value on the device and in the dtype AdamW keeps it (its `step` on the CPU unless fused)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {"step": step.clone(), "exp_avg": moments["exp_avg"][i], "exp_avg_sq": moments["exp_avg_sq"][i]}
                   for i in range(len(params))}
    optimizer.load_state_dict(sd)
    if params and hasattr(params[0], "to_local"):
        # FSDP2: the moments must be DTensors like their parameters
        from torch.distributed.tensor import DTensor
        for p in params:
            st = optimizer.state[p]
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = DTensor.from_local(st[k], p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def load_into_plain(folder: Path, model: nn.Module, optimizer) -> None:
    """An FSDP checkpoint into a whole model and its AdamW (single.py, DDP): every process reads all of it."""
    names = [n for n, _ in model.named_parameters()]
    full = read_dcp(folder, {n: p.shape for n, p in model.named_parameters()}, None, names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(full["model"][n])
    if "optim" in full and optimizer is not None:
        moments = {k: [v[n] for n in names] for k, v in full["optim"].items()}
        load_moments(optimizer, list(model.parameters()), moments, full["optim_step"])


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """An FSDP checkpoint folder -> a plain one (model.pt, ema.pt, training_state.json), in one process."""
    src, dst = Path(src), Path(dst)
    state = read_training_state(src)
    if state.get("engine") != "fsdp":
        raise CheckpointError(f"'{src}' is not an FSDP checkpoint (training_state.json says engine "
                              f"{state.get('engine', 'torch')!r}); it needs no conversion.")
    if dst.exists():
        raise CheckpointError(f"'{dst}' already exists; pass a new folder to write the plain checkpoint into.")
    model, _ = model_from_checkpoint(src)            # the architecture (and the EMA weights, replaced below)
    load_into_plain(src, model, None)
    return write_plain(src, dst, state, model.state_dict())
