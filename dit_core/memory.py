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


def step_memory(cfg: Config, batch: int, recompute: str = "none", blocks: int = 0, steps: int = 3,
                offload: bool = False) -> dict:
    """One GPU: memory.allocated after each phase of a training step, the step's peak, and its time (median of
    `steps` after one warm-up). `offload`: activations kept in pinned CPU memory (torch.autograd.graph.save_on_cpu)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = DiT(cfg.model).to(dev)
    model.set_recompute(recompute, blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
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
        with ctx:
            loss = diffusion.loss(model, x0, y, t, noise, None)
        torch.cuda.synchronize()
        after_forward = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        after_backward = torch.cuda.memory_allocated()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        out = {"start": start, "after_forward": after_forward, "after_backward": after_backward,
               "after_step": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}
    out["step_s"] = sorted(times[1:])[len(times[1:]) // 2]
    out["states"] = state_bytes(model)
    return out


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
    modes = ([("none", 0, False)] + [("full", b, False) for b in range(1, cfg.model.depth + 1)]
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
        for mode, blocks, offload in modes:
            r = step_memory(cfg, a.batch, mode, blocks, offload=offload)
            rows.append({"recompute": mode, "blocks": blocks if mode != "none" else 0, "save_on_cpu": offload, **r})
            print(f"{mode:9s} blocks {blocks} offload {offload}: peak {r['peak'] / MIB:8.1f} MiB, activations after "
                  f"forward {(r['after_forward'] - r['start']) / MIB:8.1f} MiB, step {r['step_s'] * 1e3:6.1f} ms",
                  flush=True)
        timeline = step_timeline(cfg, a.batch, snapshot=a.snapshot)
        for e in timeline:
            print(f"  {e['what']:48s} {e['allocated'] / MIB:9.1f} MiB")
        report = {"device": torch.cuda.get_device_name(), "rows": rows, "timeline": timeline}
    with open(a.out, "w") as f:
        json.dump({"config": a.config, "overrides": a.set, "batch": a.batch, "torch": torch.__version__,
                   "block_formula_bytes": formula, **report}, f, indent=1)


if __name__ == "__main__":
    from .process import run_main
    run_main(main)
