"""Your own images: an ImageFolder tree (one sub-folder per class), decoded once into a cached uint8 tensor file.

    data.path/
        cat/001.png, cat/002.jpg, ...      class 0 (class names sorted: their order is the labels)
        dog/...                            class 1

Each image is made square as Meta's DiT train.py (after ADM) does: halved with a box filter while its short side
is still at least twice the target, resized (bicubic) so the short side is the target, and cut to the centre square.
It is decoded as RGB or greyscale (model.in_channels 3 or 1) and stored, with the labels, in
`<DIT_DATA_DIR>/folders/<folder name>-<key>.npz`. The key hashes every image's path inside the folder, its size in
bytes and its modification time (nanoseconds), not its bytes: a stat per file, so a folder of a million images
starts in seconds. Any file added, removed, renamed, rewritten or touched gets a new key and is decoded again; a
file rewritten with the same size and its old time put back is not noticed (touch it). The cache is written whole
or not at all, and checked against the hashes it records when read. The data are then fixed, so every step's
global batch is still a pure function of (seed, step) and every launcher's parity holds.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .data import data_dir, flip_where, read_cache, verify_arrays, write_cache
from .errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")   # torchvision's ImageFolder's
FORMAT = "folder-v1"            # part of every cache key: a change to the decoding below changes it
MODES = {1: "L", 3: "RGB"}      # model.in_channels -> how PIL decodes


@dataclass
class Tree:
    root: Path
    classes: list[str]
    files: list[tuple[str, int]]      # (path relative to root, label), classes in order, files sorted within each
    key: str                          # sha256 of every file's relative path, size and modification time


def scan(path: str) -> Tree:
    """The classes and image files of an ImageFolder tree, and its key; one sentence for a tree that is none."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path='{path}' is not a folder; point it at an image folder with one sub-folder per "
                        f"class (e.g. data.path=/data/pets holding cat/ and dog/).")
    # Hidden folders (.ipynb_checkpoints, .git) are no classes.
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files, h = [], hashlib.sha256()
    def unreadable(e: OSError):
        raise DataError(f"'{e.filename}' inside data.path cannot be read ({e.strerror or e.__class__.__name__}); "
                        f"fix its permissions or move it out of data.path.")

    for label, name in enumerate(classes):
        found, seen = [], set()
        for dirpath, dirnames, names in os.walk(root / name, followlinks=True, onerror=unreadable):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:        # a link back up the tree would list its images again, forever
                raise DataError(f"'{dirpath}' is a link to a folder already read (a loop); remove the link from "
                                f"data.path.")
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath, n) for n in names if n.lower().endswith(EXTENSIONS) and not n.startswith(".")]
        if not found:
            raise DataError(f"The class folder '{root / name}' holds no images ({', '.join(EXTENSIONS)}); add some or "
                            f"move it out of data.path (every sub-folder of data.path is a class).")
        for f in sorted(found):
            try:
                rel, st = f.relative_to(root).as_posix(), f.stat()
            except OSError as e:
                raise DataError(f"'{f}' is a broken link or cannot be read ({e.strerror or e.__class__.__name__}); "
                                f"remove it from data.path or fix it.") from None
            files.append((rel, label))
            h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if not files:
        raise DataError(f"data.path='{path}' holds no class sub-folders with images ({', '.join(EXTENSIONS)}); put "
                        f"each class's images in a sub-folder of its own, e.g. {root / 'cat' / '001.png'}.")
    return Tree(root, classes, files, h.hexdigest())


def centre_square(img, size: int):
    """`img` (PIL) as a size x size square: ADM's crop, which Meta's DiT uses. Halving with a box filter first keeps
    a large photo's bicubic resize from aliasing (and fast); the last resize makes the short side exactly `size`."""
    from PIL import Image
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode(tree: Tree, size: int, channels: int, need: str = "") -> np.ndarray:
    """Every image of `tree` as uint8 (N, channels, size, size). An image whose short side is below `size` is
    refused (it would be enlarged, and learned blurred), as is one that does not decode; each names its file."""
    from PIL import Image, UnidentifiedImageError
    out = np.empty((len(tree.files), channels, size, size), np.uint8)
    for i, (rel, _) in enumerate(tree.files):
        path = tree.root / rel
        try:
            with Image.open(path) as img:
                if img.mode.startswith("I;16"):           # 16-bit greyscale: its top 8 bits (convert would clip at 255)
                    img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
                elif img.mode in ("I", "F"):
                    raise DataError(f"'{path}' holds {'32-bit integer' if img.mode == 'I' else 'floating-point'} "
                                    f"pixels (mode {img.mode}), whose range is not known; convert it to an 8-bit "
                                    f"image (PNG or JPEG).")
                img = img.convert(MODES[channels])       # alpha dropped, palettes expanded, as ImageFolder's loader
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise DataError(f"'{path}' cannot be decoded as an image ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); delete or replace it.") from None
        if min(img.size) < size:
            raise DataError(f"'{path}' is {img.width}x{img.height} pixels, smaller than the {size} x {size} square "
                            f"the data need{need or f' (model.image_size={size})'}; remove it, or lower "
                            f"model.image_size.")
        out[i] = np.asarray(centre_square(img, size)).reshape(size, size, channels).transpose(2, 0, 1)
    return out


@contextmanager
def build_lock(root: Path):
    """One process at a time builds a cache under `root`: the ranks of a run all load the data, the first builds,
    the others wait and read its file, so every rank trains on the same bytes."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def recorded(arrays: dict, keys: tuple, what: str, key: str, source: str, again: str = "rebuilt") -> dict:
    """Check a cache this package wrote: its key (what it was built from) and the sha256 it records of each array."""
    if "key" not in arrays or str(arrays["key"]) != key:
        raise DataError(f"{what} from {source} was built from other data than its name says; delete it so it is "
                        f"{again}.")
    hashes = {k: str(arrays[f"{k}_sha256"]) for k in keys if f"{k}_sha256" in arrays}
    shapes = {k: arrays[k].shape for k in keys if k in arrays}
    if set(hashes) != set(keys) or set(shapes) != set(keys):
        raise DataError(f"{what} from {source} lacks arrays or their hashes; delete it so it is {again}.")
    return {**arrays, **verify_arrays(arrays, source, hashes, shapes, what, "the hash it recorded", again, False)}


def with_hashes(arrays: dict) -> dict:
    return {**arrays, **{f"{k}_sha256": np.array(hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest())
                         for k, v in arrays.items()}}


@dataclass
class ImageSet:
    """A decoded source: images as uint8 pixels (N, C, S, S), or VAE latents as float32 (N, C, s, s); labels int64
    (N,). `flip` (data.flip): `gather` mirrors the samples the global batch marks, or for latents takes `flipped`,
    the latents of the mirrored images. MNIST's interface, which the loop, the fast path and Accelerate's stream use."""
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str                             # how check_data_fits names the data
    flip: bool = False
    flipped: torch.Tensor | None = None
    classes: tuple = ()

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ImageSet":
        return replace(self, images=self.images.to(device), labels=self.labels.to(device),
                       flipped=None if self.flipped is None else self.flipped.to(device))

    def subset(self, n: int) -> "ImageSet":
        return replace(self, images=self.images[:n], labels=self.labels[:n],
                       flipped=None if self.flipped is None else self.flipped[:n])

    def gather(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch (B, C, H, W) on the data's device: pixels in [-1, 1], or latents as stored; and the labels."""
        idx = idx.to(self.images.device, non_blocking=True)
        x = self.images.index_select(0, idx)
        x = x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x
        other = None if self.flipped is None else self.flipped.index_select(0, idx)
        return flip_where(x, flip if self.flip else None, other), self.labels.index_select(0, idx)


def cache_file(kind: str, tree: Tree, *parts) -> tuple[Path, str]:
    """Where the cache of `tree` built with `parts` lives, and its key (a hash of the tree's key and the parts)."""
    key = hashlib.sha256("\0".join(map(str, (FORMAT, kind, tree.key, *parts))).encode()).hexdigest()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in tree.root.resolve().name)[:40] or "folder"
    return data_dir() / kind / f"{stem}-{key[:16]}.npz", key


def load_folder(path: str, size: int, channels: int, flip: bool = False, verbose: bool = True) -> ImageSet:
    """The ImageFolder tree at `path` as uint8 (N, channels, size, size), decoded on the first call, then read from
    the cache."""
    if channels not in MODES:
        raise DataError(f"model.in_channels={channels} cannot be read from an image folder; use 3 (RGB) or 1 "
                        f"(greyscale).")
    tree = scan(path)
    cache, key = cache_file("folders", tree, size, MODES[channels])
    what = f"The image cache of '{tree.root}'"
    if not cache.exists():
        with build_lock(cache.parent):
            if not cache.exists():                    # another rank may have built it while this one waited
                t0 = time.perf_counter()
                images = decode(tree, size, channels)
                labels = np.array([label for _, label in tree.files], np.int64)
                write_cache(cache, {**with_hashes({"images": images, "labels": labels}), "key": np.array(key),
                                    "classes": np.array(tree.classes)})
                if verbose:
                    print(f"[data] decoded {len(images)} images of '{tree.root}' in {time.perf_counter() - t0:.1f}s; "
                          f"cached at {cache}", file=sys.stderr, flush=True)
    arrays = read_cache(cache, lambda a, src: recorded(a, ("images", "labels"), what, key, src), what, "rebuilt")
    return ImageSet(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]), len(tree.classes),
                    f"the folder '{tree.root}'", flip, None, tuple(str(c) for c in arrays["classes"]))
