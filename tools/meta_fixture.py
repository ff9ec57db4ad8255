"""Make tests/fixtures/meta_dit/: what Meta's own DiT computes, recorded once, so that tests/test_convert.py proves
`dit_core.convert.from_meta` exact without Meta's code (CC BY-NC: never copied into this repository; the numbers it
computes are data).

    git -C <mirror of facebookresearch/DiT> show HEAD:models.py > /tmp/meta_dit/models.py
    python3 -m venv /tmp/metavenv && /tmp/metavenv/bin/pip install torch timm numpy
    /tmp/metavenv/bin/python tools/meta_fixture.py /tmp/meta_dit/models.py

Writes (about 0.3 MB):
  small.pt        a small Meta DiT (depth 2, hidden 32, 4 heads, patch 2, 8x8x4 input, 10 classes, learn_sigma) with
                  every weight drawn at random (Meta zero-initialises the modulation and the output layer, which would
                  make every output 0): its state dict, inputs (x, t, y) and Meta's outputs in eval mode of forward and
                  of forward_with_cfg (scale 4, on Meta's doubled batch [x, x], [t, t], [y, null])
  xl2_shapes.json DiT-XL/2's state-dict keys and shapes (built on the meta device: no memory, no weights) and its
                  trainable parameter count
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "meta_dit"
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10,
             class_dropout_prob=0.1, learn_sigma=True)


def import_meta(path: Path):
    spec = importlib.util.spec_from_file_location("meta_dit_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def randomise(model: torch.nn.Module, g: torch.Generator) -> None:
    """Every weight but the frozen sin-cos position embedding drawn at random, scaled by 1/sqrt(fan-in), so that every
    block, gate and output channel changes the output."""
    for name, p in model.named_parameters():
        if name == "pos_embed":
            continue
        std = 0.7 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.2
        p.copy_(torch.randn(p.shape, generator=g) * std)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models_py", help="Meta's models.py (a scratch copy outside this repository)")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    meta = import_meta(Path(a.models_py))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(38)

    model = meta.DiT(**SMALL)
    randomise(model, g)
    model.eval()
    n, c, s, k = 4, SMALL["in_channels"], SMALL["input_size"], SMALL["num_classes"]
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([3, 0, 9, k])                       # the last one is the null label
    scale = 4.0
    cfg_x, cfg_t, cfg_y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y.clamp(max=k - 1), torch.full_like(y, k)])
    with torch.no_grad():
        fwd = model(x, t, y)
        cfg = model.forward_with_cfg(cfg_x, cfg_t, cfg_y, scale)
    torch.save({"meta_kwargs": SMALL, "state_dict": {k_: v.clone() for k_, v in model.state_dict().items()},
                "x": x, "t": t, "y": y, "forward": fwd,
                "cfg_x": cfg_x, "cfg_t": cfg_t, "cfg_y": cfg_y, "cfg_scale": scale, "forward_with_cfg": cfg,
                "made_with": {"torch": str(torch.__version__), "timm": str(sys.modules["timm"].__version__)}},
               out / "small.pt")

    with torch.device("meta"):
        xl = meta.DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    shapes = {k_: list(v.shape) for k_, v in xl.state_dict().items()}
    trainable = sum(q.numel() for q in xl.parameters() if q.requires_grad)
    head = {"model": "DiT-XL/2", "input_size": 32, "num_classes": 1000, "trainable_parameters": trainable}
    lines = ",\n".join(f"  {json.dumps(k_)}: {json.dumps(v)}" for k_, v in shapes.items())   # one key a line
    (out / "xl2_shapes.json").write_text(json.dumps(head)[:-1] + f', "shapes": {{\n{lines}\n}}}}\n')
    print(f"wrote {out}: small.pt ({(out / 'small.pt').stat().st_size:,} bytes; |forward| max "
          f"{fwd.abs().max():.3f}), xl2_shapes.json ({len(shapes)} keys, {trainable:,} trainable parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
