"""The trained denoiser as an ONNX graph, run by onnxruntime, and digits sampled with it.

    python -m dit_core.export results/demo/checkpoint-6000 dit.onnx       # export, check, sample a grid

`torch.onnx.export` traces the DiT's forward (x_t, t, y) -> prediction into an ONNX graph with a dynamic batch;
onnxruntime runs it on the CPU without PyTorch. `OnnxDenoiser` gives that session the two members the samplers use
(`cfg` and `forward_with_cfg`, the DiT's own guidance code), so `Diffusion.sample` samples with the exported
graph exactly as with the module. Needs the `onnx` extra: pip install -e ".[onnx]".
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .model import DiT
from .checkpoint import model_from_checkpoint
from .diffusion import Diffusion
from .plots import sample_grid


def _need():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the onnx extra ({e.name} is not installed); install it with "
                          f"pip install -e \".[onnx]\".") from None


def export_onnx(model: DiT, path: str | Path, batch: int = 2) -> Path:
    """Write the denoiser's forward as ONNX (opset 18+, dynamic batch); returns the path."""
    _need()
    model = model.eval().float().cpu()
    c = model.cfg
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size)
    t = torch.arange(batch) * 100
    y = torch.arange(batch) % c.num_classes
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    path = Path(path)
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")       # the exporter's notes on dynamic-axis names
        torch.onnx.export(model, (x, t, y), str(path), input_names=["x", "t", "y"], output_names=["out"],
                          dynamic_shapes={"x": {0: batch_dim}, "t": {0: batch_dim}, "y": {0: batch_dim}},
                          dynamo=True, external_data=False, verbose=False)
    return path


class OnnxDenoiser:
    """An onnxruntime session with the DiT's sampling interface: `cfg`, `model(x, t, y)` and its guidance."""

    forward_with_cfg = DiT.forward_with_cfg          # the module's own classifier-free guidance, reused

    def __init__(self, path: str | Path, cfg):
        _need()
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.cfg = cfg

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feeds = {"x": x.detach().cpu().float().numpy(), "t": t.detach().cpu().long().numpy(),
                 "y": y.detach().cpu().long().numpy()}
        out = self.session.run(["out"], feeds)[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)


def max_difference(model: DiT, onnx_model: OnnxDenoiser, batch: int = 16, seed: int = 0) -> float:
    """The largest |PyTorch - onnxruntime| over one batch of random inputs (another batch size than exported)."""
    c = model.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, c.num_classes + 1, (batch,), generator=g)      # the null label too
    with torch.no_grad():
        ref = model.eval()(x, t, y)
    return float((ref - onnx_model(x, t, y)).abs().max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--grid", help="also sample 10 digits per class with onnxruntime into this PNG")
    a = p.parse_args(argv)
    for flag, path, suffix in (("out", a.out, ".onnx"), ("--grid", a.grid, ".png")):   # before the export's work
        if path is None:
            continue
        if Path(path).is_dir() or not Path(path).resolve().parent.is_dir():
            raise ConfigError(f"{flag} '{path}' is a folder or in a folder that does not exist; give a file path in "
                              f"an existing folder.")
        if Path(path).suffix.lower() != suffix:
            raise ConfigError(f"{flag} '{path}' should end in {suffix}; e.g. {Path(path).with_suffix(suffix)}.")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the onnx extra (onnx, onnxruntime, onnxscript); install it with "
                          "pip install -e \".[onnx]\".") from None
    model, cfg = model_from_checkpoint(Path(a.checkpoint))
    export_onnx(model, a.out)
    session = OnnxDenoiser(a.out, cfg.model)
    print(f"exported {a.out} ({Path(a.out).stat().st_size / 2**20:.1f} MiB); max |torch - onnxruntime| = "
          f"{max_difference(model, session):.2e}")
    if a.grid:
        d = Diffusion(cfg.diffusion)
        imgs = d.sample(session, torch.arange(10).repeat_interleave(10), cfg_scale=cfg.sample.cfg_scale,
                        sampler=cfg.sample.sampler, steps=cfg.sample.ddim_steps, seed=0)
        sample_grid(imgs, a.grid, nrow=10, title="sampled with onnxruntime")
        print(f"wrote {a.grid}")
    return 0


if __name__ == "__main__":
    from .process import run_main
    run_main(main)
