"""Meta's DiT checkpoints (facebookresearch/DiT) in this project's DiT, and a checkpoint folder made of them.

    python -m dit_core.convert meta DiT-XL-2-256x256.pt results/meta-xl2
    python -m dit_core.evaluate ... / a launcher with --config configs/dit_xl2.yaml --set run.init_from=results/meta-xl2

`from_meta(state_dict)` returns the ModelConfig and the weights: the architecture is the same module for module
(model.pos_embed=sincos_meta, model.learn_sigma), so the weights only change names, and the output is Meta's (fp32, eval
mode; tests/test_convert.py checks it against outputs recorded with Meta's own code, tools/meta_fixture.py):

  Meta's state dict                     this project's DiT
  x_embedder.proj.weight, .bias         x_embedder.weight, .bias        (timm's PatchEmbed holds the conv as .proj)
  y_embedder.embedding_table.weight     y_embedder.table.weight         (num_classes + 1 rows: the null label last)
  pos_embed (a frozen parameter)        not saved: computed from the config (checked equal to Meta's, then dropped)
  everything else                       the same name and shape

The config comes from the shapes: hidden size, input channels and patch from the patch embedding, depth from the
blocks, the grid from pos_embed, the classes from the label table less its null row (Meta adds that row when
class_dropout_prob > 0, as in every model it released and train.py's default), learn_sigma from the output layer.
The number of heads cannot be read from any shape (every head's weights lie in one qkv matrix): it comes from
Meta's presets by (hidden size, depth) - DiT-S 6, B 12, L 16, XL 16 heads, whatever the patch - or from `num_heads`.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, nonfinite_entries, write_weights
from .config import Config, ConfigError, ModelConfig, load_config
from .model import DiT, count_parameters, sincos_pos_embed_2d
from .process import parser, run_main

# Meta's models.py presets: (hidden size, depth) -> (name, heads); each comes with patch 2, 4 and 8.
META_PRESETS = {(384, 12): ("S", 6), (768, 12): ("B", 12), (1024, 24): ("L", 16), (1152, 28): ("XL", 16)}
RENAME = {"x_embedder.proj.weight": "x_embedder.weight", "x_embedder.proj.bias": "x_embedder.bias",
          "y_embedder.embedding_table.weight": "y_embedder.table.weight"}
# The rest of a converted checkpoint's config: how Meta's train.py trains and its sample.py samples (configs/dit_*.yaml
# say the same).
META_RUN = {"data.source": "latents", "data.vae": "stabilityai/sd-vae-ft-ema", "data.flip": True,
            "train.global_batch_size": 256, "train.lr": 1e-4, "train.warmup_steps": 0, "train.min_lr_ratio": 1.0,
            "train.weight_decay": 0.0, "train.grad_clip": 0.0, "train.ema_decay": 0.9999, "train.max_steps": 400000,
            "train.log_every": 100, "train.ckpt_every": 50000, "sample.ddim_steps": 250, "sample.cfg_scale": 4.0}
FIX = "pass DiT-XL-2-256x256.pt (or -512x512), or a checkpoint of Meta's train.py"


def meta_name(cfg: ModelConfig) -> str:
    """'DiT-XL/2' for one of Meta's presets, else a description."""
    preset = META_PRESETS.get((cfg.hidden_size, cfg.depth))
    return (f"DiT-{preset[0]}/{cfg.patch_size}" if preset and preset[1] == cfg.num_heads else
            f"a DiT of hidden size {cfg.hidden_size}, depth {cfg.depth}, {cfg.num_heads} heads, patch {cfg.patch_size}")


def meta_weights(obj, part: str = "ema", where: str = "the state dict") -> dict:
    """The state dict in what torch.load gave: itself (a released model), or a train.py checkpoint's `part` ("ema", as
    Meta's find_model and sample.py take, or "model"; the other where it has only one)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a Meta DiT state dict; {FIX}.")
    parts = [k for k in (part, "ema", "model") if isinstance(obj.get(k), dict)]
    return obj[parts[0]] if parts else obj


def from_meta(state_dict: dict, num_heads: int | None = None, where: str = "the state dict",
              part: str = "ema") -> tuple[ModelConfig, dict]:
    """A Meta DiT state dict (or a train.py checkpoint: its `part`) -> (ModelConfig, state dict) that `DiT(config)`
    loads strictly and computes Meta's outputs with. `num_heads`: for a model that is none of Meta's presets."""
    sd = meta_weights(state_dict, part, where)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{where} is not a state dict (names -> tensors); {FIX}.")
    if "x_embedder.proj.weight" not in sd:
        if "x_embedder.weight" in sd:
            raise CheckpointError(f"{where} is already this project's layout (x_embedder.weight, not Meta's "
                                  f"x_embedder.proj.weight); it needs no conversion: load it as a model.pt.")
        first = next(iter(sd), None)
        raise CheckpointError(f"{where} is not a Meta DiT state dict: it has no x_embedder.proj.weight ({len(sd)} "
                              f"entries{f', the first {first!r}' if first else ''}); {FIX}.")
    cfg = meta_config(sd, num_heads, where)
    # (tensors on the meta device, shapes without values, are checked for their shapes only)
    bad = nonfinite_entries({k: v for k, v in sd.items() if not v.is_meta})
    if bad:
        raise CheckpointError(f"{where} holds non-finite weights ({', '.join(bad[:3])}); the model it was saved from "
                              f"had diverged: {FIX}.")
    out = {RENAME.get(k, k): v for k, v in sd.items() if k != "pos_embed"}
    check_pos_embed(sd["pos_embed"], cfg, where)
    with torch.device("meta"):
        want = DiT(cfg).state_dict()
    for k, v in want.items():
        if k not in out:
            raise CheckpointError(f"{where} has no {meta_key(k)}, which {meta_name(cfg)} has; it is not a whole "
                                  f"Meta DiT state dict: {FIX}.")
        if tuple(out[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where} holds {meta_key(k)} of shape {tuple(out[k].shape)}, but {meta_name(cfg)} "
                                  f"(read from its other shapes) has {tuple(v.shape)}; it is not one of Meta's DiTs: "
                                  f"{FIX}.")
    extra = [k for k in out if k not in want]
    if extra:
        raise CheckpointError(f"{where} holds {meta_key(extra[0])}, which Meta's DiT does not have ({len(extra)} such "
                              f"entries); it is not one of Meta's DiTs: {FIX}.")
    return cfg, {k: out[k] for k in want}


def meta_key(k: str) -> str:
    return {v: m for m, v in RENAME.items()}.get(k, k)


def meta_config(sd: dict, num_heads: int | None, where: str) -> ModelConfig:
    """The ModelConfig Meta's shapes say (heads: Meta's presets, or `num_heads`)."""
    def shape(key: str, dims: int) -> tuple:
        v = sd.get(key)
        if v is None or v.dim() != dims:
            got = "none" if v is None else f"shape {tuple(v.shape)}"
            raise CheckpointError(f"{where} holds {key} with {got}, where Meta's DiT has a {dims}-d tensor; {FIX}.")
        return tuple(v.shape)

    hidden, C, p, q = shape("x_embedder.proj.weight", 4)
    if p != q:
        raise CheckpointError(f"{where} holds x_embedder.proj.weight of shape {(hidden, C, p, q)}: a {p}x{q} patch, "
                              f"but Meta's DiT patches are square; {FIX}.")
    _, tokens, _ = shape("pos_embed", 3)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{where} holds pos_embed of {tokens} tokens, not a square grid; {FIX}.")
    depth = 1 + max((int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    rows, _ = shape("y_embedder.embedding_table.weight", 2)
    mlp, _ = shape("blocks.0.mlp.fc1.weight", 2)
    out, _ = shape("final_layer.linear.weight", 2)
    if out not in (p * p * C, 2 * p * p * C):
        raise CheckpointError(f"{where} holds final_layer.linear.weight with {out} outputs, but patch {p} and {C} "
                              f"channels give {p * p * C} (the noise) or {2 * p * p * C} (learn_sigma: noise and "
                              f"variance); it is not one of Meta's DiTs: {FIX}.")
    preset = META_PRESETS.get((hidden, depth))
    if num_heads is None:
        if preset is None:
            raise CheckpointError(
                f"{where} is a DiT of hidden size {hidden} and depth {depth}, none of Meta's presets (S 384/12, B "
                f"768/12, L 1024/24, XL 1152/28), and its number of heads cannot be read from its shapes; give it "
                f"(num_heads=N, or --num-heads N).")
        num_heads = preset[1]
    ratio = mlp / hidden
    cfg = ModelConfig(image_size=grid * p, in_channels=C, patch_size=p, hidden_size=hidden, depth=depth,
                      num_heads=num_heads, mlp_ratio=ratio, num_classes=rows - 1, pos_embed="sincos_meta",
                      learn_sigma=out == 2 * p * p * C)
    try:                                  # every rule of the config (heads dividing the hidden size, ...)
        load_config(None, {f"model.{k}": v for k, v in cfg.__dict__.items()})
    except ConfigError as e:
        raise CheckpointError(f"{where} gives a model this project cannot build ({e}).") from None
    if int(hidden * ratio) != mlp or rows < 2:
        raise CheckpointError(f"{where} holds an MLP of {mlp} units or a label table of {rows} rows that no config "
                              f"gives; it is not one of Meta's DiTs: {FIX}.")
    return cfg


def check_pos_embed(pos: torch.Tensor, cfg: ModelConfig, where: str) -> None:
    """Meta's frozen pos_embed is the sin-cos embedding sincos_meta computes: anything else (a learned embedding, the
    row-first layout) would be lost by dropping it, so it is refused."""
    if pos.is_meta:
        return
    mine = sincos_pos_embed_2d(cfg.hidden_size, cfg.image_size // cfg.patch_size, column_first=True)
    diff = (pos.float().reshape(mine.shape) - mine).abs().max().item()
    if diff > 1e-5:
        raise CheckpointError(f"{where} holds a pos_embed that differs from Meta's fixed sin-cos embedding by up to "
                              f"{diff:.3g}, so it cannot be recomputed from the config; {FIX}.")


def meta_checkpoint_config(model: ModelConfig) -> Config:
    """The whole config a converted checkpoint carries: the model, and Meta's training and sampling settings."""
    return load_config(None, {**META_RUN, **{f"model.{k}": v for k, v in model.__dict__.items()}})


def read_meta(path: Path) -> object:
    """torch.load of Meta's file, weights only (a train.py checkpoint also holds its argparse Namespace)."""
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist; {FIX} (download: https://dl.fbaipublicfiles.com/DiT/models/"
                              f"DiT-XL-2-256x256.pt).")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"'{path}' cannot be read as a PyTorch file ({e.__class__.__name__}); {FIX}.") from None


def convert_meta(src: str | Path, dst: str | Path, num_heads: int | None = None) -> tuple[Path, Config]:
    """Meta's file -> a checkpoint folder at step 0 (model.pt, ema.pt, training_state.json, manifest.json): a train.py
    checkpoint gives its "model" and "ema", a released model the same weights to both."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"'{dst}' already exists; pass a new folder to write the converted checkpoint into.")
    obj = read_meta(src)
    cfg, ema = from_meta(obj, num_heads, f"'{src}'", "ema")
    cfg_model, model = from_meta(obj, num_heads, f"'{src}'", "model")      # the same as ema where there is one
    if cfg_model != cfg:
        raise CheckpointError(f"'{src}' holds 'model' and 'ema' weights of two different models; {FIX}.")
    full = meta_checkpoint_config(cfg)
    write_weights(dst, {"model.pt": lambda f: torch.save(model, f), "ema.pt": lambda f: torch.save(ema, f)},
                  {"step": 0, "samples_seen": 0, "engine": "torch", "weights_only": True, "meta_source": str(src),
                   "config": full.to_dict()}, str(src), "convert again")
    return dst, full


def main(argv=None) -> int:
    """`python -m dit_core.convert meta IN.pt OUT_DIR [--num-heads N]`."""
    p = parser(prog="python -m dit_core.convert")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("meta", help="Meta's DiT (DiT-XL-2-256x256.pt or a train.py checkpoint) -> a checkpoint folder")
    m.add_argument("src")
    m.add_argument("dst")
    m.add_argument("--num-heads", type=int, help="for a model that is none of Meta's presets (S, B, L, XL)")

    def run(_):
        args = p.parse_args(argv)
        out, cfg = convert_meta(args.src, args.dst, args.num_heads)
        with torch.device("meta"):
            n = count_parameters(DiT(cfg.model))
        print(f"wrote {out} (model.pt, ema.pt, training_state.json): {meta_name(cfg.model)}, {n:,} parameters, "
              f"{cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.in_channels} inputs, {cfg.model.num_classes} "
              f"classes; fine-tune it with --set run.init_from={out}")
    run_main(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
