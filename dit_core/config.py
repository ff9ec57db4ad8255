"""Configuration: dataclasses, YAML loading, CLI overrides, validation.

Every launcher reads the same config. A wrong key or value stops with one
sentence that names the value and the fix (ConfigError), never a traceback
from deep inside the training loop.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message says which and how to fix it."""


@dataclass
class ModelConfig:
    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 4          # 4 -> 7x7 = 49 tokens, 2 -> 14x14 = 196 tokens
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10        # the null (unconditional) class is index num_classes


@dataclass
class DiffusionConfig:
    schedule: str = "linear"     # linear (1e-4 -> 0.02, the course's) or cosine
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    loss: str = "mse"            # mse or l1 (the course notes use l1)
    label_dropout: float = 0.1   # classifier-free guidance: drop the label this often


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 1000
    global_batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1    # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0       # 0 turns clipping off
    ema_decay: float = 0.999
    precision: str = "fp32"      # fp32, bf16, fp16
    compile: bool = False        # compile the model's forward (the fast path compiles the whole loss)
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead adds CUDA graphs; none: no compile
    fast: str = "auto"           # one-GPU fast path (batches drawn on the device, loss read back at log
                                 # steps): auto = on for one process on CUDA; off = the parity contract
    log_every: int = 50          # progress bar / TensorBoard refresh (JSONL logs every step)
    ckpt_every: int = 0          # 0: only the final checkpoint
    tensorboard: bool = True
    train_subset: int = 0        # >0: train on the first N images only (tests)


@dataclass
class SampleConfig:
    sampler: str = "ddim"        # ddim or ddpm
    ddim_steps: int = 50
    cfg_scale: float = 3.0
    eta: float = 0.0             # DDIM eta (0 = deterministic)


@dataclass
class RunConfig:
    device: str = "auto"         # auto, cpu, cuda
    results_dir: str = "results/run"
    log_jsonl: str = ""          # default: <results_dir>/log.jsonl
    resume: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"]["betas"] = list(d["train"]["betas"])
        return d


_SECTIONS = {f.name: f.default_factory for f in fields(Config)}
_CHOICES = {
    ("diffusion", "schedule"): ("linear", "cosine"),
    ("diffusion", "loss"): ("mse", "l1"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "fast"): ("auto", "on", "off"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "none"),
    ("sample", "sampler"): ("ddim", "ddpm"),
    ("run", "device"): ("auto", "cpu", "cuda"),
}


def _coerce(section: str, key: str, value: Any, typ: Any, source: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or say why not."""
    where = f"{section}.{key}={value!r} ({source})"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} is not a boolean; use true or false.")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} is not an integer; give a whole number.")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is not an integer; give a whole number.") from None
        if f != int(f):
            raise ConfigError(f"{where} is not an integer; give a whole number.")
        return int(f)
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is not a number; give e.g. 1e-3.") from None
    if typ is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[]").split(",") if v.strip()]
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is not a list of numbers; give e.g. [0.9, 0.999].") from None
    return str(value)


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    if section not in _SECTIONS:
        raise ConfigError(
            f"Unknown config section '{section}' ({source}); valid sections are: {', '.join(_SECTIONS)}.")
    sub = getattr(cfg, section)
    hints = get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(
            f"Unknown config key '{section}.{key}' ({source}); valid keys in '{section}' are: "
            f"{', '.join(hints)}.")
    setattr(sub, key, _coerce(section, key, value, hints[key], source))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- overrides ({"train.max_steps": 10}); then validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist; pass one of configs/*.yaml.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{path}' is not valid YAML ({e.__class__.__name__}); fix its syntax.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must be a mapping of sections (model:, train:, ...).")
        for section, body in raw.items():
            if not isinstance(body, dict):
                raise ConfigError(
                    f"Config section '{section}' in '{path}' must be a mapping of keys, got {body!r}.")
            for key, value in body.items():
                _apply(cfg, section, key, value, str(path))
    for dotted, value in (overrides or {}).items():
        if "." not in dotted:
            raise ConfigError(f"Override '{dotted}' must look like section.key=value, e.g. train.lr=1e-3.")
        section, key = dotted.split(".", 1)
        _apply(cfg, section, key, value, "override")
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['train.lr=1e-3', ...] -> {'train.lr': '1e-3'} (values are coerced later)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like section.key=value, e.g. --set train.lr=1e-3.")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else v
    return out


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    m, d, t, s = cfg.model, cfg.diffusion, cfg.train, cfg.sample
    for (sec, key), allowed in _CHOICES.items():
        v = getattr(getattr(cfg, sec), key)
        _check(v in allowed, f"{sec}.{key}={v!r} is not one of {', '.join(allowed)}; pick one of those.")
    _check(m.patch_size > 0 and m.image_size % m.patch_size == 0,
           f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}; "
           f"use a divisor such as 2, 4, 7 or 14.")
    _check(m.hidden_size > 0 and m.num_heads > 0 and m.hidden_size % m.num_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
           f"choose heads that divide the hidden size.")
    _check((m.hidden_size // max(m.num_heads, 1)) % 2 == 0 and m.hidden_size % 4 == 0,
           f"model.hidden_size={m.hidden_size} must be a multiple of 4 with an even head size "
           f"(2-D sin-cos position embedding); use e.g. 64, 96, 128.")
    _check(m.depth >= 1, f"model.depth={m.depth} must be at least 1.")
    _check(m.mlp_ratio > 0, f"model.mlp_ratio={m.mlp_ratio} must be positive.")
    _check(m.num_classes >= 1, f"model.num_classes={m.num_classes} must be at least 1.")
    _check(d.timesteps >= 2, f"diffusion.timesteps={d.timesteps} must be at least 2.")
    _check(0 < d.beta_start < d.beta_end < 1,
           f"diffusion.beta_start={d.beta_start} and beta_end={d.beta_end} must satisfy 0 < start < end < 1.")
    _check(0 <= d.label_dropout < 1, f"diffusion.label_dropout={d.label_dropout} must be in [0, 1).")
    _check(t.max_steps >= 0, f"train.max_steps={t.max_steps} must be >= 0.")
    _check(t.global_batch_size >= 1, f"train.global_batch_size={t.global_batch_size} must be >= 1.")
    _check(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1.")
    _check(t.global_batch_size % t.grad_accum == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by train.grad_accum={t.grad_accum}; "
           f"make the batch a multiple of the accumulation steps.")
    _check(t.lr > 0, f"train.lr={t.lr} must be positive.")
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1].")
    _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0.")
    _check(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 turns clipping off).")
    _check(0 <= t.ema_decay < 1, f"train.ema_decay={t.ema_decay} must be in [0, 1).")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
           f"train.betas={t.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999].")
    _check(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1.")
    _check(t.ckpt_every >= 0, f"train.ckpt_every={t.ckpt_every} must be >= 0.")
    _check(t.train_subset >= 0, f"train.train_subset={t.train_subset} must be >= 0.")
    _check(1 <= s.ddim_steps <= d.timesteps,
           f"sample.ddim_steps={s.ddim_steps} must be between 1 and diffusion.timesteps={d.timesteps}.")
    _check(s.cfg_scale >= 0, f"sample.cfg_scale={s.cfg_scale} must be >= 0.")
    _check(s.eta >= 0, f"sample.eta={s.eta} must be >= 0.")


# ---------------------------------------------------------------- launcher contract

def launcher_parser(description: str):
    """The flags every launcher shares (DESIGN.md, launcher contract)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML config (configs/*.yaml)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument("--global-batch-size", type=int, help="samples per optimizer step, all ranks together")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (train.grad_accum)")
    p.add_argument("--seed", type=int, help="seed of the weights and of every batch (train.seed)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (run.device)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="train.precision")
    p.add_argument("--fast", choices=("auto", "on", "off"),
                   help="one-GPU fast path (train.fast); off: batches from the determinism contract, for parity")
    p.add_argument("--results-dir", help="checkpoints, TensorBoard and the default log go here")
    p.add_argument("--log-jsonl", help="rank 0 writes one JSON object per optimizer step here")
    p.add_argument("--resume", help="a checkpoint-<step> folder to continue from exactly")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other config value, e.g. --set model.depth=6 (repeatable)")
    return p


_FLAG_KEYS = {"max_steps": "train.max_steps", "global_batch_size": "train.global_batch_size",
              "grad_accum": "train.grad_accum", "seed": "train.seed", "device": "run.device",
              "precision": "train.precision", "fast": "train.fast", "results_dir": "run.results_dir",
              "log_jsonl": "run.log_jsonl", "resume": "run.resume"}


def config_from_args(args) -> Config:
    overrides = parse_overrides(args.set)
    for attr, key in _FLAG_KEYS.items():
        v = getattr(args, attr, None)
        if v is not None:
            overrides[key] = v
    return load_config(args.config, overrides)
