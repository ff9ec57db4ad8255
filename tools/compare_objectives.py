"""Which diffusion objective learns readable digits soonest (issue 17): train configs/tiny.yaml once per objective,
the same steps and batches, then score each checkpoint's samples under several samplers and guidance scales.

    python tools/compare_objectives.py --out results/objectives                 # every variant, one at a time
    python tools/compare_objectives.py --out R --device cuda --jobs 4           # a GPU: four trainings at once
    python tools/compare_objectives.py --out R --only eps,flow-ln --steps 6000  # a subset, shorter
    python tools/compare_objectives.py --out R --figure F.png                   # draw R's checkpoints: a row each
    python tools/compare_objectives.py --out R --only dense,moe,moe-noaux        # chapter 15: dense vs MoE

Each row: training seconds (from the run's own summary), then per sampling setting the sample accuracy (mean and
worst class), the feature FID against its real-vs-real floor, and the seconds to draw and score 1000 digits.
Rows go to <out>/rows.jsonl and the table is printed at the end.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> config overrides; every one trains the same network on the same batches of the contract
VARIANTS = {
    "eps":            {"diffusion.objective": "eps"},
    "eps-minsnr":     {"diffusion.objective": "eps", "diffusion.weighting": "min_snr"},
    "eps-cosine":     {"diffusion.objective": "eps", "diffusion.schedule": "cosine"},
    "v":              {"diffusion.objective": "v"},
    "v-minsnr":       {"diffusion.objective": "v", "diffusion.weighting": "min_snr"},
    "v-cosine":       {"diffusion.objective": "v", "diffusion.schedule": "cosine"},
    "x0":             {"diffusion.objective": "x0"},
    "x0-minsnr":      {"diffusion.objective": "x0", "diffusion.weighting": "min_snr"},
    "flow":           {"diffusion.objective": "flow", "sample.sampler": "euler"},
    "flow-ln":        {"diffusion.objective": "flow", "sample.sampler": "euler", "diffusion.flow_time": "logit_normal"},
}
# every variant names its objective, and the rest are the config's defaults (weighting none, schedule linear),
# so the rows stay what they say whichever objective configs/tiny.yaml itself uses

# Chapter 15 (issue 21): the dense tiny DiT against the mixture of experts at equal active parameters
# (configs/moe.yaml: 4 experts of half the MLP width, top-2), with and without the load-balancing loss.
# name -> (config, overrides)
MOE_VARIANTS = {
    "dense":     ("configs/tiny.yaml", {}),
    "moe":       ("configs/moe.yaml", {}),
    "moe-noaux": ("configs/moe.yaml", {"model.aux_loss_weight": 0.0}),
}
ALL = {**{n: ("configs/tiny.yaml", o) for n, o in VARIANTS.items()}, **MOE_VARIANTS}


def samplings(name: str, wide: bool) -> list[dict]:
    flow = name.startswith("flow")
    base = [{"sampler": "euler" if flow else "ddim", "ddim_steps": 50, "cfg_scale": 5.0}]
    if not wide:
        return base
    more = [{**base[0], "cfg_scale": s} for s in (2.0, 3.0, 7.0)] + [{**base[0], "ddim_steps": n} for n in (10, 25, 100)]
    if flow:
        more += [{"sampler": "heun", "ddim_steps": n, "cfg_scale": 5.0} for n in (10, 25)]
    return base + more


def train_variant(name: str, args) -> dict:
    out = Path(args.out) / name
    config, overrides = ALL[name]
    cmd = [sys.executable, str(ROOT / "launchers" / "single.py"), "--config", config, "--device",
           args.device, "--fast", "off", "--results-dir", str(out), "--overwrite", "--set", "train.tensorboard=false"]
    if args.steps:
        cmd += ["--max-steps", str(args.steps)]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, TQDM_DISABLE="1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{name}: training failed:\n{r.stderr[-2000:]}")
    m = re.search(r"trained to step (\d+) in ([\d.]+)s", r.stdout + r.stderr)
    return {"name": name, "config": config, "overrides": overrides, "steps": int(m.group(1)), "train_s": float(m.group(2)),
            "wall_s": time.perf_counter() - t0, "checkpoint": str(out / f"checkpoint-{m.group(1)}")}


def score(row: dict, device: str, wide: bool, n_per_class: int) -> dict:
    import torch
    from dit_core.evaluate import evaluate_checkpoint
    from dit_core.train import resolve_device
    dev = resolve_device(device)
    row["samples"] = []
    for s in samplings(row["name"], wide):
        t0 = time.perf_counter()
        r, *_ = evaluate_checkpoint(row["checkpoint"], n_per_class, dev, True, s)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        row["samples"].append({**s, "seconds": time.perf_counter() - t0, "accuracy": r["accuracy"],
                               "worst_class": min(r["per_class"].values()), "per_class": r["per_class"],
                               "fid": r["fid"], "fid_floor": r["fid_floor"]})
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'objective':<12} {'train s':>8} | {'sampler':<8} {'steps':>5} {'cfg':>4} | {'acc':>6} {'worst':>6} "
             f"{'FID/floor':>9} {'sample s':>8}"]
    for row in rows:
        for s in row["samples"]:
            lines.append(f"{row['name']:<12} {row['train_s']:>8.0f} | {s['sampler']:<8} {s['ddim_steps']:>5} "
                         f"{s['cfg_scale']:>4.1f} | {s['accuracy']:>6.1%} {s['worst_class']:>6.0%} "
                         f"{s['fid'] / s['fid_floor']:>9.1f} {s['seconds']:>8.1f}")
    return "\n".join(lines)


def figure(out: Path, path: str, device: str, per_class: int = 2) -> None:
    """One row of digits per trained variant in <out>/rows.jsonl (0-9, per_class of each, the row's first sampling
    setting, the same seed for all): the same training budget, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dit_core.evaluate import evaluate_checkpoint, grid_order
    from dit_core.plots import grid_array
    from dit_core.train import resolve_device
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(per_class * 10 * 0.42, len(rows) * 0.62), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        s = {k: row["samples"][0][k] for k in ("sampler", "ddim_steps", "cfg_scale")}
        _, images, labels, _ = evaluate_checkpoint(row["checkpoint"], per_class, resolve_device(device), True, s)
        ax.imshow(grid_array(images[grid_order(labels, 10, per_class)], nrow=10 * per_class), cmap="gray", vmin=0,
                  vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(row["name"], rotation=0, ha="right", va="center", fontsize=9)
        ax.set_title(f"{row['samples'][0]['accuracy']:.1%} of 1000 read as their label", fontsize=7, loc="right", pad=2)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    print("wrote", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--only", help="comma list of variants (default: the objectives): " + ", ".join(ALL))
    p.add_argument("--steps", type=int, help="training steps (default: configs/tiny.yaml's)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (a GPU; on a CPU keep 1 for fair times)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each training")
    p.add_argument("--wide", action="store_true", help="also sweep guidance scale, sampler steps and Heun")
    p.add_argument("--wide-top", type=int, default=0, help="sweep the samplers of only the K best (by accuracy)")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--figure", help="train nothing: draw the checkpoints of --out's rows.jsonl into this PNG")
    args = p.parse_args(argv)
    if args.figure:
        return figure(Path(args.out), args.figure, args.device)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        trained = list(pool.map(lambda n: train_variant(n, args), names))
    rows = []
    for row in trained:
        rows.append(score(row, args.device, args.wide and not args.wide_top, args.n_per_class))
        print(f"[objectives] {row['name']}: {row['samples'][0]['accuracy']:.1%}", file=sys.stderr, flush=True)
    if args.wide and args.wide_top:
        for row in sorted(rows, key=lambda r: -r["samples"][0]["accuracy"])[:args.wide_top]:
            score(row, args.device, True, args.n_per_class)
    with open(Path(args.out) / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
