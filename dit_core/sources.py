"""The training data data.source names, behind one call: `load_data(cfg, split, device)`.

    mnist           handwritten digits (data.py): 28 x 28 x 1, 10 classes
    fashion_mnist   Zalando's clothing images: 28 x 28 x 1, 10 classes, obtained as MNIST is (below)
    folder          your own images, an ImageFolder tree at data.path (folder.py): model.image_size, RGB or grey
    latents         that folder encoded once by the VAE at data.vae (latents.py): model.image_size is the latent side

Whatever the source, the object returned has MNIST's interface (images, labels, channels, num_classes, name,
`gather(indices, flips)`, `to(device)`, `len`), and `check_data_fits` checks the model against it.

Fashion-MNIST, in order: the cache `<DIT_DATA_DIR>/fashion_mnist.npz`; torchvision's download; the files of the Debian
package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/*.gz`). The package recompressed Zalando's .gz
files, so the .gz bytes differ from the official ones while the IDX files inside do not: those are checked (sha256
below, whose MD5s are the ones torchvision lists for the official uncompressed files), then the arrays, as MNIST's.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .data import MNIST, SHAPES, data_dir, fetch_first, load_mnist, read_cache, split_of, verify_arrays
from .errors import DataError
from .folder import load_folder
from .latents import load_latents

FASHION_CACHE = "fashion_mnist.npz"
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_IDX = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
               "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
FASHION_IDX_SHA256 = {      # the uncompressed official IDX files
    "train_x": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train_y": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "test_x": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "test_y": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_ARRAY_SHA256 = {    # the C-contiguous uint8 bytes of each array (what the cache is checked against)
    "train_x": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
    "train_y": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "test_x": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
    "test_y": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}
FASHION_WORDS = dict(hashes=FASHION_ARRAY_SHA256, shapes=SHAPES, what="Fashion-MNIST",
                     ref="the real Fashion-MNIST bytes")


class FashionMNIST(MNIST):
    """Fashion-MNIST: MNIST's shapes and interface, Zalando's ten kinds of clothing."""
    name = "Fashion-MNIST"
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")


def read_idx(blob: bytes, source: str) -> np.ndarray:
    """An IDX file (ubyte): magic 0x0000080<dims>, the dims as big-endian int32, then the bytes."""
    if len(blob) < 4 or blob[:3] != b"\0\0\x08":
        raise DataError(f"{source} is not an IDX ubyte file; reinstall dataset-fashion-mnist.")
    dims = np.frombuffer(blob, ">i4", count=blob[3], offset=4)
    return np.frombuffer(blob, np.uint8, offset=4 + 4 * blob[3]).reshape(dims)


def from_debian(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for key, name in FASHION_IDX.items():
        path = folder / f"{name}.gz"
        if not path.is_file():
            raise DataError(f"'{path}' is not there (apt-get install dataset-fashion-mnist puts it there)")
        blob = gzip.open(path).read()
        if hashlib.sha256(blob).hexdigest() != FASHION_IDX_SHA256[key]:
            raise DataError(f"'{path}' does not hold the official Fashion-MNIST bytes (sha256); reinstall "
                            f"dataset-fashion-mnist (apt-get install --reinstall dataset-fashion-mnist).")
        out[key] = read_idx(blob, f"'{path}'")
    return out


def from_torchvision(root: Path) -> dict[str, np.ndarray]:
    from torchvision.datasets import FashionMNIST as TV

    train, test = TV(str(root), train=True, download=True), TV(str(root), train=False, download=True)
    return {"train_x": train.data.numpy(), "train_y": train.targets.numpy().astype(np.uint8),
            "test_x": test.data.numpy(), "test_y": test.targets.numpy().astype(np.uint8)}


def ensure_fashion(verbose: bool = True) -> Path:
    """The cache of Fashion-MNIST, fetched and verified first if needed (torchvision, then the Debian package)."""
    root = data_dir()
    cache = root / FASHION_CACHE
    if cache.exists():
        return cache                   # verified where it is read (load_fashion)
    got, errors = fetch_first("Fashion-MNIST", cache, (
        ("torchvision download", lambda: from_torchvision(root / "torchvision")),
        (f"Debian package files in {FASHION_DEBIAN}", lambda: from_debian(FASHION_DEBIAN))),
        lambda arrays, name: verify_arrays(arrays, name, **FASHION_WORDS), verbose)
    if got is not None:
        return got
    raise DataError(
        f"Fashion-MNIST could not be obtained from torchvision's download nor from the Debian package's files "
        f"[{' | '.join(errors)}]; install them (apt-get install dataset-fashion-mnist), or put the four official "
        f"*-ubyte.gz files (github.com/zalandoresearch/fashion-mnist) in "
        f"{root / 'torchvision' / 'FashionMNIST' / 'raw'}, or set DIT_DATA_DIR to a folder holding {FASHION_CACHE}.")


def load_fashion(split: str = "train", device: str | torch.device = "cpu", subset: int = 0) -> FashionMNIST:
    def arrays():
        return read_cache(ensure_fashion(), lambda a, src: verify_arrays(a, src, **FASHION_WORDS), "Fashion-MNIST")
    return split_of(FashionMNIST, arrays, split, subset).to(device)


def load_data(cfg, split: str = "train", device: str | torch.device = "cpu", subset: int | None = None):
    """The data cfg.data names, on `device`: MNIST, Fashion-MNIST (a 'train' or 'test' split), or an image folder
    as pixels or VAE latents (one split: 'train'). `subset` (default train.train_subset): the first N images only."""
    d, m = cfg.data, cfg.model
    subset = cfg.train.train_subset if subset is None else subset
    if d.source == "mnist":
        return replace(load_mnist(split, "cpu", subset), flip=d.flip).to(device)
    if d.source == "fashion_mnist":
        return replace(load_fashion(split, "cpu", subset), flip=d.flip).to(device)
    if not d.path:
        raise DataError(f"data.source={d.source} reads an image folder, but data.path is empty; set it to a folder "
                        f"with one sub-folder of images per class (--set data.path=/data/pets).")
    if split != "train":
        raise DataError(f"An image folder (data.source={d.source}) has one split, train, not {split!r}; keep a "
                        f"held-out folder of your own and point data.path at it.")
    if d.source == "folder":
        data = load_folder(d.path, m.image_size, m.in_channels, d.flip)
    else:
        data = load_latents(d.path, d.vae, m.image_size, d.flip)
    if subset > len(data):
        raise DataError(f"train.train_subset={subset} is more than the {len(data)} images of {data.name}; use at "
                        f"most {len(data)} (0: all of them).")
    return (data.subset(subset) if subset else data).to(device)
