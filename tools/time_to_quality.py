"""From scratch to good digits against the wall clock: train once, snapshot the EMA weights every few
seconds, then score every snapshot (accuracy per class, feature FID vs its floor).

    python tools/time_to_quality.py --config configs/mnist.yaml --out results/ttq
    python tools/time_to_quality.py --config configs/tiny.yaml --max-steps 60 --snap-every 5 --out /tmp/ttq

The clock runs from the first training step (compilation included) and stops at each snapshot only
for the copy of the EMA weights; scoring happens after training, off the clock. Writes
<out>/quality.json, <out>/quality_curve.png and <out>/samples.png (the last snapshot).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dit_core.bench import format_sampling, sampling_rows  # noqa: E402
from dit_core.config import load_config, parse_overrides  # noqa: E402
from dit_core.diffusion import Diffusion  # noqa: E402
from dit_core.evaluate import format_report, generate, grid_order, score_samples, train_on_generated  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from dit_core.plots import quality_curve, sample_grid  # noqa: E402
from dit_core.train import TrainHooks, resolve_device, train  # noqa: E402


class Snapshots(TrainHooks):
    """At the first read-back past each `every` seconds: a CPU copy of the EMA weights."""

    def __init__(self, every: float):
        self.every, self.next, self.items = every, every, []

    def logged(self, records, ema, seconds):
        if seconds >= self.next:
            self.take(records[-1], ema, seconds)
            self.next = (int(seconds / self.every) + 1) * self.every

    def take(self, rec, ema, seconds):
        sd = {k: v.detach().to("cpu", copy=True) for k, v in ema.state_dict().items()}
        self.items.append({"seconds": seconds, "step": rec["step"] + 1, "samples_seen": rec["samples_seen"],
                           "loss": rec["loss"], "ema": sd})


def first_reaching(points, acc: float, fid_ratio: float):
    for p in points:
        if p["accuracy"] >= acc and p["fid"] <= fid_ratio * p["fid_floor"]:
            return p
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--snap-every", type=float, default=15.0, help="seconds of training between snapshots")
    p.add_argument("--n-per-class", type=int, default=100, help="samples per class scored at each snapshot")
    p.add_argument("--tstr", type=int, default=0, help="train-on-generated score of the last snapshot with "
                                                       "this many samples per class (5000: 50k digits)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.set)
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    device = resolve_device(args.device)
    cfg = load_config(args.config, {**overrides, "run.device": device.type, "run.results_dir": str(out / "run"),
                                    "train.tensorboard": False})

    snaps = Snapshots(args.snap_every)
    result = train(cfg, quiet=True, hooks=snaps)
    last = result.losses[-1] if result.losses else float("nan")
    if not snaps.items or snaps.items[-1]["step"] != result.steps:
        snaps.take({"step": result.steps - 1, "samples_seen": result.steps * cfg.train.global_batch_size,
                    "loss": last}, result.ema, result.seconds)
    print(f"[quality] trained {result.steps} steps x {cfg.train.global_batch_size} in {result.seconds:.1f} s; "
          f"{len(snaps.items)} snapshots", flush=True)

    model = DiT(cfg.model).to(device).eval()
    diffusion = Diffusion(cfg.diffusion, device)
    labels = torch.arange(cfg.model.num_classes, device=device).repeat_interleave(args.n_per_class)
    points = []
    for s in snaps.items:
        model.load_state_dict(s.pop("ema"))
        t0 = time.perf_counter()
        images = generate(model, diffusion, labels, cfg.sample, batch=1000, fast=True)
        r = score_samples(images, labels, device)
        s.update({k: r[k] for k in ("accuracy", "per_class", "fid", "fid_floor")},
                 min_class_accuracy=min(r["per_class"].values()), score_seconds=time.perf_counter() - t0)
        points.append(s)
        print(f"[quality] {s['seconds']:6.1f} s  step {s['step']:6d}  accuracy {r['accuracy']:.1%} "
              f"(worst class {s['min_class_accuracy']:.0%})  FID {r['fid']:.1f} / floor {r['fid_floor']:.1f}",
              flush=True)
    print(format_report(r))
    sample_grid(images[grid_order(labels, cfg.model.num_classes)].cpu(), out / "samples.png",
                title=f"{s['seconds']:.0f} s of training, CFG {cfg.sample.cfg_scale}, EMA, {cfg.sample.sampler}")
    quality_curve(points, out / "quality_curve.png")
    report = {"config": cfg.to_dict(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "train_seconds": result.seconds, "steps": result.steps, "points": points}
    hit = first_reaching(points, 0.99, 3.0)
    report["time_to_quality_s"] = hit["seconds"] if hit else None
    print(f"[quality] first snapshot with accuracy >= 99% and FID <= 3x floor: "
          f"{'%.1f s (step %d)' % (hit['seconds'], hit['step']) if hit else 'none'}")
    report["sampling"] = sampling_rows(model, diffusion, device, repeats=3 if device.type == "cuda" else 1)
    print(format_sampling(report["sampling"]))
    if args.tstr:
        t0 = time.perf_counter()
        report["train_on_generated"] = {"accuracy": train_on_generated(model, diffusion, cfg.sample, args.tstr,
                                                                       device),
                                        "n_per_class": args.tstr, "seconds": time.perf_counter() - t0}
        print(f"[quality] train on {10 * args.tstr} generated digits, test on real: "
              f"{report['train_on_generated']['accuracy']:.2%}")
    (out / "quality.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    from dit_core.process import run_main
    run_main(main)
