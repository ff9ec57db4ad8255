"""Where a training step's memory goes: model states, and the activations autograd keeps for backward.

    python -m dit_core.memory --config configs/mnist.yaml --out memory.json      # one GPU: measured per phase

On the CPU the activations are *counted*: every tensor autograd saves for backward passes through a
`saved_tensors_hooks` pack hook, once per storage, weights excluded (`saved_activation_bytes`); regions that
`torch.utils.checkpoint` recomputes save nothing inside and keep only their inputs, which are added. On a GPU
`step_memory` reads `torch.cuda.memory_allocated` after each phase of a step and the peak, which is what an
out-of-memory error is about.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from .config import Config, load_config
from .diffusion import Diffusion
from .engine import autocast_ctx
from .model import CHECKPOINT_INPUT_HOOKS, DiT
from .config import ConfigError, parse_overrides
from .engine import resolve_device
from .parallel.plan import ACT_BYTES_COMPILED_GPU, Job, Plan

MIB = 2 ** 20


def state_bytes(model: torch.nn.Module, optimizer_moments: int = 2) -> dict:
    """fp32 parameters, their gradients and AdamW's moments (exp_avg, exp_avg_sq)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"parameters": n, "gradients": n, "optimizer": optimizer_moments * n}


def block_activation_elements(tokens: int, hidden: int, heads: int, mlp_ratio: float = 4.0,
                              attn_scores: bool = False) -> int:
    """Elements one DiT block saves for backward per sample (fp32, no recomputation), counted from its operations:
    the LayerNorm inputs (2 x S·h), the two modulated inputs (2 x S·h), q, k, v and the attention output (4 x S·h),
    the output projection's input (S·h), the two gated branches' outputs (2 x S·h), fc1's input (S·h), GELU's input
    and fc2's input (2 x r·S·h), plus the per-token LayerNorm statistics (4·S), the attention kernel's log-sum-exp
    (heads·S) and, once per sample, the adaLN branch: SiLU(c) (h), the six modulation vectors (6h) and the two
    1 + scale (2h). With `attn_scores` (attention computed as a matmul, softmax, matmul) the H·S² probabilities are
    saved too: the term flash attention removes (Korthikanti et al. 2022's 5as/h). tests/test_recompute_rope.py
    checks it against the counted bytes, exactly."""
    S, h = tokens, hidden
    n = S * h * (12 + 2 * mlp_ratio) + 4 * S + heads * S + 9 * h
    return int(n + (heads * S * S if attn_scores else 0))


def saved_activation_bytes(model: DiT, cfg: Config, batch: int = 8, device: str = "cpu",
                           precision: str = "fp32") -> int:
    """Bytes autograd keeps between one forward of the training loss and its backward (CPU or GPU): each saved
    storage once, parameters and buffers excluded, plus the inputs recomputed regions keep. `precision` bf16/fp16:
    the forward under autocast, as the engine runs it (the low-precision copies of the weights that the linear layers
    keep for backward are new storages, so they are counted too)."""
    model = model.to(device)
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict = {}

    def note(t):
        key = t.untyped_storage().data_ptr()
        if key not in weights:
            seen[key] = t.untyped_storage().nbytes()
        return t

    def held(*ts):
        for t in ts:
            note(t)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, generator=g)
    t = torch.randint(0, cfg.diffusion.timesteps, (batch,), generator=g)
    y = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x0, t, y, noise = (a.to(device) for a in (x0, t, y, noise))
    diffusion = Diffusion(cfg.diffusion, torch.device(device))
    CHECKPOINT_INPUT_HOOKS.append(held)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda x: note(x), lambda x: x), \
                autocast_ctx(precision, torch.device(device)):
            loss = diffusion.loss(model, x0, y, t, noise, None)
    finally:
        CHECKPOINT_INPUT_HOOKS.remove(held)
    loss.backward()
    return sum(seen.values())


def activation_bytes_per_token_hidden(cfg: Config, precision: str = "fp32", batch: int = 1,
                                      device: str = "cpu") -> float:
    """Bytes one DiT block keeps for backward per sample, per token and per hidden unit, measured at `cfg`'s shape
    (its depth is replaced): the counted bytes of `saved_activation_bytes` for depth 2 minus depth 1 (one block),
    at batch 2·`batch` minus batch `batch` (one sample's share; what does not grow with the batch, such as
    autocast's bf16 copies of the weights, cancels), divided by batch x tokens x hidden. The activation constant of
    dit_core.parallel.plan: 80.2 in fp32 and 40.1 under bf16 autocast at DiT-XL/2's shape."""
    from dataclasses import replace
    m = cfg.model
    counted = {}
    for depth in (1, 2):
        c = replace(cfg, model=replace(m, depth=depth))
        for b in (batch, 2 * batch):
            torch.manual_seed(0)
            counted[depth, b] = saved_activation_bytes(DiT(c.model), c, batch=b, device=device, precision=precision)
    one_block = (counted[2, 2 * batch] - counted[1, 2 * batch]) - (counted[2, batch] - counted[1, batch])
    tokens = (m.image_size // m.patch_size) ** 2
    return one_block / (batch * tokens * m.hidden_size)


class HostAdamW:
    """AdamW with its moments (and the fp32 copy it steps) in host memory, ZeRO-Offload's idea on one GPU: after
    backward the gradients go to the host, the host's AdamW steps, the new weights come back."""

    def __init__(self, params, lr: float):
        self.params = list(params)
        self.host = [p.detach().to("cpu", copy=True).pin_memory() for p in self.params]
        for h in self.host:
            h.grad = torch.empty_like(h).pin_memory()
        self.opt = torch.optim.AdamW(self.host, lr=lr)

    def step(self) -> None:
        for p, h in zip(self.params, self.host):
            h.grad.copy_(p.grad, non_blocking=True)
        torch.cuda.synchronize()
        self.opt.step()
        for p, h in zip(self.params, self.host):
            p.data.copy_(h, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def step_memory(cfg: Config, batch: int, recompute: str = "none", blocks: int = 0, steps: int = 3,
                offload: bool = False, precision: str = "fp32", compile_blocks: bool = False, ema: bool = False,
                offload_optimizer: bool = False) -> dict:
    """One GPU: memory.allocated after each phase of a training step, the step's peak, and its time (median of
    `steps` after one warm-up). `offload`: activations kept in pinned CPU memory (torch.autograd.graph.save_on_cpu).
    `precision` bf16: autocast, as the engine runs it; `compile_blocks`: torch.compile of each block (the fast path's
    memory: the compiler chooses what backward keeps); `ema`: an fp32 EMA copy of the weights, updated every step;
    `offload_optimizer`: AdamW's moments in host memory (HostAdamW)."""
    dev = torch.device("cuda")
    torch._dynamo.reset()
    gc.collect()                      # the previous row's model, also one an out-of-memory error left in a cycle
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = DiT(cfg.model).to(dev)
    model.set_recompute(recompute, blocks)
    if compile_blocks:
        for blk in model.blocks:
            blk.compile()
    ema_copy = [p.detach().clone() for p in model.parameters()] if ema else None
    opt = (HostAdamW(model.parameters(), 1e-4) if offload_optimizer
           else torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    diffusion = Diffusion(cfg.diffusion, dev)
    x0 = torch.randn(batch, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, device=dev)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=dev)
    out, times = {}, []
    for i in range(steps + 1):
        t = torch.randint(0, cfg.diffusion.timesteps, (batch,), device=dev)
        noise = torch.randn_like(x0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        hooks = torch.autograd.graph
        ctx = hooks.save_on_cpu(pin_memory=True) if offload else hooks.saved_tensors_hooks(lambda x: x, lambda x: x)
        with ctx, autocast_ctx(precision, dev):
            loss = diffusion.loss(model, x0, y, t, noise, None)
        torch.cuda.synchronize()
        after_forward = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        after_backward = torch.cuda.memory_allocated()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema_copy is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_copy, [p.detach() for p in model.parameters()], 1e-4)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        out = {"start": start, "after_forward": after_forward, "after_backward": after_backward,
               "after_step": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}
    out["step_s"] = sorted(times[1:])[len(times[1:]) // 2]
    out["states"] = state_bytes(model)
    if ema:
        out["states"]["ema"] = out["states"]["parameters"]
    if offload_optimizer:
        out["states"]["optimizer"] = 0
    return out


def planned_peak_gib(cfg: Config, batch: int, precision: str, recompute: str = "none", blocks: int = 0,
                     ema: bool = False, offload_optimizer: bool = False, gpu_gib: float = 80.0,
                     compiled: bool = False) -> float | None:
    """dit_core.parallel.plan's peak for one GPU at this setting (`Plan.peak_gib`; the compiled bf16 step with the
    activation bytes measured for it, ACT_BYTES_COMPILED_GPU). None where it has no model: attention-only
    recomputation."""
    if recompute == "attention":
        return None
    m = cfg.model
    with torch.device("meta"):
        params = sum(p.numel() for p in DiT(m).parameters())
    job = Job("memory", params, m.depth, m.hidden_size, m.num_heads, (m.image_size // m.patch_size) ** 2, gpu_gib,
              1, 1, batch, precision=precision, ema=ema,
              act_bytes=ACT_BYTES_COMPILED_GPU if compiled and precision == "bf16" else 0.0)
    rc = (blocks or m.depth) if recompute == "full" else 0
    return Plan(job, micro_batch=batch, recompute_blocks=rc, offload_optimizer=offload_optimizer).peak_gib()


def step_timeline(cfg: Config, batch: int, snapshot: str | None = None) -> list[dict]:
    """One GPU training step (after a warm-up step), memory.allocated after every block's forward, the loss, every
    block's backward and the optimizer step: where the peak is and when. `snapshot`: also write torch's memory
    snapshot of the step (a pickle for https://pytorch.org/memory_viz)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = DiT(cfg.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    diffusion = Diffusion(cfg.diffusion, dev)
    x0 = torch.randn(batch, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, device=dev)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=dev)
    events: list = []
    on = [False]

    def mark(label):
        if on[0]:
            torch.cuda.synchronize()
            events.append({"what": label, "allocated": torch.cuda.memory_allocated()})

    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: mark(f"forward block {i}"))
        blk.register_full_backward_hook(lambda m, gi, go, i=i: mark(f"backward block {i}"))
    for step in range(2):
        on[0] = step == 1
        if on[0] and snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200000)
        torch.cuda.reset_peak_memory_stats()
        mark("start (weights, gradients freed, AdamW moments)")
        t = torch.randint(0, cfg.diffusion.timesteps, (batch,), device=dev)
        loss = diffusion.loss(model, x0, y, t, torch.randn_like(x0), None)
        mark("loss")
        loss.backward()
        mark("after backward (gradients)")
        opt.step()
        mark("after optimizer step")
        opt.zero_grad(set_to_none=True)
        mark("after zero_grad")
        if on[0]:
            events.append({"what": "peak of the step", "allocated": torch.cuda.max_memory_allocated()})
            if snapshot:
                torch.cuda.memory._dump_snapshot(snapshot)
                torch.cuda.memory._record_memory_history(enabled=None)
    return events


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dit_core.memory",
                                description="memory of one training step, by phase and by recomputation (one GPU; "
                                            "on the CPU the activations are counted)")
    p.add_argument("--config", default="configs/bench.yaml")
    p.add_argument("--set", action="append", default=[], help="key=value config overrides")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda: measured per phase; cpu: the saved activations counted (auto: cuda when there is one)")
    p.add_argument("--out", required=True)
    p.add_argument("--snapshot", help="also write torch's memory snapshot of one step here (pickle; GPU only)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="GPU: autocast to bf16 or not")
    p.add_argument("--compile", action="store_true", help="GPU: torch.compile each block (the fast path's memory)")
    p.add_argument("--ema", action="store_true", help="GPU: keep an fp32 EMA copy of the weights, as training does")
    p.add_argument("--batches", default="", help="GPU: also a sweep of these batches (comma list) without "
                                                  "recomputation, up to the first that runs out of memory")
    p.add_argument("--blocks", default="", help="GPU: full recomputation of these block counts (comma list; "
                                                 "default every count from 1 to the depth)")
    p.add_argument("--offload-optimizer", action="store_true", help="GPU: also a row with AdamW's moments on the host")
    p.add_argument("--no-timeline", action="store_true", help="GPU: leave out the per-block timeline")
    a = p.parse_args(argv)
    if a.batch < 1:
        raise ConfigError(f"--batch {a.batch} must be at least 1.")
    for flag, path in (("--out", a.out), ("--snapshot", a.snapshot)):      # before minutes of measuring
        if path and (Path(path).is_dir() or not Path(path).resolve().parent.is_dir()):
            raise ConfigError(f"{flag} '{path}' is a folder or in a folder that does not exist; give a file path "
                              f"in an existing folder.")
    cfg = load_config(a.config, parse_overrides(a.set))
    device = resolve_device(a.device)
    if a.snapshot and device.type != "cuda":
        raise ConfigError("--snapshot records the CUDA caching allocator's history; it needs a GPU (--device cuda).")
    counts = [int(b) for b in a.blocks.split(",")] if a.blocks else range(1, cfg.model.depth + 1)
    modes = ([("none", 0, False)] + [("full", b, False) for b in counts]
             + [("attention", 0, False), ("none", 0, True)])
    rows = []
    m = cfg.model
    tokens = (m.image_size // m.patch_size) ** 2
    formula = block_activation_elements(tokens, m.hidden_size, m.num_heads, m.mlp_ratio) * 4 * a.batch
    if device.type == "cpu":
        for mode, blocks, offload in modes:
            if offload:
                continue                      # save_on_cpu moves GPU activations to the host: nothing to count here
            torch.manual_seed(0)
            model = DiT(cfg.model)
            model.set_recompute(mode, blocks)
            saved = saved_activation_bytes(model, cfg, a.batch)
            rows.append({"recompute": mode, "blocks": blocks if mode != "none" else 0, "saved_bytes": saved})
            print(f"{mode:9s} blocks {blocks}: activations kept for backward {saved / MIB:8.1f} MiB (counted)",
                  flush=True)
        report = {"device": "cpu (counted, not measured)", "rows": rows}
    else:
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        kw = dict(precision=a.precision, compile_blocks=a.compile, ema=a.ema)
        runs = [(a.batch, mode, blocks, offload, False) for mode, blocks, offload in modes]
        if a.offload_optimizer:
            runs.append((a.batch, "none", 0, False, True))
        sweep = [(int(b), "none", 0, False, False) for b in a.batches.split(",")] if a.batches else []
        out_of_memory_at = None
        # the sweep last: a process that ran out of memory once (eager) did not always get its memory back
        for i, (batch, mode, blocks, offload, off_opt) in enumerate(runs + sweep):
            is_sweep = i >= len(runs)
            if is_sweep and out_of_memory_at is not None:
                continue
            # save_on_cpu's hooks and torch.compile do not mix: that row runs eager
            comp = a.compile and not offload
            plan_kw = dict(precision=a.precision, ema=a.ema, offload_optimizer=off_opt, gpu_gib=gpu_gib)
            planned = None if offload else planned_peak_gib(cfg, batch, recompute=mode, blocks=blocks, compiled=comp,
                                                            **plan_kw)
            row = {"batch": batch, "sweep": is_sweep, "recompute": mode, "blocks": blocks if mode != "none" else 0,
                   "save_on_cpu": offload, "offload_optimizer": off_opt, "compiled": comp, "planned_gib": planned}
            try:
                r = step_memory(cfg, batch, mode, blocks, offload=offload, offload_optimizer=off_opt,
                                **{**kw, "compile_blocks": comp})
            except torch.OutOfMemoryError:
                rows.append({**row, "out_of_memory": True})
                out_of_memory_at = batch if is_sweep else out_of_memory_at
                print(f"batch {batch} {mode:9s} blocks {blocks}: out of memory (planned {planned or 0:.1f} GiB)",
                      flush=True)
                continue
            torch.cuda.empty_cache()
            rows.append({**row, **r})
            plan_txt = f"planned {planned:6.1f} GiB" if planned else "planned   -"
            print(f"batch {batch} {mode:9s} blocks {blocks:2d} save_on_cpu {offload!s:5} offload_opt {off_opt!s:5}: "
                  f"peak {r['peak'] / 2 ** 30:6.1f} GiB, {plan_txt}, activations after forward "
                  f"{(r['after_forward'] - r['start']) / 2 ** 30:6.1f} GiB, step {r['step_s'] * 1e3:6.1f} ms",
                  flush=True)
        timeline = [] if a.no_timeline else step_timeline(cfg, a.batch, snapshot=a.snapshot)
        for e in timeline:
            print(f"  {e['what']:48s} {e['allocated'] / MIB:9.1f} MiB")
        report = {"device": torch.cuda.get_device_name(), "gpu_gib": gpu_gib, "precision": a.precision,
                  "compiled": a.compile, "ema": a.ema, "out_of_memory_batch": out_of_memory_at, "rows": rows,
                  "timeline": timeline}
    with open(a.out, "w") as f:
        json.dump({"config": a.config, "overrides": a.set, "batch": a.batch, "torch": torch.__version__,
                   "block_formula_bytes": formula, **report}, f, indent=1)


if __name__ == "__main__":
    from .process import run_main
    run_main(main)
