"""Does the DiT draw digits? A small CNN reads them.

* accuracy per class: CFG samples of class k should be read as k;
* a Frechet distance between the classifier's 128-d features of generated and
  of real training digits, printed beside the floor of the same measure
  (real test digits vs the same real training digits, same count).

    python -m dit_core.evaluate --checkpoint results/demo/checkpoint-2000
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import data_dir, load_mnist
from .scratch import write_atomic

CLASSIFIER_FILE = "classifier-v1.pt"


class MnistCNN(nn.Module):
    """Two conv blocks and an MLP: >= 99% test accuracy after three epochs."""

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


@torch.no_grad()
def classifier_accuracy(clf: nn.Module, device) -> float:
    test = load_mnist("test", device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for s in _batches(len(test), 1000):
        x, y = test.gather(torch.arange(s.start, s.stop))
        correct += (clf(x).argmax(1) == y).sum()
    return correct.item() / len(test)


@torch.enable_grad()
def train_classifier(device="cpu", epochs: int = 3, seed: int = 0, verbose: bool = True,
                     images: torch.Tensor | None = None, labels: torch.Tensor | None = None
                     ) -> tuple[MnistCNN, float]:
    """The evaluation CNN, trained on the MNIST training set, or on `images` in [-1, 1] with
    `labels` (train-on-generated); returns it with its accuracy on the real test set."""
    torch.manual_seed(seed)
    if images is None:
        data = load_mnist("train", device)
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
            # +-2 pixel shifts: the classifier must read generated digits that are not perfectly centred
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
    return clf, classifier_accuracy(clf, device)


def load_classifier(device="cpu", verbose: bool = True) -> tuple[MnistCNN, float]:
    """The cached classifier (trained once, ~1 minute on 2 CPU cores) and its test accuracy."""
    path = data_dir() / CLASSIFIER_FILE
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
        print("[classifier] training the MNIST classifier used for evaluation ...", file=sys.stderr, flush=True)
    clf, acc = train_classifier(device, verbose=verbose)
    write_atomic(path, lambda tmp: torch.save({"state_dict": clf.state_dict(), "test_accuracy": acc}, tmp))
    return clf, acc


@torch.no_grad()
def features(clf: MnistCNN, images: torch.Tensor, batch: int = 1000) -> np.ndarray:
    return torch.cat([clf.features(images[s]) for s in _batches(len(images), batch)]).double().cpu().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2), via symmetric eigendecompositions."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    sqrt_sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    # Tr((Sa Sb)^1/2) = Tr((Sa^1/2 Sb Sa^1/2)^1/2), the latter symmetric PSD
    m = sqrt_sa @ sb @ sqrt_sa
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


@torch.no_grad()
def generate(model, diffusion, labels: torch.Tensor, sample_cfg, batch: int = 500, seed: int = 0,
             fast: bool = False) -> torch.Tensor:
    outs = []
    for i, s in enumerate(_batches(len(labels), batch)):
        outs.append(diffusion.sample(model, labels[s], cfg_scale=sample_cfg.cfg_scale, sampler=sample_cfg.sampler,
                                     steps=sample_cfg.ddim_steps, eta=sample_cfg.eta, seed=seed + i, fast=fast))
    return torch.cat(outs)


def train_on_generated(model, diffusion, sample_cfg, n_per_class: int = 5000, device="cpu",
                       batch: int = 5000, seed: int = 1) -> float:
    """Train-on-synthetic, test-on-real: the evaluation CNN trained on generated digits alone
    (n_per_class of each class), read on the real MNIST test set. Unlike accuracy, it drops when
    the samples lack the variety of real digits (strong guidance makes them clean but alike)."""
    labels = torch.arange(model.cfg.num_classes, device=device).repeat_interleave(n_per_class)
    images = generate(model, diffusion, labels, sample_cfg, batch=batch, seed=seed, fast=True)
    _, acc = train_classifier(device, seed=seed, verbose=False, images=images, labels=labels)
    return acc


_REFERENCE: dict = {}


def reference_features(clf: MnistCNN, device, n_ref: int) -> np.ndarray:
    """The classifier's features of the first n_ref training images, the FID reference. Computed once per process
    for one classifier file (its path, size and modification time) and device: a chapter scores many sample sets."""
    path = data_dir() / CLASSIFIER_FILE              # load_classifier wrote it if it was missing
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, str(device), n_ref)
    if key not in _REFERENCE:
        train = load_mnist("train", device, subset=n_ref)
        _REFERENCE[key] = features(clf, train.gather(torch.arange(len(train)))[0])
    return _REFERENCE[key]


@torch.no_grad()
def score_samples(images: torch.Tensor, labels: torch.Tensor, device="cpu", n_ref: int = 10000) -> dict:
    """Per-class accuracy and feature FID of generated images, with the real-vs-real floor."""
    clf, clf_acc = load_classifier(device)
    images, labels = images.to(device), labels.to(device)
    pred = torch.cat([clf(images[s]).argmax(1) for s in _batches(len(images), 1000)])
    per_class = {int(k): float((pred[labels == k] == k).float().mean()) for k in labels.unique().tolist()}
    ref = reference_features(clf, device, n_ref)
    test = load_mnist("test", device)
    n = len(images)
    gen_f = features(clf, images)
    real_f = features(clf, test.gather(torch.arange(min(n, len(test))))[0])
    return {"accuracy": float((pred == labels).float().mean()), "per_class": per_class,
            "fid": frechet_distance(gen_f, ref), "fid_floor": frechet_distance(real_f, ref),
            "n_samples": n, "classifier_test_accuracy": clf_acc}


def evaluate_checkpoint(path, n_per_class: int = 100, device="cpu", use_ema: bool = True,
                        sample_overrides: dict | None = None, seed: int = 0):
    from .diffusion import Diffusion
    from .checkpoint import model_from_checkpoint

    model, cfg = model_from_checkpoint(path, device, ema=use_ema)
    for k, v in (sample_overrides or {}).items():
        if v is not None:
            setattr(cfg.sample, k, v)
    diffusion = Diffusion(cfg.diffusion, device)
    labels = torch.arange(cfg.model.num_classes, device=device).repeat_interleave(n_per_class)
    images = generate(model, diffusion, labels, cfg.sample, seed=seed, fast=True)   # CUDA graph: same digits
    return score_samples(images, labels, device), images, labels, cfg


def grid_order(labels: torch.Tensor, num_classes: int, per_class: int = 10) -> torch.Tensor:
    """Indices of the first `per_class` samples of each class, class by class: one grid row per class."""
    return torch.cat([torch.nonzero(labels == k)[:per_class, 0] for k in range(num_classes)])


def format_report(r: dict) -> str:
    per = "  ".join(f"{k}:{v:.0%}" for k, v in r["per_class"].items())
    return (f"sample accuracy {r['accuracy']:.1%} over {r['n_samples']} CFG samples "
            f"(classifier test accuracy {r['classifier_test_accuracy']:.2%})\n"
            f"  per class  {per}\n"
            f"  feature FID {r['fid']:.2f} (real-vs-real floor {r['fid_floor']:.2f}, "
            f"ratio {r['fid'] / max(r['fid_floor'], 1e-12):.1f}x)")


def main(argv=None):
    from .process import parser
    p = parser(description="Score a DiT checkpoint's samples with an MNIST classifier.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint-<step> folder")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "euler", "heun"))
    p.add_argument("--steps", type=int, help="DDIM steps")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--grid", help="also write a 10x10 sample grid PNG here")
    p.add_argument("--json", help="also write the scores as JSON here")
    args = p.parse_args(argv)
    from .train import resolve_device

    device = resolve_device(args.device)
    r, images, labels, cfg = evaluate_checkpoint(
        args.checkpoint, args.n_per_class, device, not args.no_ema,
        {"sampler": args.sampler, "ddim_steps": args.steps, "cfg_scale": args.cfg_scale})
    print(format_report(r))
    if args.grid:
        from .plots import sample_grid
        sample_grid(images[grid_order(labels, cfg.model.num_classes)].cpu(), args.grid, nrow=10)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    from .process import run_main
    run_main(main)
