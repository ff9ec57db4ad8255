"""What a ZeRO rank really holds and sends: measured, then put beside the ZeRO paper's formulas.

Memory: after the first micro-batch's backward of a step with gradient accumulation (the moment
a rank holds parameters, accumulated gradients and optimizer state at once), walk every tensor
the DeepSpeed engine and its optimizer hold, count each storage once, and sort it into
parameters / gradients / optimizer state / buffers (measure.Tally).

Communication: during one whole step, every torch.distributed collective that DeepSpeed
issues is counted (measure.CommCounter: bytes of its tensor), and converted into what a
bandwidth-optimal (ring) algorithm sends per rank: all-reduce 2(N-1)/N of the data,
reduce-scatter / all-gather / reduce / broadcast (N-1)/N. This module holds the ZeRO side:
what DeepSpeed's engine holds, the paper's formulas, and the launcher's report (StepReport).
"""
from __future__ import annotations

import torch

from .measure import OneStepReport, Tally


# ---------------------------------------------------------------- memory

def measure_memory(engine) -> dict:
    """Bytes this rank holds, by category. `engine` is a dit_core.parallel.zero.DeepSpeedEngine."""
    opt = engine.engine.optimizer          # DeepSpeed's ZeRO optimizer (or the client one, stage 0)
    inner = getattr(opt, "optimizer", opt)  # the torch AdamW inside it
    params = list(engine.model.parameters())
    t = Tally()
    # Parameters: the module's weights. Stages 1-2 keep them as views of one flat buffer;
    # stage 3 keeps a partition (ds_tensor) and the full tensor only while gathered or persistent.
    for p in params:
        t.add("parameters", getattr(p, "ds_tensor", None))
        t.add("parameters", p.data)
    # Gradients: full .grad on the module, or DeepSpeed's reduced partitions.
    for p in params:
        t.add("gradients", p.grad)
    for name in ("averaged_gradients", "all_grad_tensors", "grads_in_partition", "grad_partitions_flat_buffer",
                 "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
        t.walk("gradients", getattr(opt, name, None))
    # Optimizer state: Adam's two moments, and the fp32 master partition the optimizer updates.
    t.walk("optimizer", inner.state)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        t.walk("optimizer", getattr(opt, name, None))
    # Anything else the ZeRO optimizer holds: communication buckets and staging buffers.
    if opt is not inner:
        t.walk("buffers", opt)
    return t.bytes


def formula(stage: int, psi: int, world: int, precision: str) -> dict:
    """The ZeRO paper's model-state bytes per rank (Rajbhandari et al. 2020, section 3 and 5).

    Mixed precision: 2Ψ bf16/fp16 weights + 2Ψ gradients + 12Ψ optimizer state (fp32 master,
    momentum, variance). fp32: 4Ψ + 4Ψ + 8Ψ (momentum, variance; the weights are the master).
    Stage 1 partitions the optimizer state, stage 2 also the gradients, stage 3 also the weights."""
    w, g, o = (2, 2, 12) if precision in ("bf16", "fp16") else (4, 4, 8)
    part = {k: (1 / world if stage >= s else 1.0) for k, s in (("optimizer", 1), ("gradients", 2), ("parameters", 3))}
    return {"parameters": w * psi * part["parameters"], "gradients": g * psi * part["gradients"],
            "optimizer": o * psi * part["optimizer"]}


def deepspeed_estimate(stage: int, psi: int, largest_layer: int, world: int) -> float | None:
    """DeepSpeed's own estimator of model-state bytes per GPU (no offload), for stages 2 and 3."""
    try:
        if stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
            return float(estimate_zero2_model_states_mem_needs(psi, world, 1, cpu_offload=False)[1])
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            return float(estimate_zero3_model_states_mem_needs(psi, largest_layer, world, 1, cpu_offload=False,
                                                              cpu_offload_params=False, zero_init=True)[1])
    except Exception:           # the estimators' signatures move between releases
        return None
    return None


# ---------------------------------------------------------------- communication

def comm_formula(stage: int, psi: int, world: int, accum: int = 1) -> float:
    """Elements one rank sends per optimizer step (ring algorithms), after the ZeRO paper:
    DP all-reduces the gradients once (2Ψ); ZeRO-1 reduce-scatters them once and all-gathers
    the updated weights (Ψ + Ψ); ZeRO-2 cannot keep a full gradient across micro-batches, so it
    reduce-scatters after each one (accum·Ψ + Ψ); ZeRO-3 gathers the weights for forward and again
    for backward, then reduce-scatters, every micro-batch (3Ψ each)."""
    units = {0: 2, 1: 2, 2: accum + 1, 3: 3 * accum}[stage]
    return units * psi * (world - 1) / world


# ---------------------------------------------------------------- the launcher's report

class StepReport(OneStepReport):
    """`launchers/zero.py --report PATH`: memory and communication of one step (default: step 1, after Adam's state
    exists) on every rank; rank 0 writes a JSON with the formulas beside the measurements."""

    def measure(self, engine) -> dict:
        return measure_memory(engine)

    def rank_record(self, engine) -> dict:
        return {"cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() and
                engine.model.x_embedder.weight.is_cuda else None}

    def report(self, ranks: list, engine) -> dict:
        world, stage, prec = self.strategy.world_size, self.strategy.stage, self.cfg.train.precision
        params = list(engine.model.parameters())
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        largest = max(getattr(p, "ds_numel", p.numel()) for p in params)
        elem = 2 if prec in ("bf16", "fp16") else 4
        return {
            "stage": stage, "world_size": world, "precision": prec, "psi": psi, "largest_param": largest,
            "grad_accum": self.cfg.train.grad_accum, "measured_at_step": self.step,
            "persistence_threshold": self.strategy.persistence_threshold,
            "formula": formula(stage, psi, world, prec),
            # DeepSpeed keeps a separate fp32 master partition even when training in fp32.
            "fp32_master_extra": (4 * psi / world if prec == "fp32" and stage >= 1 else 0.0),
            "deepspeed_estimate": deepspeed_estimate(stage, psi, largest, world),
            "comm_formula_bytes": comm_formula(stage, psi, world, self.cfg.train.grad_accum) * elem,
            "ranks": ranks,
        }
