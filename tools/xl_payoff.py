"""The payoff shown without GPUs (issue 39): Meta's DiT-XL/2 at full width (hidden 1152, 16 heads, MLP ratio 4, patch
2, learn_sigma, 1000 classes) on CPU processes over gloo. Every rank's peak memory, measured, beside the formulas and
the planner, for one process, DDP, ZeRO-1/2/3 and FSDP on 2 and 4 processes; and a memory limit that all 28 blocks do
not fit in one process and do fit sharded over 4, training the same losses and gradient norms.

    python tools/xl_payoff.py --out docs/xl_payoff_cpu.json           # everything (about 17 min on 2 cores, 17 GiB)
    python tools/xl_payoff.py --out r.json --depths 2 --procs 2 --strategies fsdp --no-full      # one row
    python tools/xl_payoff.py --out r.json --depths "" --limit-gib 6                             # the demo alone

What is measured, per rank: the resident memory (VmRSS, /proc/self/status) when the launcher's main() starts (torch,
dit_core and DeepSpeed imported, one tiny training step taken: the baseline), and the high-water mark (VmHWM) above
it; also the RSS when step 0 begins (model, EMA and engine built) and the peak of the steps alone (the mark reset
there through /proc/self/clear_refs). Each rank runs the real launcher's main() under this script (`xl_payoff.py rank
... launchers/fsdp.py ARGS`, started by torchrun), which adds only the measurement (a TrainHooks probe in the
launcher's hooks); the plain launcher command is recorded beside it. glibc is told to unmap every freed allocation of
64 KiB or more (MALLOC_MMAP_THRESHOLD_), so the RSS follows the live tensors, not the allocator's cache. Beside it:

  formula   the ZeRO paper's model states per rank (dit_core.parallel.zero_report.formula, fp32: 4Ψ weights + 4Ψ
            gradients + 8Ψ AdamW moments, each /N where the stage shards it) + the fp32 EMA (4Ψ, or 4Ψ/N where it is
            sharded: ZeRO-3, FSDP);
  planner   dit_core.parallel.plan's states per GPU for the layout (Plan.states_gib with the EMA: the same 16 + 4
            bytes per parameter, /N under ZeRO-3); it knows DP and ZeRO-3 only, so its ZeRO-1/2 rows are DP's;
  tally     the bytes of the tensors the engine holds after step 1's backward (the launchers' --report: ZeRO's
            measure_memory, FSDP's memory_ledger; for one process and DDP the same walk here), EMA not included.

Verdicts (TOLERANCE, 10%): what two more blocks cost each rank at its peak (depth 2 -> 4), against the formula's bytes
per parameter plus the extras this code is known to hold (EXTRAS: DDP's bucket copies, DeepSpeed's fp32 master
partition): the difference of two depths drops what does not grow with the model (one block gathered or in flight,
fixed-size buffers). And each 28-block run's peak against the same strategy's 2-block run on as many ranks plus those
bytes per parameter for the 26 blocks more (or, where larger, the whole model that each rank builds before sharding).

The data: the DiT sees 4 x 4 x 4 latents (4 tokens), encoded from 1000 one-image classes of random 8 x 8 images by a
tiny random diffusers VAE (downsampling 2, 4 latent channels): data.source=latents with Meta's in_channels, classes and
learn_sigma, so the parameter count is DiT-XL/2's exactly (674,834,720 at 28 blocks), and few tokens keep a step short
on a CPU. Memory is the point; what the latents picture is not.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
TOLERANCE = 0.10            # measured peak above baseline vs expected, relative
STRATEGIES = {              # name -> (launcher, its flags, ZeRO stage of the formula, EMA sharded)
    "single": ("launchers/single.py", [], 0, False),
    "ddp": ("launchers/ddp.py", ["--impl", "hand"], 0, False),
    "zero1": ("launchers/zero.py", ["--stage", "1"], 1, False),
    "zero2": ("launchers/zero.py", ["--stage", "2"], 2, False),
    "zero3": ("launchers/zero.py", ["--stage", "3"], 3, True),
    # ZeRO-3 as the paper runs it: a gathered weight freed after its use (DeepSpeed's defaults keep up to 1e9
    # gathered elements alive for reuse, on this model all of them)
    "zero3paper": ("launchers/zero.py", ["--stage", "3", "--ds-config", "configs/ds_zero_paper.json"], 3, True),
    "fsdp": ("launchers/fsdp.py", ["--impl", "hand"], 3, True),
}
HIDDEN, HEADS, LATENT, CLASSES = 1152, 16, 4, 1000
# glibc serves every allocation of at least this many bytes by its own mmap and unmaps it when it is freed (setting it
# also stops glibc from raising the threshold as it goes): the resident memory then follows the live tensors, not
# what the allocator keeps cached for reuse.
MMAP_THRESHOLD = 65536


# ---------------------------------------------------------------- this process's memory

def proc_status() -> dict:
    """VmRSS, VmHWM, VmData of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmData"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- one rank, under torchrun

def torch_engine_tally(engine) -> dict:
    """What a plain-PyTorch engine (one process, DDP) holds: weights, gradients, AdamW's moments (measure.Tally)."""
    from dit_core.parallel.measure import Tally
    t = Tally()
    for p in engine.model.parameters():
        t.add("parameters", p)
        t.add("gradients", p.grad)
    t.walk("optimizer", engine.optimizer)
    return t.bytes


def make_probe(inner, record: dict):
    """TrainHooks that note this rank's memory at step 0's start (the model, EMA and engine built) and reset the
    high-water mark there, take a tally after step 1's backward where the launcher has no report, and hand every
    call on to the launcher's own hooks."""
    from dit_core.strategy import TrainHooks

    class Probe(TrainHooks):
        def step_begin(self, step, engine):
            if "built" not in record:
                record["built"] = proc_status()
                record["peak_reset"] = reset_peak()
            inner.step_begin(step, engine)

        def after_backward(self, step, micro, engine):
            inner.after_backward(step, micro, engine)
            if step == 1 and micro == 0 and type(inner) is TrainHooks:
                record["tally"] = torch_engine_tally(engine)

        def step_end(self, step, engine):
            inner.step_end(step, engine)
            record["last_step"] = step

        def logged(self, records, ema, seconds):
            inner.logged(records, ema, seconds)

    return Probe()


def warm_up() -> None:
    """One step of a tiny DiT (forward, backward, AdamW): what a step loads on first use (the optimizer's and
    autograd's modules, the kernels) is then part of the baseline, and the measurement above it holds tensors."""
    import torch
    from dit_core.config import load_config
    from dit_core.engine import build_optimizer
    from dit_core.model import DiT
    cfg = load_config(ROOT / "configs" / "dit_xl2.yaml", {"model.depth": 1, "model.hidden_size": 32,
                                                          "model.num_heads": 2, "model.image_size": LATENT})
    model = DiT(cfg.model)
    opt, _ = build_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randn(2, 4, LATENT, LATENT)
    model(x, torch.tensor([1, 2]), torch.tensor([3, 4])).square().mean().backward()
    opt.step()


def out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "Cannot allocate memory" in text


def rank_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="xl_payoff.py rank", description="run a launcher's main() on this rank, "
                                "its memory measured (and limited: --limit-gib)")
    p.add_argument("--record", required=True, help="a folder: this rank writes rank<R>.json there")
    p.add_argument("--limit-gib", type=float, help="RLIMIT_DATA of this process from main() on")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    import importlib.util

    # imported before the baseline: every launcher pays them
    import torch.distributed as dist
    if "zero" in Path(a.script).name:
        importlib.import_module("deepspeed")
    from dit_core import train as train_module
    from dit_core.strategy import TrainHooks
    spec = importlib.util.spec_from_file_location(f"launcher_{Path(a.script).stem}", ROOT / a.script)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "pid": os.getpid(), "script": a.script, "limit_gib": a.limit_gib}

    def train(cfg, *args, hooks=None, **kw):
        return train_module.train(cfg, *args, hooks=make_probe(hooks or TrainHooks(), record), **kw)
    launcher.train = train                      # the launcher's loop, with the probe in its hooks

    warm_up()
    record["baseline"] = proc_status()
    if a.limit_gib:
        limit = int(a.limit_gib * GIB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    t0 = time.perf_counter()
    failure = None
    try:
        launcher.main(a.args)
    except BaseException as e:                  # noqa: BLE001 (an out-of-memory is the demo's answer, kept below)
        if not out_of_memory(e):
            raise
        failure = e
    record["seconds"] = time.perf_counter() - t0
    record["end"] = proc_status()
    record["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["ok"] = failure is None
    if failure is not None:
        where = ("before step 0" if "built" not in record else
                 f"in step {record.get('last_step', -1) + 1}")
        import re
        asked = re.search(r"allocate (\d+) bytes", str(failure))
        held = (proc_status()["VmRSS"] - record["baseline"]["VmRSS"]) / GIB
        record["error"] = (f"rank {rank} stopped {where}: it needed "
                           + (f"{int(asked.group(1)) / 2 ** 20:.1f} MiB more" if asked else "more memory")
                           + f" than its {a.limit_gib:g} GiB limit (RLIMIT_DATA) allows, holding {held:.2f} GiB above "
                           f"its baseline.")
        record["allocator_said"] = " ".join(str(failure).split())[:300]
    Path(a.record).mkdir(parents=True, exist_ok=True)
    (Path(a.record) / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    if failure is not None:
        print(f"error: {record['error']}", file=sys.stderr, flush=True)
        os._exit(3)                             # the other ranks may wait in a collective: torchrun stops them
    if dist.is_initialized():
        from dit_core.parallel.dist import finish
        finish()


# ---------------------------------------------------------------- the data: latents of 1000 one-image classes

def prepare_data(work: Path, classes: int = CLASSES, source: str = "latents") -> dict:
    """`classes` class folders of one random RGB image each and, for data.source=latents, a tiny random AutoencoderKL
    (downsampling 2, 4 latent channels) and their latents encoded once into DIT_DATA_DIR (every rank then reads the
    cache). data.source=folder (the tests: no VAE to load) gives the DiT the 4 x 4 RGB images themselves."""
    import numpy as np
    from PIL import Image
    side = 2 * LATENT if source == "latents" else LATENT
    images = work / "data" / f"images-{classes}-{side}"
    vae, cache = work / "data" / "vae", work / "data" / "cache"
    if not (images / f"{classes - 1:04d}").is_dir():
        rng = np.random.RandomState(0)
        for c in range(classes):
            (images / f"{c:04d}").mkdir(parents=True, exist_ok=True)
            path = images / f"{c:04d}" / "0.png"
            Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(path)
            os.utime(path, ns=(1_700_000_000 * 10 ** 9,) * 2)
    data = {"source": source, "classes": classes, "channels": 4 if source == "latents" else 3,
            "images": str(images), "vae": str(vae) if source == "latents" else "", "cache": str(cache)}
    if source == "latents":
        if not (vae / "config.json").is_file():
            import torch
            from diffusers import AutoencoderKL
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                      latent_channels=4, sample_size=side, norm_num_groups=4, layers_per_block=1)
            model.save_pretrained(str(vae))
        from dit_core.latents import load_latents
        before = os.environ.get("DIT_DATA_DIR")
        os.environ["DIT_DATA_DIR"] = str(cache)
        try:
            load_latents(str(images), str(vae), LATENT, flip=True, verbose=False)     # encoded once, here
        finally:
            if before is None:
                del os.environ["DIT_DATA_DIR"]
            else:
                os.environ["DIT_DATA_DIR"] = before
    return data


# ---------------------------------------------------------------- one run: the command, its ranks, its numbers

def model_sets(depth: int, data: dict) -> dict:
    return {"model.image_size": LATENT, "model.depth": depth, "model.in_channels": data["channels"],
            "model.num_classes": data["classes"], "data.source": data["source"], "data.path": data["images"],
            "data.vae": data["vae"]}


def psi_of(depth: int, data: dict) -> int:
    """The DiT's parameter count at `depth` blocks (the model itself, built on the meta device: no memory)."""
    import torch
    from dit_core.config import load_config
    from dit_core.model import DiT
    cfg = load_config(ROOT / "configs" / "dit_xl2.yaml", model_sets(depth, data))
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg.model).parameters())


def largest_param_bytes(depth: int, data: dict) -> int:
    """Bytes of the model's largest parameter (a block's adaLN modulation, 1152 x 6912): AdamW's per-parameter update
    makes two temporaries of its size (the square root of the second moment, then that over its bias correction)."""
    import torch
    from dit_core.config import load_config
    from dit_core.model import DiT
    cfg = load_config(ROOT / "configs" / "dit_xl2.yaml", model_sets(depth, data))
    with torch.device("meta"):
        return 4 * max(p.numel() for p in DiT(cfg.model).parameters())


def launcher_args(depth: int, steps: int, batch: int, data: dict, folder: Path, report: bool) -> list[str]:
    sets = {**model_sets(depth, data), "train.tensorboard": "false", "run.save_final": "false"}
    args = ["--config", "configs/dit_xl2.yaml", "--device", "cpu", "--max-steps", str(steps),
            "--global-batch-size", str(batch), "--seed", "0"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    args += ["--results-dir", str(folder / "run"), "--log-jsonl", str(folder / "log.jsonl")]
    return args + (["--report", str(folder / "report.json")] if report else [])


def expected(strategy: str, psi: int, world: int, report: dict | None) -> dict:
    """The formula, the planner, and what this code holds besides, in bytes per rank (see the module's docstring)."""
    from dit_core.parallel.plan import Job, Plan
    from dit_core.parallel.zero_report import formula
    _, _, stage, sharded_ema = STRATEGIES[strategy]
    states = formula(stage, psi, world, "fp32")
    ema = 4 * psi / (world if sharded_ema else 1)
    out = {"formula": {**states, "ema": ema, "total": sum(states.values()) + ema}}
    job = Job("xl", psi, 1, HIDDEN, HEADS, (LATENT // 2) ** 2, 1e6, world, 1, precision="fp32", ema=True)
    out["planner"] = Plan(job, dp=world, zero3=stage == 3 and world > 1).states_gib() * GIB
    return out


def run_one(name: str, strategy: str, world: int, depth: int, a, data: dict, limit_gib: float | None = None,
            threads: int | None = None) -> dict:
    """One launcher run under torchrun, every rank measured; returns its row."""
    from dit_core.parity import read_jsonl
    folder = Path(a.work) / "runs" / name
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    script, flags, _, _ = STRATEGIES[strategy]
    report = strategy != "single" and strategy != "ddp" and a.steps >= 2
    args = flags + launcher_args(depth, a.steps, a.batch, data, folder, report)
    rank = ["tools/xl_payoff.py", "rank", "--record", str(folder / "ranks")] + \
        (["--limit-gib", f"{limit_gib:g}"] if limit_gib else [])
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
           + rank + [script] + args)
    plain = (["python", script] if strategy == "single" else
             ["torchrun", "--standalone", f"--nproc_per_node={world}", script]) + args
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads or max(1, (os.cpu_count() or 1) // world)),
               TQDM_DISABLE="1", DIT_DATA_DIR=data["cache"], MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    print(f"[{name}] {strategy} x {world}, depth {depth}" + (f", limit {limit_gib:g} GiB" if limit_gib else ""),
          flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t0
    ranks = sorted((json.loads(f.read_text()) for f in (folder / "ranks").glob("rank*.json")),
                   key=lambda x: x["rank"])
    psi = psi_of(depth, data)
    row = {"name": name, "strategy": strategy, "world_size": world, "depth": depth, "psi": psi,
           "limit_gib": limit_gib, "wall_seconds": round(wall, 1), "exit_code": r.returncode,
           "command": " ".join(shlex.quote(str(c)) for c in cmd[1:]).replace("-m torch.distributed.run", "torchrun", 1),
           "launcher_command": " ".join(shlex.quote(str(c)) for c in plain),
           "omp_threads": int(env["OMP_NUM_THREADS"])}
    errors = [x["error"] for x in ranks if x.get("error")]
    if r.returncode != 0 and not errors:
        row["stderr_tail"] = r.stderr[-3000:]
        errors = [f"exit {r.returncode}: " + (r.stderr.strip().splitlines() or ["?"])[-1]]
    row["errors"] = errors
    rep = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else None
    row.update(expected(strategy, psi, world, rep))
    row["ranks"] = []
    for x in ranks:
        base = x["baseline"]["VmRSS"]
        one = {"rank": x["rank"], "baseline_rss": base, "ok": x["ok"], "seconds": round(x["seconds"], 1)}
        one["peak"] = max(x["end"]["VmHWM"], x["ru_maxrss"]) - base
        one["end_rss"] = x["end"]["VmRSS"] - base
        one["baseline_vmdata"] = x["baseline"]["VmData"]
        if x.get("allocator_said"):
            one["allocator_said"] = x["allocator_said"]
        if "built" in x:
            one["built_rss"] = x["built"]["VmRSS"] - base
            one["build_peak"] = x["built"]["VmHWM"] - base
            if x.get("peak_reset"):
                one["train_peak"] = x["end"]["VmHWM"] - base
        tally = (rep["ranks"][x["rank"]]["memory"] if rep else x.get("tally"))
        if tally:
            one["tally"] = tally
        row["ranks"].append(one)
    log = folder / "log.jsonl"
    row["log"] = read_jsonl(log) if log.is_file() else []
    if rep:
        row["report"] = {k: rep.get(k) for k in ("psi", "formula", "fp32_master_extra", "deepspeed_estimate",
                                                 "units", "comm_formula_bytes")}
        row["report"]["ranks"] = [{k: v for k, v in x.items() if k not in ("pieces", "timeline")}
                                  for x in rep["ranks"]]
    print(f"[{name}] {wall:.0f} s, exit {r.returncode}, peak per rank (GiB): "
          + ", ".join(f"{x['peak'] / GIB:.2f}" for x in row["ranks"]) + (f"; {errors[0]}" if errors else ""),
          flush=True)
    return row


# ---------------------------------------------------------------- the verdicts

EXTRAS = {   # bytes per parameter per rank that this code holds beyond the ZeRO paper's model states and the EMA
    "ddp": (lambda n: 4.0, "the hand-written DDP's bucket copies of the gradients (torch.cat per bucket), all alive "
                           "until the last all-reduce is waited on (parallel/ddp.py)"),
    "zero1": (lambda n: 4.0 / n, "DeepSpeed's fp32 master partition, kept even in fp32 (zero_report: "
                                 "fp32_master_extra)"),
    "zero2": (lambda n: 4.0 / n, "as ZeRO-1"),
    "zero3": (lambda n: 4.0 / n, "as ZeRO-1"),
    "zero3paper": (lambda n: 4.0 / n, "as ZeRO-1"),
}


def bytes_per_param(strategy: str, world: int) -> dict:
    """What one more parameter costs each rank at the peak: the formula's model states, the EMA, the extras."""
    from dit_core.parallel.zero_report import formula
    _, _, stage, sharded_ema = STRATEGIES[strategy]
    states = sum(formula(stage, 1, world, "fp32").values())
    ema = 4.0 / (world if sharded_ema else 1)
    extra = EXTRAS[strategy][0](world) if strategy in EXTRAS else 0.0
    return {"formula": states + ema, "extra": extra, "expected": states + ema + extra}


def rank_peak(row: dict) -> int:
    """The largest peak above baseline over the run's ranks."""
    return max(x["peak"] for x in row["ranks"])


def verdict(measured: float, expected: float, tol: float = TOLERANCE) -> dict:
    ratio = measured / expected
    return {"measured": measured, "expected": expected, "ratio": round(ratio, 4), "tolerance": tol,
            "ok": abs(ratio - 1) <= tol}


def slopes(rows: list) -> list:
    """Per rank, what two more blocks cost at the peak (the two smallest depths of each strategy and world size),
    against bytes_per_param x their parameters: what does not grow with the depth (the baseline's leftovers,
    buffers of a fixed size, the one block gathered or in flight) falls out of the difference."""
    out = []
    keys = sorted({(r["strategy"], r["world_size"]) for r in rows if not r.get("limit_gib")})
    for s, n in keys:
        runs = sorted((r for r in rows if (r["strategy"], r["world_size"]) == (s, n) and not r["errors"]
                       and not r.get("limit_gib") and r["depth"] < 28), key=lambda r: r["depth"])
        if len(runs) < 2:
            continue
        lo, hi = runs[0], runs[1]
        bpp = bytes_per_param(s, n)
        out.append({"strategy": s, "world_size": n, "depths": [lo["depth"], hi["depth"]],
                    "params_added": hi["psi"] - lo["psi"], "bytes_per_param": bpp,
                    "formula": bpp["formula"] * (hi["psi"] - lo["psi"]),
                    **verdict(rank_peak(hi) - rank_peak(lo), bpp["expected"] * (hi["psi"] - lo["psi"]))})
    return out


def extrapolate(row: dict, rows: list) -> dict | None:
    """A 28-block run's peak predicted from the same strategy's smallest-depth run on as many ranks: its measured
    peak + bytes_per_param x the parameters the deeper model adds; and, where each rank first builds the whole model
    (4 bytes per parameter) before sharding it, that build when it is larger."""
    base = [r for r in rows if (r["strategy"], r["world_size"]) == (row["strategy"], row["world_size"])
            and r["depth"] < row["depth"] and not r["errors"] and not r.get("limit_gib")]
    if not base:
        return None
    lo = min(base, key=lambda r: r["depth"])
    bpp = bytes_per_param(row["strategy"], row["world_size"])
    steps = rank_peak(lo) + bpp["expected"] * (row["psi"] - lo["psi"])
    build = max(x.get("build_peak", 0) for x in lo["ranks"]) + 4 * (row["psi"] - lo["psi"])
    return {"anchor": lo["name"], **verdict(rank_peak(row), max(steps, build)),
            "phase": "steps" if steps >= build else "build"}


def parity_of(row: dict, ref: dict | None) -> dict | None:
    from dit_core.parity import SUM_ORDER, parity
    if ref is None or not row["log"] or not ref["log"] or row is ref:
        return None
    v = parity(ref["log"], row["log"], SUM_ORDER)
    return {"reference": ref["name"], "ok": v.ok, "steps": v.steps, "loss_rel": v.loss, "grad_norm_rel": v.grad_norm,
            "rtol": SUM_ORDER, "line": str(v)}


def table(result: dict) -> str:
    g = lambda b: f"{b / GIB:6.2f}"     # noqa: E731
    lines = [f"{'run':<22}{'Ψ':>12} {'peak':>6} {'form.':>6} {'plan.':>6} {'tally':>6} {'build':>6} {'wall s':>7}  "
             f"parity"]
    for r in result["rows"]:
        tally = max((sum(x.get("tally", {}).values()) for x in r["ranks"]), default=0)
        build = max((x.get("build_peak", 0) for x in r["ranks"]), default=0)
        par = r.get("parity")
        lines.append(f"{r['name']:<22}{r['psi']:>12,} {g(rank_peak(r)) if r['ranks'] else '     -'} "
                     f"{g(r['formula']['total'])} {g(r['planner'])} {g(tally) if tally else '     -'} {g(build)} "
                     f"{r['wall_seconds']:>7.0f}  " + ("-" if par is None else "ok" if par["ok"] else "FAIL")
                     + (f"  {r['errors'][0][:90]}" if r["errors"] else ""))
    lines.append("GiB per rank, the largest over the ranks; peak: measured high-water mark above the baseline.")
    for s in result["slopes"]:
        lines.append(f"slope {s['strategy']} x {s['world_size']} (depth {s['depths'][0]} -> {s['depths'][1]}): "
                     f"{g(s['measured'])} GiB measured vs {g(s['expected'])} expected "
                     f"({s['bytes_per_param']['expected']:.1f} B/param): ratio {s['ratio']:.3f} "
                     f"{'ok' if s['ok'] else 'FAIL'}")
    for r in result["rows"]:
        if r.get("extrapolated"):
            e = r["extrapolated"]
            lines.append(f"{r['name']}: peak {g(e['measured'])} GiB vs {g(e['expected'])} predicted from "
                         f"{e['anchor']} ({e['phase']}): ratio {e['ratio']:.3f} {'ok' if e['ok'] else 'FAIL'}")
    if result.get("demo"):
        lines += result["demo"]["lines"]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rank"]:
        return rank_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON of every measurement")
    p.add_argument("--work", default="results/xl_payoff", help="data, logs and per-rank records")
    p.add_argument("--depths", default="2,4", help="reduced depths for the strategy table (empty: none)")
    p.add_argument("--procs", default="2,4")
    p.add_argument("--strategies", default="ddp,zero1,zero2,zero3,zero3paper,fsdp")
    p.add_argument("--full-depth", type=int, default=28, help="the depth of the limit demo (DiT-XL/2: 28)")
    p.add_argument("--full-procs", type=int, default=4)
    p.add_argument("--full-strategies", default="fsdp", help="sharded strategies run at --full-depth (fsdp, zero3)")
    p.add_argument("--limit-gib", type=float, default=6.0, help="the per-process memory limit of the demo")
    p.add_argument("--no-full", action="store_true", help="skip the --full-depth runs and the demo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="global batch (divisible by every --procs)")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--merge", action="store_true", help="keep the rows of --out that this call does not run again")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    rows = []
    for depth in [int(d) for d in a.depths.split(",") if d]:
        rows.append(run_one(f"d{depth}-single", "single", 1, depth, a, data))
        for world in [int(n) for n in a.procs.split(",") if n]:
            for s in [s for s in a.strategies.split(",") if s]:
                rows.append(run_one(f"d{depth}-{s}-{world}", s, world, depth, a, data))
    old = json.loads(Path(a.out).read_text()) if a.merge and Path(a.out).is_file() else {}
    demo = old.get("demo")
    if not a.no_full:
        D, N, L = a.full_depth, a.full_procs, a.limit_gib
        rows.append(run_one(f"d{D}-single", "single", 1, D, a, data))
        one = run_one(f"d{D}-single-limit", "single", 1, D, a, data, limit_gib=L)
        sharded = [run_one(f"d{D}-{s}-{N}-limit", s, N, D, a, data, limit_gib=L)
                   for s in a.full_strategies.split(",") if s]
        rows += [one, *sharded]
        demo = {"limit_gib": L, "depth": D, "one_process": one["name"], "sharded": [r["name"] for r in sharded]}
    names = {r["name"] for r in rows}
    rows = [r for r in old.get("rows", []) if r["name"] not in names] + rows
    refs = {r["depth"]: r for r in rows if r["strategy"] == "single" and not r.get("limit_gib") and not r["errors"]}
    for r in rows:
        r["parity"] = parity_of(r, refs.get(r["depth"]))
    command = " ".join(["python", "tools/xl_payoff.py", *map(shlex.quote, argv)])
    before = old.get("commands", [old["command"]] if "command" in old else [])
    result = {"tool": "tools/xl_payoff.py", "commands": before + [command],
              "machine": machine(), "settings": {
                  "model": "DiT-XL/2 (configs/dit_xl2.yaml): hidden 1152, 16 heads, MLP ratio 4, patch 2, learn_sigma, "
                           "1000 classes, fp32, AdamW, EMA", "latent": [4, LATENT, LATENT],
                  "tokens": (LATENT // 2) ** 2,
                  "global_batch": a.batch, "steps": a.steps, "tolerance": TOLERANCE,
                  "malloc_mmap_threshold": MMAP_THRESHOLD, "extras": {k: v[1] for k, v in EXTRAS.items()}},
              "rows": rows}
    result["slopes"] = slopes(rows)
    for r in rows:
        if r["depth"] >= 28 and not r["errors"]:
            r["extrapolated"] = extrapolate(r, rows)
    if demo:
        L, D = demo["limit_gib"], demo["depth"]
        one = next(r for r in rows if r["name"] == demo["one_process"])
        lines = [f"limit {L:g} GiB per process (RLIMIT_DATA), {D} blocks:",
                 "  1 process: " + ("stopped: " + one["errors"][0] if one["errors"] else
                                     f"did not stop (peak {rank_peak(one) / GIB:.2f} GiB)")]
        for name in demo["sharded"]:
            r = next(x for x in rows if x["name"] == name)
            lines.append(f"  {r['strategy']} x {r['world_size']}: " + (
                "stopped: " + r["errors"][0] if r["errors"] else
                f"trained {len(r['log'])} steps, peak {rank_peak(r) / GIB:.2f} GiB per rank; parity with the unlimited "
                f"1-process run: {r['parity']['line'] if r['parity'] else 'no reference'}"))
        demo["one_process_stopped"] = bool(one["errors"])
        demo["sharded_ok"] = all(not next(x for x in rows if x["name"] == n)["errors"]
                                 and (next(x for x in rows if x["name"] == n)["parity"] or {}).get("ok")
                                 for n in demo["sharded"])
        demo["lines"] = lines
    result["demo"] = demo
    result["wall_seconds"] = old.get("wall_seconds", 0) + round(time.perf_counter() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(table(result))


def machine() -> dict:
    import platform

    import torch
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    try:
        import deepspeed
        ds = deepspeed.__version__
    except ImportError:
        ds = None
    return {"cpus": os.cpu_count(), "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": ds, "backend": "gloo"}


if __name__ == "__main__":
    main()
