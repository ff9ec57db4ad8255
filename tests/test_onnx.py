"""The denoiser exported to ONNX and run by onnxruntime: the same outputs, and the same digits sampled."""
import torch

from conftest import perturbed_dit as perturbed
from dit_core.config import load_config
from dit_core.diffusion import Diffusion
from dit_core.export import OnnxDenoiser, export_onnx, max_difference


def test_onnxruntime_matches_pytorch_and_samples_the_same_digits(tmp_path):
    for pos in ("sincos", "rope2d"):
        cfg = load_config("configs/tiny.yaml", {"model.pos_embed": pos})
        model = perturbed(cfg).eval()
        session = OnnxDenoiser(export_onnx(model, tmp_path / f"{pos}.onnx"), cfg.model)
        out_scale = model(torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999]), torch.arange(4)).abs().max()
        assert out_scale > 0.1                                     # the outputs are not trivially zero
        assert max_difference(model, session, batch=16) <= 1e-5    # another batch size than exported (dynamic)
        d, labels = Diffusion(cfg.diffusion), torch.arange(4)
        a = d.sample(model, labels, cfg_scale=3.0, steps=10, seed=0)
        b = d.sample(session, labels, cfg_scale=3.0, steps=10, seed=0)
        assert (a - b).abs().max() <= 1e-4
