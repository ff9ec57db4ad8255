"""The launcher contract's command line (../shared/DESIGN.md): the flags every launcher shares, the config they
make, and `--resume auto`. Above the config, the checkpoint and the run folder, which `--resume auto` reads.
"""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import checkpoint_steps
from .config import Config, ConfigError, apply_value, load_config, parse_overrides
from .process import parser, say


def launcher_parser(description: str):
    """The flags every launcher shares (DESIGN.md, launcher contract)."""
    p = parser(description=description)
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML config (configs/*.yaml)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument("--global-batch-size", type=int, help="samples per optimizer step, all ranks together")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (train.grad_accum)")
    p.add_argument("--seed", type=int, help="seed of the weights and of every batch (train.seed)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (run.device)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="train.precision")
    p.add_argument("--fast", choices=("auto", "on", "off"),
                   help="one-GPU fast path (train.fast); off: batches from the determinism contract, for parity")
    p.add_argument("--results-dir", help="checkpoints, TensorBoard and the default log go here (one run per folder)")
    p.add_argument("--log-jsonl", help="rank 0 writes one JSON object per optimizer step here")
    p.add_argument("--resume", help="a checkpoint-<step> folder to continue from exactly, or auto: this "
                   "--results-dir's latest checkpoint if it has one, else start (for restarts: torchrun --max-restarts)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="discard another run's log and checkpoints found in --results-dir (run.overwrite)")
    p.add_argument("--dump-grads", metavar="PATH",
                   help="write every parameter's gradient of the first step here (run.dump_grads; the step: "
                        "--set run.dump_grads_step=N); compare two with python -m dit_core.parity grads A B")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other config value, e.g. --set model.depth=6 (repeatable)")
    return p


_FLAG_KEYS = {"max_steps": "train.max_steps", "global_batch_size": "train.global_batch_size",
              "grad_accum": "train.grad_accum", "seed": "train.seed", "device": "run.device",
              "precision": "train.precision", "fast": "train.fast", "results_dir": "run.results_dir",
              "log_jsonl": "run.log_jsonl", "resume": "run.resume", "overwrite": "run.overwrite",
              "dump_grads": "run.dump_grads"}


def config_from_args(args) -> Config:
    overrides = parse_overrides(args.set)
    scratch = Config()
    for dotted, value in overrides.items():      # each --set value of the right type, even where a flag overrides it
        if "." in dotted:
            apply_value(scratch, *dotted.split(".", 1), value, "override")
    for attr, key in _FLAG_KEYS.items():
        v = getattr(args, attr, None)
        if v is not None:
            overrides[key] = v
    cfg = load_config(args.config, overrides)
    if cfg.run.resume == "auto":
        resolve_auto_resume(cfg)
    return cfg


def resolve_auto_resume(cfg: Config) -> None:
    """--resume auto: continue this results folder's run from its latest complete checkpoint, or start it when it
    has none (an earlier attempt that never reached a checkpoint starts over). What an elastic restart needs:
    torchrun starts the workers again with the same arguments, and they must pick up where the last checkpoint is."""
    folder = Path(cfg.run.results_dir)
    steps = checkpoint_steps(folder) if folder.is_dir() else []
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if steps:
        cfg.run.resume = str(folder / f"checkpoint-{steps[-1]}")
    else:
        # No checkpoint: a torchrun restart of this job starts its earlier attempt over; a first attempt that finds a
        # log there has found another run's, which it must not replace unless told to.
        log = Path(cfg.run.log_jsonl) if cfg.run.log_jsonl else folder / "log.jsonl"
        rows = sum(1 for line in log.read_text().splitlines() if line.strip()) if log.is_file() else 0
        if rows and restart == "0" and not cfg.run.overwrite:
            raise ConfigError(f"--resume auto: '{folder}' holds another run's log ('{log}', {rows} steps) and no "
                              f"checkpoint to resume; give this run another --results-dir, or pass --overwrite to "
                              f"discard that run.")
        cfg.run.resume, cfg.run.overwrite = "", True
    if os.environ.get("RANK", "0") == "0":
        say(f"[resume auto] {'from ' + cfg.run.resume if steps else 'no checkpoint in ' + str(folder) + ': from step 0'}"
            f" (torchrun restart {restart})")
