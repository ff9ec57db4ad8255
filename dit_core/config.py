"""Configuration: dataclasses, YAML loading, the --set syntax, validation (the command line itself: dit_core.cli).

Every launcher reads the same config. A wrong key or value stops with one
sentence that names the value and the fix (ConfigError), never a traceback
from deep inside the training loop.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, get_type_hints

import yaml

from .errors import ConfigError  # noqa: F401  (its name stays importable from here)


# ---------------------------------------------------------------- every field carries its rule

@dataclass(frozen=True)
class Rule:
    """What a field accepts beyond its type: `ok(value)`, described by `need` ("must be <need>"), and an
    example of an out-of-range value (`bad`, for the tests; None where every value of the type is fine)."""
    need: str
    ok: Callable[[Any], bool] = lambda v: True
    bad: Any = None


def at_least(lo, strict: bool = False) -> Rule:
    bad = lo if strict else (lo - 1 if isinstance(lo, int) else lo - 0.5)
    return Rule(f"{'>' if strict else '>='} {lo}", (lambda v: v > lo) if strict else (lambda v: v >= lo), bad)


def between(lo, hi, hi_open: bool = False, lo_open: bool = False) -> Rule:
    need = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Rule(need, lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi),
                hi if hi_open else hi + 1)


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices, "nonsense")


ANY = Rule("anything")                                      # booleans, paths that may be empty
NONEMPTY = Rule("a non-empty path", lambda v: v.strip() != "", "")


def F(default, rule: Rule):
    """A config field and its rule: validation (and its test) walks these, so no field goes unchecked."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass
class ModelConfig:
    image_size: int = F(28, at_least(1))             # checked against the data (MNIST: 28)
    in_channels: int = F(1, at_least(1))             # checked against the data (MNIST: 1)
    patch_size: int = F(4, at_least(1))              # 4 -> 7x7 = 49 tokens, 2 -> 14x14 = 196 tokens
    hidden_size: int = F(128, at_least(4))
    depth: int = F(4, at_least(1))
    num_heads: int = F(4, at_least(1))
    mlp_ratio: float = F(4.0, at_least(0.0, strict=True))
    num_classes: int = F(10, at_least(1))            # the null (unconditional) class is index num_classes
    # Mixture of experts (chapter 15): 0 = the dense MLP of every other chapter. Otherwise each block's MLP is
    # num_experts expert MLPs of the same size behind a linear router; each token goes to its top_k experts
    # (dropless: no capacity limit), weighted by its renormalised router probabilities.
    num_experts: int = F(0, at_least(0))
    top_k: int = F(2, at_least(1))
    aux_loss_weight: float = F(0.01, at_least(0.0))  # load-balancing loss (Switch form) added to the diffusion loss
    # The load-balancing loss is computed per group of this many images (a GShard "group"; 1 = per image, the
    # sequence-wise form of DeepSeek-V3) and averaged: a group never straddles two ranks or micro-batches, so the
    # loss is the same on one process and on any layout.
    moe_aux_group: int = F(1, at_least(1))
    # Where positions enter: sincos adds the fixed 2-D sin-cos embedding to the tokens (DiT's choice); rope2d rotates
    # every head's queries and keys by the token's row (half the channel pairs) and column (the other half): attention
    # scores then depend on the offset between two tokens only (chapter 17). Token-splitting strategies need sincos.
    # sincos_meta: the same embedding laid out as Meta's DiT does (the column in the first half of the channels, the
    # row in the second; sincos puts the row first): Meta's checkpoints need it (`python -m dit_core.convert meta`).
    pos_embed: str = F("sincos", one_of("sincos", "sincos_meta", "rope2d"))
    # Meta's DiT predicts the noise and a variance: 2 x in_channels outputs, the loss and the samplers read the first
    # half (and diffusion.loss=hybrid trains the second).
    learn_sigma: bool = F(False, ANY)


@dataclass
class DataConfig:
    # mnist (the default), fashion_mnist, folder (an ImageFolder tree at data.path: one sub-folder per class) or
    # latents (that folder encoded once by the VAE at data.vae)
    source: str = F("mnist", one_of("mnist", "fashion_mnist", "folder", "latents"))
    path: str = F("", ANY)                        # the image folder (folder, latents)
    vae: str = F("", ANY)                         # latents: a local diffusers AutoencoderKL folder (or a hub name)
    flip: bool = F(False, ANY)                    # random horizontal flip, drawn with the global batch


@dataclass
class DiffusionConfig:
    schedule: str = F("linear", one_of("linear", "cosine"))   # linear (1e-4 -> 0.02, the course's) or cosine
    timesteps: int = F(1000, at_least(2))
    beta_start: float = F(1e-4, between(0.0, 1.0, lo_open=True, hi_open=True))
    beta_end: float = F(0.02, between(0.0, 1.0, lo_open=True, hi_open=True))
    loss: str = F("mse", one_of("mse", "l1"))                   # the course notes use l1
    # What the network predicts: eps (the noise, Ho et al.), v (sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho
    # 2022), x0 (the clean image), or flow (rectified flow / flow matching as in SiT: x_t = (1 - s) x0 + s eps,
    # the velocity eps - x0, sampled by an ODE solver: sample.sampler euler or heun).
    objective: str = F("eps", one_of("eps", "v", "x0", "flow"))
    weighting: str = F("none", one_of("none", "min_snr"))     # min_snr: min(SNR, gamma) (Hang et al. 2023)
    snr_gamma: float = F(5.0, at_least(0.0, strict=True))
    flow_time: str = F("uniform", one_of("uniform", "logit_normal"))   # how flow's s in (0, 1) is drawn
    label_dropout: float = F(0.1, between(0.0, 1.0, hi_open=True))   # classifier-free guidance: drop this often


@dataclass
class TrainConfig:
    seed: int = F(0, between(0, 2 ** 63 - 1))
    max_steps: int = F(1000, at_least(0))
    global_batch_size: int = F(128, at_least(1))
    grad_accum: int = F(1, at_least(1))
    lr: float = F(1e-3, at_least(0.0, strict=True))
    min_lr_ratio: float = F(0.1, between(0.0, 1.0))             # cosine decays to lr * min_lr_ratio
    warmup_steps: int = F(100, at_least(0))
    weight_decay: float = F(0.0, at_least(0.0))
    betas: tuple = F((0.9, 0.999), Rule("two numbers in [0, 1)",
                                        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), (0.9, 1.0)))
    grad_clip: float = F(1.0, at_least(0.0))                    # 0 turns clipping off
    ema_decay: float = F(0.999, between(0.0, 1.0, hi_open=True))
    precision: str = F("fp32", one_of("fp32", "bf16", "fp16"))
    max_nonfinite_steps: int = F(10, at_least(1))  # fp16: overflowing steps in a row the loss scaler may skip
    # Divergence without NaN (docs/faults.md). diverge_loss: a step's loss above this many times its running level
    # (the median of the last 50 steps' losses, once 20 are known) stops the run; healthy runs measured up to 3.4x at
    # a batch of 1, 1.4x at 32. diverge_weights: the weights' norm above this many times its value at initialisation
    # stops it (and refuses such a checkpoint); healthy runs measured up to 3.6x, lr 1e3 gives 1446x after one step.
    # 0 turns either off.
    diverge_loss: float = F(10.0, Rule("0 (off) or a number above 1", lambda v: v == 0 or v > 1, 1.0))
    diverge_weights: float = F(100.0, Rule("0 (off) or a number above 1", lambda v: v == 0 or v > 1, 0.5))
    compile: bool = F(False, ANY)                  # compile the model's forward (the fast path compiles the loss)
    compile_mode: str = F("default", one_of("default", "reduce-overhead", "max-autotune",
                                            "max-autotune-no-cudagraphs", "none"))   # none: no compile
    fast: str = F("auto", one_of("auto", "on", "off"))  # one-GPU fast path (batches drawn on the device, loss
                                                        # read back at log steps): auto = on for one process on
                                                        # CUDA; off = the parity contract
    log_every: int = F(50, at_least(1))            # progress bar / TensorBoard refresh (JSONL logs every step)
    ckpt_every: int = F(0, at_least(0))            # 0: only the final checkpoint
    tensorboard: bool = F(True, ANY)
    train_subset: int = F(0, at_least(0))          # >0: train on the first N images only (tests)
    # Activation checkpointing (recomputation, 重计算): full keeps only each block's input and recomputes the block in
    # backward; attention recomputes only the attention core (scores, softmax, weighted sum: Korthikanti et al.'s
    # selective recomputation). recompute_blocks: how many blocks, from the first, do it (0 = all).
    recompute: str = F("none", one_of("none", "full", "attention"))
    recompute_blocks: int = F(0, at_least(0))


@dataclass
class SampleConfig:
    sampler: str = F("ddim", one_of("ddim", "ddpm", "euler", "heun"))   # euler / heun: diffusion.objective=flow
    ddim_steps: int = F(50, at_least(1))
    cfg_scale: float = F(3.0, at_least(0.0))
    eta: float = F(0.0, between(0.0, 1.0))         # DDIM eta (0 = deterministic, 1 = DDPM's variance)


@dataclass
class RunConfig:
    device: str = F("auto", one_of("auto", "cpu", "cuda"))
    results_dir: str = F("results/run", NONEMPTY)
    log_jsonl: str = F("", ANY)                    # default: <results_dir>/log.jsonl
    resume: str = F("", ANY)
    overwrite: bool = F(False, ANY)                # discard another run found in results_dir
    dist_timeout: float = F(300.0, at_least(1.0))  # seconds a collective may wait for another rank
    dump_grads: str = F("", ANY)                   # write every parameter's gradient of one step here (torch.save)
    dump_grads_step: int = F(0, at_least(0))       # ... of this step (synchronised, unscaled, before clipping)
    save_final: bool = F(True, ANY)                # false: no checkpoint at the end (measurement runs keep only logs)
    init_from: str = F("", ANY)                    # start from these weights (a checkpoint folder), step 0, fresh optimizer


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"]["betas"] = list(d["train"]["betas"])
        return d


_SECTIONS = {f.name: f.default_factory for f in fields(Config)}


def config_fields():
    """(section, key, type, Rule) for every field of every section."""
    for sec in fields(Config):
        cls = sec.default_factory
        hints = get_type_hints(cls)
        for f in fields(cls):
            yield sec.name, f.name, hints[f.name], f.metadata.get("rule")


for _sec, _key, _typ, _rule in config_fields():   # a new field without its rule fails at import
    if not isinstance(_rule, Rule):
        raise TypeError(f"config field {_sec}.{_key} has no Rule; declare it with F(default, rule) in config.py.")


def _coerce(section: str, key: str, value: Any, typ: Any, source: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or say why not (a boolean is not a number)."""
    where = f"{section}.{key}={value!r} ({source})"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} is not a boolean; use true or false.")
    if typ in (int, float):
        kind = "an integer; give a whole number" if typ is int else "a number; give e.g. 1e-3"
        if isinstance(value, bool) or isinstance(value, (list, dict, tuple)) or value is None:
            raise ConfigError(f"{where} is not {kind}.")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is not {kind}.") from None
        if not math.isfinite(f):
            raise ConfigError(f"{where} is not finite; give {kind.split('; give ')[1]}.")
        if typ is float:
            return f
        if isinstance(value, int):
            return value                  # exact, however large (float would round it)
        if f != int(f):
            raise ConfigError(f"{where} is not {kind}.")
        return int(f)
    if typ is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[]").split(",") if v.strip()]
        try:
            if any(isinstance(v, bool) for v in value):
                raise TypeError
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is not a list of numbers; give e.g. [0.9, 0.999].") from None
        if not all(math.isfinite(v) for v in out):
            raise ConfigError(f"{where} is not a list of finite numbers; give e.g. [0.9, 0.999].")
        return out
    if isinstance(value, (list, dict, tuple)) or value is None:
        raise ConfigError(f"{where} is not a single value; give one word or path.")
    return str(value)


def apply_value(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
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
        except UnicodeDecodeError:
            raise ConfigError(f"Config file '{path}' is not a text file; pass a YAML config such as "
                              f"configs/tiny.yaml.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must be a mapping of sections (model:, train:, ...).")
        for section, body in raw.items():
            if not isinstance(body, dict):
                raise ConfigError(
                    f"Config section '{section}' in '{path}' must be a mapping of keys, got {body!r}.")
            for key, value in body.items():
                apply_value(cfg, section, key, value, str(path))
    for dotted, value in (overrides or {}).items():
        if "." not in dotted:
            raise ConfigError(f"Override '{dotted}' must look like section.key=value, e.g. train.lr=1e-3.")
        section, key = dotted.split(".", 1)
        apply_value(cfg, section, key, value, "override")
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
    # One rule per field (type was checked on the way in), then the rules that tie fields together.
    defaults = Config()
    for sec, key, _typ, rule in config_fields():
        v = getattr(getattr(cfg, sec), key)
        default = getattr(getattr(defaults, sec), key)       # always inside its own rule: a value that works
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        _check(rule.ok(v), f"{sec}.{key}={v!r} must be {rule.need}; give another value, e.g. the default "
                           f"(--set {sec}.{key}={default}).")
    m, d, t, s = cfg.model, cfg.diffusion, cfg.train, cfg.sample
    _check(m.image_size % m.patch_size == 0,
           f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}; "
           f"use a divisor such as 2, 4, 7 or 14.")
    _check(m.hidden_size % m.num_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
           f"choose heads that divide the hidden size.")
    _check((m.hidden_size // m.num_heads) % 2 == 0 and m.hidden_size % 4 == 0,
           f"model.hidden_size={m.hidden_size} must be a multiple of 4 with an even head size "
           f"(2-D sin-cos position embedding); use e.g. 64, 96, 128.")
    _check(m.pos_embed != "rope2d" or (m.hidden_size // m.num_heads) % 4 == 0,
           f"model.pos_embed=rope2d rotates pairs of channels by the row and by the column, so the head size "
           f"{m.hidden_size // m.num_heads} (model.hidden_size / model.num_heads) must be a multiple of 4; change "
           f"the heads or the hidden size.")
    _check(t.recompute_blocks <= m.depth,
           f"train.recompute_blocks={t.recompute_blocks} is more than model.depth={m.depth} blocks; use at most "
           f"{m.depth} (0 = all).")
    _check(int(m.hidden_size * m.mlp_ratio) >= 1,
           f"model.mlp_ratio={m.mlp_ratio} leaves the MLP int({m.hidden_size} x {m.mlp_ratio}) = 0 hidden units; "
           f"use e.g. 4.0.")
    _check(m.num_experts == 0 or m.top_k <= m.num_experts,
           f"model.top_k={m.top_k} is larger than model.num_experts={m.num_experts}: a token cannot go to more "
           f"experts than there are; use top_k <= {m.num_experts}.")
    _check(d.beta_start < d.beta_end,
           f"diffusion.beta_start={d.beta_start} and beta_end={d.beta_end} must satisfy start < end.")
    _check(t.global_batch_size % t.grad_accum == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by train.grad_accum={t.grad_accum}; "
           f"make the batch a multiple of the accumulation steps.")
    flow_sampler = s.sampler in ("euler", "heun")
    _check((d.objective == "flow") == flow_sampler,
           f"sample.sampler={s.sampler} does not sample diffusion.objective={d.objective}; use "
           + ("euler or heun (an ODE solver) with objective flow." if d.objective == "flow"
              else "ddim or ddpm with objective eps, v or x0 (euler and heun need objective flow)."))
    _check(d.weighting == "none" or d.objective != "flow",
           f"diffusion.weighting={d.weighting} is defined through the SNR of a noise schedule, which flow has not; "
           f"use weighting none with objective flow.")
    _check(s.ddim_steps <= d.timesteps,
           f"sample.ddim_steps={s.ddim_steps} must be between 1 and diffusion.timesteps={d.timesteps}.")
