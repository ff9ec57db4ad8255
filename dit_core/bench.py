"""Where one GPU's time goes: the course's training loop and this project's, measured in one run.

    python -m dit_core.bench                      # the table (a GPU: about 3 minutes, compiles included)
    python -m dit_core.bench --profile            # also: GPU busy time vs wall time of both loops
    python -m dit_core.bench --quick              # a few steps of each row (CPU, CI)
    python -m dit_core.bench --config configs/dit_xl2.yaml --profile   # a model at full size: dit_core.bench_model's
                                                  # ladder (Meta's settings, then each change), for any config whose
                                                  # data is not MNIST

Rows, each a fix on top of the one above, on the course's model sizes (hidden 64, depth 3, 4 heads,
patch 4), then this project's own loop (`dit_core.train.train`) at --config:

  course loop        the loop of the course's published train.py (owenliang/mnist-dits): a DataLoader
                     with num_workers=10, persistent_workers=True, shuffle, batch 300, whose dataset makes
                     a PIL image per sample and converts it; t, the noise and the noised image drawn
                     on the CPU and copied to the GPU; L1 loss, no label dropout; fp32, eager, AdamW
                     (the course: Adam, the same kernels);
                     the loss printed every 1000 iterations
                     (so never inside the timed steps: the host does not wait for the GPU each step)
  + data on GPU      the dataset resident on the GPU, each batch and its t and noise drawn there
                     (fast.DeviceBatches), noised on the GPU; from here the project's loss (MSE, labels
                     dropped 10% of the time for guidance)
  + bf16             autocast to bfloat16 for the matrix multiplications
  + fused AdamW      one kernel updates every parameter
  + compile          torch.compile of forward + loss (backward compiled with it)
  + batch 4096       enough work per launch to fill the GPU
  + CUDA graphs      compile mode reduce-overhead: forward and backward replayed as graphs

Timings use a wall clock around `--steps` steps after `--warmup` steps (compilation and
autotuning happen in the warm-up), with the GPU synchronised at both ends.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .config import load_config, parse_overrides
from .data import load_mnist
from .diffusion import Diffusion
from .fast import DeviceBatches
from .bench_model import blocks_to_recompute, format_rows, run_ladder
from .model import DiT
from .scratch import write_atomic
from .train import TrainHooks, autocast_ctx, compiled, resolve_device, train

COURSE_MODEL = {"hidden_size": 64, "depth": 3, "num_heads": 4, "patch_size": 4}
COURSE_WORKERS = 10          # the published train.py's DataLoader(num_workers=10, persistent_workers=True)
COURSE_PRINT_EVERY = 1000    # ... and its print of the loss (a host wait) every 1000 iterations


@dataclass
class Variant:
    name: str
    batch: int = 300
    device_data: bool = True
    read_every: int = 0           # loss.item() (the host waits for the GPU) every this many steps; 0: never
    precision: str = "fp32"
    fused: bool = False
    compile_mode: str = "none"
    gpu_only: bool = False        # needs CUDA (compile rows on a CPU would time the C++ compiler)


def ladder() -> list[Variant]:
    course = Variant("course loop", device_data=False, precision="fp32", read_every=COURSE_PRINT_EVERY)
    rows = [course, replace(course, name="+ data on GPU", device_data=True, read_every=0)]
    rows.append(replace(rows[-1], name="+ bf16", precision="bf16"))
    rows.append(replace(rows[-1], name="+ fused AdamW", fused=True))
    rows.append(replace(rows[-1], name="+ compile", compile_mode="default", gpu_only=True))
    rows.append(replace(rows[-1], name="+ batch 4096", batch=4096))
    rows.append(replace(rows[-1], name="+ CUDA graphs", compile_mode="reduce-overhead"))
    return rows


class PilMnist(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST does per sample: uint8 array -> PIL image -> transform."""

    def __init__(self, data):
        from torchvision import transforms
        self.images, self.labels = data.images.numpy(), data.labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (a timing must not stop while kernels still run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def course_batches(data_cpu, batch: int, diffusion: Diffusion, device, workers: int = COURSE_WORKERS):
    """The published loop's data path: its DataLoader (worker processes, a PIL image per sample), then in
    the main process t, the noise and the noised image x_t computed on the CPU, and x_t, t, y and the noise
    copied to the device. Yields (x_t, y, t, noise, None): no label dropout, as in the course."""
    cpu = Diffusion(diffusion.cfg, "cpu")
    loader = torch.utils.data.DataLoader(PilMnist(data_cpu), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    while True:
        for x, y in loader:
            t = torch.randint(0, cpu.T, (batch,))
            noise = torch.randn_like(x)
            x_t = cpu.q_sample(x, t, noise)
            yield x_t.to(device), y.to(device), t.to(device), noise.to(device), None


def device_batches(data_dev, batch: int, diffusion: Diffusion):
    draw = DeviceBatches(data_dev, 0, batch, diffusion.T, 0.1)
    step = 0
    while True:
        b = draw(step)
        x0, y = data_dev.gather(b.indices)
        yield x0, y, b.t, b.noise, b.drop
        step += 1


def time_variant(v: Variant, data_cpu, data_dev, device, steps: int, warmup: int, profile: bool = False) -> dict:
    cfg = load_config(None, {f"model.{k}": val for k, val in COURSE_MODEL.items()})
    torch.manual_seed(0)
    model = DiT(cfg.model).to(device)
    diffusion = Diffusion(cfg.diffusion, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if v.fused else {}))
    count = [0]
    if v.device_data:
        loss_fn = compiled(lambda *a: diffusion.loss(model, *a), v.compile_mode)
        batches = device_batches(data_dev, v.batch, diffusion)
    else:                                         # the course's step: x_t came noised from the CPU; L1 loss
        loss_fn = compiled(lambda x_t, y, t, noise, _: F.l1_loss(model(x_t, t, y), noise), v.compile_mode)
        batches = course_batches(data_cpu, v.batch, diffusion, device)

    def step():
        x0, y, t, noise, drop = next(batches)
        with autocast_ctx(v.precision, device):
            loss = loss_fn(x0, y, t, noise, drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        count[0] += 1
        return loss.item() if v.read_every and count[0] % v.read_every == 1 else loss.detach()

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    float(loss)                                   # the host waits once for the warm-up
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)
    seconds = time.perf_counter() - t1
    out = {"name": v.name, "batch": v.batch, "steps": steps, "seconds": seconds,
           "images_per_s": steps * v.batch / seconds, "step_ms": 1000 * seconds / steps,
           "warmup_s": t1 - t0, "final_loss": float(loss)}
    if profile:
        try:
            out["profile"] = profile_steps(step, device, min(steps, 20))
        except Exception as e:                 # a profiler quirk must not cost the table
            out["profile"] = {"error": f"{e.__class__.__name__}: {e}"}
    return out


class _Clock(TrainHooks):
    """Times `steps` steps of the real loop after `warmup` of them, the GPU synchronised at both ends."""

    def __init__(self, device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.t_start = self.t_end = None
        self.t0 = time.perf_counter()

    def step_begin(self, step, engine):
        if step == self.warmup:
            sync(self.device)
            self.t_start = time.perf_counter()
        elif step == self.warmup + self.steps:
            sync(self.device)
            self.t_end = time.perf_counter()


def time_project(name: str, config: str, overrides: dict, device, steps: int, warmup: int, data_cpu) -> dict:
    """This project's own loop (dit_core.train.train), fast path or not, at `config`."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, {**overrides, "run.device": device.type, "run.results_dir": tmp,
                                   "train.max_steps": warmup + steps + 1, "train.tensorboard": False,
                                   "train.ckpt_every": 0})
        clock = _Clock(device, warmup, steps)
        train(cfg, data=data_cpu, quiet=True, hooks=clock)
    B = cfg.train.global_batch_size
    seconds = clock.t_end - clock.t_start
    m = cfg.model
    return {"name": name, "batch": B, "steps": steps, "seconds": seconds, "images_per_s": steps * B / seconds,
            "step_ms": 1000 * seconds / steps, "warmup_s": clock.t_start - clock.t0,
            "model": f"hidden {m.hidden_size}, depth {m.depth}, {m.num_heads} heads, patch {m.patch_size}",
            "precision": cfg.train.precision, "fast": cfg.train.fast, "compile_mode": cfg.train.compile_mode}


def profile_steps(step_fn, device, steps: int) -> dict:
    """Wall time of `steps` calls vs the time the GPU spent in kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step_fn()
        float(loss)
        wall = time.perf_counter() - t0
    if device.type != "cuda":
        return {"wall_ms_per_step": 1000 * wall / steps}
    # GPU-side events, less the profiler's own range markers (e.g. "Optimizer.step#AdamW.step")
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and "#" not in e.name]
    top: dict[str, float] = {}
    for e in kernels:                                             # device times are in microseconds
        top[e.name] = top.get(e.name, 0.0) + e.device_time / 1000.0
    busy = sum(top.values())
    return {"wall_ms_per_step": 1000 * wall / steps, "kernel_ms_per_step": busy / steps,
            "gpu_busy": busy / (1000 * wall), "kernels_per_step": len(kernels) / steps,
            "top_kernels_ms_per_step": {k: v / steps for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:6]}}


def sampling_rows(model, diffusion, device, n: int = 100, repeats: int = 3) -> list[dict]:
    """n images (n/10 per class), DDPM 1000 steps and DDIM 50, plain loop vs CUDA graph vs
    compiled + graph; each the best of `repeats` calls after a first one (capture, compile)."""
    labels = torch.arange(model.cfg.num_classes, device=device).repeat_interleave(n // model.cfg.num_classes)
    modes = [("eager", {}), ("CUDA graph", {"fast": True}), ("compile + graph", {"fast": True, "compile": True})]
    if device.type != "cuda":
        modes = modes[:1]
    rows = []
    for sampler, steps in (("ddpm", 1000), ("ddim", 50)):
        ref = None
        for mode, kw in modes:
            t0 = time.perf_counter()
            ref_out = diffusion.sample(model, labels, sampler=sampler, steps=steps, seed=0, **kw)
            sync(device)
            first = time.perf_counter() - t0
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = diffusion.sample(model, labels, sampler=sampler, steps=steps, seed=0, **kw)
                sync(device)
                best = min(best, time.perf_counter() - t0)
            ref = ref_out if ref is None else ref
            rows.append({"sampler": f"{sampler.upper()} {steps}", "mode": mode, "images": len(labels),
                         "seconds": best, "first_call_s": first,
                         "max_abs_diff_vs_eager": float((out - ref).abs().max())})
    return rows


def format_table(rows: list[dict]) -> str:
    base = rows[0]["images_per_s"]
    lines = [f"{'variant':<40} {'batch':>6} {'img/s':>10} {'step ms':>9} {'x course':>9} {'warm-up s':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<40} {r['batch']:>6} {r['images_per_s']:>10,.0f} {r['step_ms']:>9.2f} "
                     f"{r['images_per_s'] / base:>9.1f} {r['warmup_s']:>10.1f}")
    return "\n".join(lines)


def format_sampling(rows: list[dict]) -> str:
    lines = [f"{'sampler':<10} {'mode':<16} {'images':>6} {'seconds':>9} {'first call s':>13} {'max |diff|':>11}"]
    for r in rows:
        lines.append(f"{r['sampler']:<10} {r['mode']:<16} {r['images']:>6} {r['seconds']:>9.3f} "
                     f"{r['first_call_s']:>13.2f} {r['max_abs_diff_vs_eager']:>11.2e}")
    return "\n".join(lines)


def model_ladder(args, cfg) -> None:
    """The ladder of dit_core.bench_model at the config's model (DiT-XL/2 and the other presets)."""
    if args.quick:
        args.steps, args.warmup = 2, 1
    device = resolve_device(args.device)
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if device.type == "cuda" else 0.0
    blocks = args.recompute_blocks or (blocks_to_recompute(cfg, args.huge_batch, gpu_gib) if gpu_gib else 0)

    def save(partial: dict) -> None:             # after every row: a run cut short keeps the rows it finished
        if args.json:
            text = json.dumps({**partial, "partial": True}, indent=1)
            write_atomic(args.json, lambda tmp: tmp.write_text(text))

    report = run_ladder(cfg, device, args.steps, args.warmup, args.profile, args.big_batch, args.huge_batch,
                        blocks, args.only, on_row=save)
    report.update({"config": args.config, "overrides": args.set, "gpu_gib": gpu_gib})
    print(format_rows(report["rows"]))
    if "profile" in report:
        g = report["profile"]["gap"]
        print(f"where the fastest row's {g['step_ms']:.1f} ms go: {g['ideal_ms']:.1f} at 100% of the peak; matmuls "
              f"{g['matmul_ms']:.1f} (at peak {g['matmul_at_peak_ms']:.1f}), attention {g['attention_ms']:.1f} "
              f"(at peak {g['attention_at_peak_ms']:.1f}), no matrix work {g['no_matrix_work_ms']:.1f}, "
              f"idle {g['idle_ms']:.1f}")
    if "loss_check" in report:
        c = report["loss_check"]
        print(f"loss curve of '{c['row']}' vs the fp32 reference over {c['steps']} steps: worst |diff| "
              f"{c['candidate_worst']:.2e}, the bf16 row's band {c['bf16_band']:.2e}: "
              f"{'within' if c['within'] else 'OUTSIDE'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist.yaml", help="the config of this project's rows")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for this project's rows (repeatable)")
    p.add_argument("--rows", default="ladder,project,sampling",
                   help="comma list of: ladder (course loop and each fix), project (fast path off and on), "
                        "fast (fast path only), sampling")
    p.add_argument("--steps", type=int, default=50, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--profile", action="store_true", help="profile the course loop and the last ladder row")
    p.add_argument("--quick", action="store_true", help="3 timed steps after 1, GPU-only rows skipped (CI)")
    p.add_argument("--ladder-batch", type=int, help="the ladder's batch (default: the course's 300; +batch rows keep "
                                                    "theirs); a small one keeps a CPU run of the ladder short")
    p.add_argument("--big-batch", type=int, default=128, help="model ladder: the batch that fills the GPU")
    p.add_argument("--huge-batch", type=int, default=256, help="model ladder: the batch that needs recomputation")
    p.add_argument("--recompute-blocks", type=int, default=0,
                   help="model ladder: blocks recomputed at --huge-batch (default: the fewest the planner says fit)")
    p.add_argument("--only", default="", help="model ladder: comma list of row numbers to run (rows 0 and 1 always)")
    p.add_argument("--json", help="also write every number here")
    args = p.parse_args(argv)
    cfg_rows = load_config(args.config, parse_overrides(args.set))
    if cfg_rows.data.source != "mnist":          # a model at full size: its own ladder (dit_core.bench_model)
        return model_ladder(args, cfg_rows)
    if args.quick:
        args.steps, args.warmup = 3, 1
    device = resolve_device(args.device)
    which = set(args.rows.split(","))
    data_cpu = load_mnist("train", "cpu")
    data_dev = data_cpu.to(device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup, "rows": [], "sampling": []}
    if device.type == "cuda":                 # PyTorch's defaults, as the course loop runs with them
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
    if "ladder" in which:
        rows = [v for v in ladder() if device.type == "cuda" or not v.gpu_only]
        if args.ladder_batch:
            rows = [replace(v, batch=args.ladder_batch) if v.batch == 300 else v for v in rows]
        for i, v in enumerate(rows):
            prof = args.profile and i in (0, len(rows) - 1)
            r = time_variant(v, data_cpu, data_dev, device, args.steps, args.warmup, prof)
            report["rows"].append(r)
            print(f"[bench] {r['name']}: {r['images_per_s']:,.0f} img/s", file=sys.stderr, flush=True)
    if which & {"project", "fast"}:
        overrides = parse_overrides(args.set)
        fast = {"train.fast": "on"} if device.type == "cuda" else {"train.fast": "on", "train.compile_mode": "none"}
        runs = [(f"project, fast off ({args.config})", {"train.fast": "off"}),
                (f"project, fast path ({args.config})", fast)]
        for name, extra in runs[0 if "project" in which else 1:]:
            r = time_project(name, args.config, {**overrides, **extra}, device, args.steps, args.warmup, data_cpu)
            report["rows"].append(r)
            print(f"[bench] {r['name']}: {r['images_per_s']:,.0f} img/s ({r['model']})", file=sys.stderr, flush=True)
    if report["rows"]:
        print(format_table(report["rows"]))
    if "sampling" in which:
        cfg = load_config(args.config, parse_overrides(args.set))
        torch.manual_seed(0)
        model = DiT(cfg.model).to(device).eval()
        with torch.no_grad():                   # untrained adaLN-Zero predicts 0: give it some weights
            for prm in model.parameters():
                prm.add_(torch.randn_like(prm), alpha=0.02)
        report["sampling"] = sampling_rows(model, Diffusion(cfg.diffusion, device), device,
                                           n=10 if args.quick else 100, repeats=1 if args.quick else 3)
        print(format_sampling(report["sampling"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    from .process import run_main
    run_main(main)
