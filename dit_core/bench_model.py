"""The speed ladder at a model's full size (DiT-XL/2): Meta's train.py settings first, then each change and what it bought.

    python -m dit_core.bench --config configs/dit_xl2.yaml            # one GPU (an H100: ~6 minutes, compiles included)
    python -m dit_core.bench --config configs/dit_xl2.yaml --profile  # also: where the fastest row's step goes

`dit_core.bench` runs this ladder for any config whose data is not MNIST (the course's ladder is about MNIST's loop).
Every row trains the config's model from the same initialisation on the same batches: random latents of the
model's shape (the VAE's encoding left out, as fast-DiT's and Meta's own benchmarks of the step do), labels, timesteps
and noise drawn on the GPU from a generator seeded by the step. Rows, each a change on top of the row above:

  as Meta's train.py      fp32 with TF32 matmuls, batch 32 (Meta's 256 over 8 GPUs), torch.optim.AdamW as Meta
                          builds it, the EMA updated every step one parameter at a time (Meta's update_ema), eager
  + bf16                  autocast to bfloat16 (weights, gradients, AdamW and the EMA stay fp32)
  + fused AdamW           one kernel updates every parameter
  + foreach EMA           one multi-tensor kernel (torch._foreach_lerp_) instead of two kernels per parameter
  + compile               torch.compile of each block (regional: one compilation serves all 28)
  + batch 128             enough rows per matmul to fill the GPU (the largest power of two that fits)
  + cuDNN attention       SDPA's cuDNN kernel rather than flash attention (the fastest at 256 tokens x 72 dims)
  batch 256, recompute N  the batch one 80 GB GPU cannot hold without recomputation, N blocks recomputed
                          (the fewest that fit, from dit_core.parallel.plan's peak model)
Then, each alone on top of the cuDNN row: the weights in bf16, inductor's coordinate-descent tuning of its Triton
kernels, and CUDA graphs (compile mode reduce-overhead). Then float8 matmuls (dit_core.fp8: the blocks' qkv, proj,
fc1 and fc2 with per-tensor scales), with the kernel tuning, and at the huge batch; last, inductor's max-autotune
(Triton matmul templates with the element-wise work fused into their epilogues). The float8 and max-autotune rows were
added without a GPU to measure them (2026-12-06): the whole ladder may need more than the 6 minutes above; `--only`
picks rows (e.g. `--only 6,11,12,13`: the cuDNN row and the three float8 rows, with rows 0 and 1 for the loss check).

Utilisation: FLOPs per image counted by torch.utils.flop_counter on the meta device (forward + backward: 711.7
GFLOPs at DiT-XL/2), over the GPU's dense bf16 peak from NVIDIA's data sheet (989 TFLOP/s for an H100 SXM or H200).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .diffusion import Diffusion
from .engine import autocast_ctx
from .fp8 import use_fp8
from .model import DiT
from .parallel.plan import ACT_BYTES_COMPILED_GPU, Job, Plan

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, NVIDIA's data sheets; the first name found in the device's wins.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
GIB = 2 ** 30


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return tflops
    return None


def train_flops_per_sample(cfg: Config) -> dict:
    """FLOPs of one sample's forward and of its forward + backward, counted by torch's FlopCounterMode on the meta
    device (no memory, no time), split into matrix multiplications (linear layers and the patch convolution) and
    attention."""
    with torch.device("meta"):
        model = DiT(cfg.model).to("meta")
        m = cfg.model
        x = torch.randn(2, m.in_channels, m.image_size, m.image_size)
        t, y = torch.randint(0, 1000, (2,)), torch.randint(0, m.num_classes, (2,))
    counts = {}
    for what in ("forward", "train"):
        with FlopCounterMode(display=False) as fc:
            out = model(x, t, y)
            if what == "train":
                out.float().square().mean().backward()
        by_op = fc.get_flop_counts().get("Global", {})
        # on the meta device SDPA runs as its math form: the batched matmuls (bmm) are attention's, the linear layers
        # are mm/addmm, the patch embedding a convolution
        attention = sum(v for k, v in by_op.items() if "attention" in str(k) or "bmm" in str(k))
        counts[what] = fc.get_total_flops() / 2
        counts[f"{what}_attention"] = attention / 2
    return counts


@dataclass
class Rung:
    name: str
    batch: int = 32
    precision: str = "fp32"       # fp32 (with TF32 matmuls, as Meta's train.py sets), bf16 (autocast)
    fused_adam: bool = False
    ema: str = "loop"             # loop: two kernels per parameter (Meta's update_ema); foreach: one multi-tensor kernel
    compile: bool = False         # torch.compile of each block
    attention: str = "default"    # default (SDPA's own choice), cudnn, flash
    bf16_weights: bool = False    # the model itself in bf16, fp32 master weights in the optimizer
    recompute_blocks: int = 0     # full recomputation of the first N blocks
    compile_mode: str = "default"  # torch.compile's mode for the blocks (reduce-overhead: CUDA graphs)
    tuning: bool = False          # inductor's coordinate-descent tuning of its Triton kernels
    fp8: bool = False             # the blocks' linear layers multiply in float8 (dit_core.fp8)
    gpu_only: bool = False


def ladder(depth: int, big_batch: int = 128, huge_batch: int = 256, recompute_blocks: int = 0) -> list[Rung]:
    meta = Rung("as Meta's train.py")
    rows = [meta, replace(meta, name="+ bf16", precision="bf16")]
    rows.append(replace(rows[-1], name="+ fused AdamW", fused_adam=True))
    rows.append(replace(rows[-1], name="+ foreach EMA", ema="foreach"))
    rows.append(replace(rows[-1], name="+ compile (each block)", compile=True, gpu_only=True))
    rows.append(replace(rows[-1], name=f"+ batch {big_batch}", batch=big_batch))
    rows.append(replace(rows[-1], name="+ cuDNN attention", attention="cudnn"))
    best = rows[-1]
    n = recompute_blocks or depth
    rows.append(replace(best, name=f"batch {huge_batch}, recompute {n} of {depth} blocks", batch=huge_batch,
                        recompute_blocks=n))
    # tried on top of the cuDNN row, each alone
    rows.append(replace(best, name="cuDNN row + bf16 weights", bf16_weights=True))
    rows.append(replace(best, name="cuDNN row + kernel tuning", tuning=True))
    rows.append(replace(best, name="cuDNN row + CUDA graphs", compile_mode="reduce-overhead"))
    # float8 matmuls (per-tensor scales), then with the kernel tuning, then at the huge batch
    rows.append(replace(best, name="cuDNN row + FP8 matmuls", fp8=True))
    rows.append(replace(rows[-1], name="FP8 + kernel tuning", tuning=True))
    rows.append(replace(rows[-1], name=f"FP8 + tuning, batch {huge_batch}, recompute {n}", batch=huge_batch,
                        recompute_blocks=n))
    rows.append(replace(best, name="cuDNN row + max-autotune", compile_mode="max-autotune-no-cudagraphs"))
    return rows


def set_attention_backend(which: str) -> None:
    """SDPA's kernel choice for CUDA (global flags, read when a graph is traced: reset dynamo between rows)."""
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(which in ("default", "flash"))
    cuda.enable_mem_efficient_sdp(which == "default")
    cuda.enable_cudnn_sdp(which in ("default", "cudnn"))
    cuda.enable_math_sdp(True)


class MasterWeights:
    """bf16 weights for forward and backward, fp32 copies for the optimizer (what DeepSpeed's and Megatron's bf16
    modes do): after backward the bf16 gradients are copied into the masters' fp32 .grad, the optimizer steps the
    masters, and the result is rounded back into the model."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        model.to(torch.bfloat16)

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = p.grad.float() if p.grad is not None else None
            p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.masters)


def batches(cfg: Config, batch: int, device: torch.device, seed: int = 0):
    """Step i's random latents, labels, timesteps, noise and label dropout, the same for every row."""
    m, g = cfg.model, torch.Generator(device).manual_seed(seed)
    step = 0
    while True:
        g.manual_seed(seed * 1_000_003 + step)
        x0 = torch.randn(batch, m.in_channels, m.image_size, m.image_size, device=device, generator=g)
        y = torch.randint(0, m.num_classes, (batch,), device=device, generator=g)
        t = torch.randint(0, cfg.diffusion.timesteps, (batch,), device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        drop = torch.rand(batch, device=device, generator=g) < cfg.diffusion.label_dropout
        yield x0, y, t, noise, drop
        step += 1


def build_rung(r: Rung, cfg: Config, device: torch.device):
    """The row's model, optimizer, EMA and one training step (returns the step's loss, not read back)."""
    torch._dynamo.reset()                    # a new row traces anew (attention flags, batch, recomputation)
    gc.collect()                             # the previous row's model and optimizer, before this one's allocations
    if device.type == "cuda":
        torch.cuda.empty_cache()
    set_attention_backend(r.attention if device.type == "cuda" else "default")
    if device.type == "cuda":                # Meta's train.py: TF32 on for matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)
    model = DiT(cfg.model).to(device)
    model.set_recompute("full" if r.recompute_blocks else "none", r.recompute_blocks)
    if r.fp8:
        use_fp8(model)
    ema = [p.detach().clone() for p in model.parameters()]        # fp32, before any bf16 cast
    master = MasterWeights(model) if r.bf16_weights else None
    opt_params = master.masters if master else list(model.parameters())
    kw = {"fused": True} if r.fused_adam else {}
    opt = torch.optim.AdamW(opt_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **kw)
    torch._inductor.config.coordinate_descent_tuning = r.tuning
    if r.compile:
        for blk in model.blocks:
            blk.compile(mode=r.compile_mode)
    diffusion = Diffusion(cfg.diffusion, device)
    decay = cfg.train.ema_decay
    source = opt_params

    def step(x0, y, t, noise, drop):
        with autocast_ctx(r.precision if not r.bf16_weights else "fp32", device):
            loss = diffusion.loss(model, x0.to(next(model.parameters()).dtype), y, t, noise, drop)
        loss.backward()
        if master:
            master.grads_to_masters()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master:
            master.masters_to_model()
        with torch.no_grad():
            if r.ema == "foreach":
                torch._foreach_lerp_(ema, [p.detach() for p in source], 1 - decay)
            else:                            # Meta's update_ema: one mul_ and one add_ per parameter
                for e, p in zip(ema, source):
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        return loss.detach()

    return model, step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rung(r: Rung, cfg: Config, device: torch.device, steps: int, warmup: int, flops: float,
              peak_tflops: float | None, profile: bool = False) -> dict:
    """Warm-up steps (compilation happens there), then `steps` timed steps; the loss of every step (read back after
    the timing), the peak memory of the timed steps; with `profile`, then where a few more steps' time goes."""
    row = {"name": r.name, "batch": r.batch, "precision": r.precision, "fused_adam": r.fused_adam, "ema": r.ema,
           "compile": r.compile, "attention": r.attention, "bf16_weights": r.bf16_weights,
           "recompute_blocks": r.recompute_blocks, "compile_mode": r.compile_mode, "tuning": r.tuning, "fp8": r.fp8}
    t_build = time.perf_counter()
    try:
        model, step = build_rung(r, cfg, device)
        data = batches(cfg, r.batch, device)
        losses = [step(*next(data)) for _ in range(warmup)]
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            losses.append(step(*next(data)))
        sync(device)
        seconds = time.perf_counter() - t0
        peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        prof = profile_step(step, data, device) if profile and device.type == "cuda" else None
    except torch.OutOfMemoryError as e:
        row.update({"out_of_memory": True, "error": str(e).split("\n")[0][:160]})
        return row
    except Exception as e:              # a row that cannot run here (a compiler mode, a kernel) must not cost the table
        if not r.gpu_only:
            raise
        row.update({"failed": True, "error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}"})
        return row
    row.update({"steps": steps, "warmup": warmup, "warmup_s": t0 - t_build, "seconds": seconds,
                "step_ms": 1000 * seconds / steps, "images_per_s": steps * r.batch / seconds,
                "tflops": flops * steps * r.batch / seconds / 1e12, "losses": [float(x) for x in losses]})
    if peak_tflops:
        row["utilisation"] = row["tflops"] / peak_tflops
    if peak_bytes is not None:
        row["peak_gib"] = peak_bytes / GIB
    if prof is not None:
        row["profile"] = prof
    return row


KERNEL_KINDS = (("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "ampere_")),
                ("optimizer and EMA", ("multi_tensor", "fused_adam", "foreach", "adam", "lerp")),
                ("fused elementwise and norms (Triton)", ("triton",)))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other (eager elementwise, copies, reductions)"


def profile_step(step, data, device: torch.device, steps: int = 5) -> dict:
    """Where `steps` steps' wall time goes on the GPU: kernel time by kind, the top kernels, and the time no kernel
    ran (launch gaps, host waits)."""
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(*next(data))
        sync(device)
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    top: dict[str, float] = {}
    count = 0
    for e in prof.events():
        if e.device_type.name != "CUDA" or "#" in e.name:
            continue
        ms = e.device_time / 1000.0
        kinds[kernel_kind(e.name)] = kinds.get(kernel_kind(e.name), 0.0) + ms
        top[e.name] = top.get(e.name, 0.0) + ms
        count += 1
    busy = sum(kinds.values())
    wall_ms = 1000 * wall
    return {"wall_ms_per_step": wall_ms / steps, "kernel_ms_per_step": busy / steps, "gpu_busy": busy / wall_ms,
            "idle_ms_per_step": (wall_ms - busy) / steps, "kernels_per_step": count / steps,
            "ms_per_step_by_kind": {k: v / steps for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": {k[:120]: v / steps for k, v in
                                        sorted(top.items(), key=lambda kv: -kv[1])[:12]}}


def gap_report(row: dict, prof: dict, flops: dict, peak_tflops: float) -> dict:
    """The step at 100% of the peak, and what the measured step spends beyond it: matmuls and attention each above
    their own FLOPs at the peak, then everything that does no matrix work, then the time no kernel ran."""
    B = row["batch"]
    peak = peak_tflops * 1e12
    attn_ms = 1000 * B * flops["train_attention"] / peak
    mm_ms = 1000 * B * (flops["train"] - flops["train_attention"]) / peak
    k = prof["ms_per_step_by_kind"]
    return {"ideal_ms": attn_ms + mm_ms,
            "matmul_ms": k.get("matmul", 0.0), "matmul_at_peak_ms": mm_ms,
            "attention_ms": k.get("attention", 0.0), "attention_at_peak_ms": attn_ms,
            "no_matrix_work_ms": sum(v for n, v in k.items() if n not in ("matmul", "attention")),
            "idle_ms": prof["idle_ms_per_step"], "step_ms": prof["wall_ms_per_step"]}


def curves_agree(reference: list[float], bf16: list[float], candidate: list[float]) -> dict:
    """The fastest row's loss curve against the fp32 reference: every step within the band the plain bf16 row spans
    around the reference (its largest deviation over the same steps). Fails when the candidate drifts further from
    fp32 than bf16 alone does."""
    n = min(len(reference), len(bf16), len(candidate))
    band = max(abs(b - r) for r, b in zip(reference[:n], bf16[:n]))
    worst = max(abs(c - r) for r, c in zip(reference[:n], candidate[:n]))
    return {"steps": n, "bf16_band": band, "candidate_worst": worst, "within": worst <= band}


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'row':<36} {'batch':>5} {'img/s':>8} {'step ms':>8} {'TFLOP/s':>8} {'util':>6} {'peak GiB':>9} "
             f"{'warm-up s':>9}"]
    for r in rows:
        if r.get("out_of_memory") or r.get("failed"):
            lines.append(f"{r['name']:<36} {r['batch']:>5} " + ("out of memory" if r.get("out_of_memory") else
                                                                 f"failed: {r['error'][:60]}"))
            continue
        util = f"{r['utilisation']:.1%}" if "utilisation" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        lines.append(f"{r['name']:<36} {r['batch']:>5} {r['images_per_s']:>8.1f} {r['step_ms']:>8.1f} "
                     f"{r['tflops']:>8.1f} {util:>6} {peak:>9} {r['warmup_s']:>9.1f}")
    return "\n".join(lines)


def run_ladder(cfg: Config, device: torch.device, steps: int, warmup: int, profile: bool,
               big_batch: int = 128, huge_batch: int = 256, recompute_blocks: int = 0, only: str = "",
               on_row=None) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = bf16_peak_tflops(name) if device.type == "cuda" else None
    flops = train_flops_per_sample(cfg)
    rungs = [r for r in ladder(cfg.model.depth, big_batch, huge_batch, recompute_blocks)
             if device.type == "cuda" or not r.gpu_only]
    if only:
        keep = {int(i) for i in only.split(",")}
        rungs = [r for i, r in enumerate(rungs) if i in keep or i < 2]
    report = {"device": name, "torch": torch.__version__, "bf16_peak_tflops": peak, "flops_per_image": flops,
              "model": {k: getattr(cfg.model, k) for k in ("image_size", "patch_size", "hidden_size", "depth",
                                                         "num_heads", "num_classes", "learn_sigma")},
              "rows": []}
    fastest = None
    for r in rungs:
        row = time_rung(r, cfg, device, steps, warmup, flops["train"], peak, profile=profile and r.compile)
        print(f"[bench] {r.name}: " + ("out of memory" if row.get("out_of_memory") else row["error"]
                                        if row.get("failed") else f"{row['images_per_s']:.1f} img/s"), flush=True)
        if not row.get("out_of_memory") and not row.get("failed") and (fastest is None or row["images_per_s"] > fastest["images_per_s"]):
            fastest = row
        report["rows"].append(row)
        if on_row is not None:
            on_row(report)
    if fastest is not None and "profile" in fastest and peak:
        report["profile"] = {"row": fastest["name"], **fastest["profile"],
                             "gap": gap_report(fastest, fastest["profile"], flops, peak)}
    if fastest is not None and fastest is not report["rows"][0]:   # the loss check: the fastest row at the
        # reference's batch (the reference itself being fastest, as on a CPU, leaves nothing to check)
        ref, bf16 = report["rows"][0], report["rows"][1]
        spec = next(r for r in rungs if r.name == fastest["name"])
        check = time_rung(replace(spec, name=f"{spec.name} (at batch {ref['batch']})", batch=ref["batch"]), cfg,
                          device, steps, warmup, flops["train"], peak)
        if "losses" in ref and "losses" in bf16 and "losses" in check:
            report["loss_check"] = {"row": fastest["name"], "losses": check["losses"],
                                    **curves_agree(ref["losses"], bf16["losses"], check["losses"])}
    return report


def blocks_to_recompute(cfg: Config, batch: int, gpu_gib: float) -> int:
    """The fewest blocks whose full recomputation lets `batch` samples of the compiled bf16 step fit `gpu_gib` (with
    the planner's 10% headroom), from dit_core.parallel.plan's peak model and the compiled step's measured activation
    bytes; all of them if none suffices."""
    m = cfg.model
    with torch.device("meta"):
        params = sum(p.numel() for p in DiT(m).parameters())
    job = Job("bench", params, m.depth, m.hidden_size, m.num_heads, (m.image_size // m.patch_size) ** 2, gpu_gib,
              1, 1, batch, ema=True, act_bytes=ACT_BYTES_COMPILED_GPU)
    for n in range(m.depth + 1):
        if Plan(job, micro_batch=batch, recompute_blocks=n).peak_gib() <= 0.9 * gpu_gib:
            return max(n, 1)
    return m.depth
