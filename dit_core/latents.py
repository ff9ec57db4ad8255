"""VAE latents: an image folder encoded once by a diffusers AutoencoderKL, as Meta's DiT trains (Stable Diffusion's VAE,
256 px images -> 32 x 32 x 4 latents).

Meta's train.py encodes every batch afresh and draws a new sample of the VAE's posterior each time; fast-DiT encodes
once. Here it is encoded once too, so the data are fixed and every step's global batch stays a pure function of
(seed, step): each image's latent is one sample of its posterior drawn with a CPU generator seeded by the image's
place and view (the same on any device and any encoding batch), times the VAE's scaling factor (0.18215 for the
sd-vae-ft-* VAEs Meta uses). With data.flip the mirrored image is encoded as a second latent (fast-DiT's way): a
latent's mirror is not the mirror's latent. model.image_size is the latent's side; the images are cropped to it
times the VAE's downsampling factor (2 per extra encoder block: 8 for Stable Diffusion's).

The cache `<DIT_DATA_DIR>/latents/<folder name>-<key>.npz` is keyed by the folder's key (folder.py: names, sizes,
modification times), the crop, data.flip and the VAE's identity (its config.json without diffusers' private `_`
entries, and the sha256 of its weight files): another VAE gets another file, built on first use. A file at that name
that records another VAE (copied by hand) is refused in one sentence.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .batch import mix_seed
from .data import read_cache, sha256_file, write_cache
from .errors import DataError
from .folder import MODES, ImageSet, build_lock, cache_file, decode, recorded, scan, with_hashes

_LATENT_STREAM = 5                  # apart from the batch streams: the posterior samples of the cache
WEIGHTS = ("*.safetensors", "*.bin")
_IDENTITY: dict = {}                # (file, size, mtime) of a VAE's files -> its identity, once per process


def vae_folder(name: str) -> Path:
    """data.vae as a local folder holding config.json and weights: the folder itself, its `vae/` sub-folder (a whole
    Stable Diffusion pipeline), or a Hugging Face hub name fetched where the hub is reachable."""
    if not name:
        raise DataError("data.source=latents needs data.vae, the VAE that encodes the images: a local diffusers "
                        "AutoencoderKL folder (e.g. --set data.vae=/models/sd-vae-ft-ema).")
    p = Path(name).expanduser()
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        try:
            from huggingface_hub import snapshot_download
            p = Path(snapshot_download(name, allow_patterns=["config.json", *WEIGHTS]))
        except Exception as e:
            raise DataError(f"data.vae='{name}' is no local folder and the Hugging Face hub did not give it "
                            f"({e.__class__.__name__}); download it where the hub is reachable (huggingface-cli "
                            f"download {name} --local-dir DIR) and set data.vae=DIR.") from None
    for d in (p, p / "vae"):
        if (d / "config.json").is_file():
            if not any(f for pat in WEIGHTS for f in d.glob(pat)):
                raise DataError(f"The VAE folder '{d}' holds a config.json but no weights ({', '.join(WEIGHTS)}); "
                                f"save the VAE whole (AutoencoderKL.save_pretrained) or point data.vae elsewhere.")
            return d
    why = "no config.json there" if p.is_dir() else "no such folder"
    raise DataError(f"data.vae='{name}' is not a VAE folder ({why}); point it at a diffusers AutoencoderKL saved "
                    f"with save_pretrained, e.g. stabilityai/sd-vae-ft-ema downloaded to a folder.")


def vae_identity(folder: Path) -> tuple[dict, str]:
    """The VAE's config and a hash of what it computes: its config (diffusers' private entries, such as the version
    that saved it, left out) and its weight files' bytes."""
    files = sorted(f for pat in WEIGHTS for f in folder.glob(pat))
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in [folder / "config.json", *files])
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise DataError(f"The VAE folder '{folder}' holds a {config['_class_name']}, not an AutoencoderKL; point "
                        f"data.vae at one (e.g. stabilityai/sd-vae-ft-ema).")
    if stamp not in _IDENTITY:
        public = {k: v for k, v in config.items() if not k.startswith("_")}
        h = hashlib.sha256(json.dumps(public, sort_keys=True).encode())
        for f in files:
            h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
        _IDENTITY[stamp] = h.hexdigest()
    return config, _IDENTITY[stamp]


def encode(pixels: np.ndarray, folder: Path, flip: bool, scale: float, batch: int = 32) -> dict:
    """uint8 (N, C, S, S) -> {"images": latents (N, c, S/f, S/f) float32[, "flipped": those of the mirrored images]}:
    one posterior sample per image and view, times `scale`, encoded on the GPU where there is one."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError("data.source=latents encodes the images with diffusers, which is not installed; install it "
                        "(pip install -e '.[latents]', or pip install diffusers).") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(str(folder)).to(device).eval()
    out = {}
    for view, name in ((0, "images"), (1, "flipped"))[:2 if flip else 1]:
        parts = []
        for s in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[s:s + batch]).to(device).float().div_(127.5).sub_(1.0)
            x = x.flip(-1) if view else x
            gens = [torch.Generator().manual_seed(mix_seed(_LATENT_STREAM, i, view)) for i in range(s, s + len(x))]
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample(generator=gens)
            parts.append(z.mul_(scale).float().cpu().numpy())
        out[name] = np.concatenate(parts)
    return out


def load_latents(path: str, vae: str, latent_size: int, flip: bool = False, verbose: bool = True) -> ImageSet:
    """The folder at `path` as VAE latents (N, c, latent_size, latent_size), encoded on the first call."""
    folder = vae_folder(vae)
    config, identity = vae_identity(folder)
    factor = 2 ** (len(config.get("block_out_channels", (0,))) - 1)
    side, scale = latent_size * factor, float(config.get("scaling_factor", 0.18215))
    if config.get("in_channels", 3) not in MODES:
        raise DataError(f"The VAE '{folder}' reads {config.get('in_channels')}-channel images; only 1 (greyscale) or "
                        f"3 (RGB) can be decoded from a folder: use another VAE.")
    tree = scan(path)
    cache, key = cache_file("latents", tree, side, config.get("in_channels", 3), flip, identity)
    keys = ("images", "labels") + (("flipped",) if flip else ())
    what = f"The latent cache of '{tree.root}'"
    if not cache.exists():
        with build_lock(cache.parent):
            if not cache.exists():
                t0 = time.perf_counter()
                need = f" (model.image_size={latent_size} latents x the VAE's downsampling {factor})"
                latents = encode(decode(tree, side, config.get("in_channels", 3), need), folder, flip, scale)
                labels = np.array([label for _, label in tree.files], np.int64)
                write_cache(cache, {**with_hashes({**latents, "labels": labels}), "key": np.array(key),
                                    "vae": np.array(identity), "scale": np.array(scale),
                                    "classes": np.array(tree.classes)})
                if verbose:
                    print(f"[data] encoded {len(labels)} images of '{tree.root}' ({len(latents)} view(s)) by the VAE "
                          f"'{folder}' in {time.perf_counter() - t0:.1f}s; cached at {cache}", file=sys.stderr,
                          flush=True)

    def check(arrays: dict, source: str) -> dict:
        if "vae" in arrays and str(arrays["vae"]) != identity:
            raise DataError(f"{what} at {cache} was encoded by another VAE than data.vae='{vae}' (identity "
                            f"{str(arrays['vae'])[:12]}..., not {identity[:12]}...); delete it so it is encoded "
                            f"again.")
        return recorded(arrays, keys, what, key, source)

    arrays = read_cache(cache, check, what, "encoded again")    # model.in_channels: check_data_fits
    return ImageSet(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]), len(tree.classes),
                    f"the latents of '{tree.root}' by the VAE '{folder}'", flip,
                    torch.from_numpy(arrays["flipped"]) if flip else None, tuple(str(c) for c in arrays["classes"]))


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae: str, batch: int = 16) -> torch.Tensor:
    """Latents as the cache holds them (times the VAE's scaling factor) -> images in [-1, 1] (N, C, S x f, S x f),
    decoded by the VAE at `vae` (data.vae) on the latents' device: how samples of a DiT trained on latents become
    pictures (Meta's sample.py: vae.decode(z / 0.18215))."""
    folder = vae_folder(vae)
    config, _ = vae_identity(folder)
    scale = float(config.get("scaling_factor", 0.18215))
    channels = config.get("latent_channels", 4)
    if latents.dim() != 4 or latents.shape[1] != channels:
        raise DataError(f"The VAE '{folder}' decodes {channels}-channel latents, not tensors of shape "
                        f"{tuple(latents.shape)}; pass the samples of a DiT trained on its latents.")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError("Decoding latents needs diffusers, which is not installed; install it (pip install -e "
                        "'.[latents]', or pip install diffusers).") from None
    model = AutoencoderKL.from_pretrained(str(folder)).to(latents.device).eval()
    parts = [model.decode(latents[s:s + batch].float() / scale).sample.clamp(-1, 1)
             for s in range(0, len(latents), batch)]
    return torch.cat(parts)
