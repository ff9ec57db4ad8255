"""The memory calculator's arithmetic, in Python: the book's calculator page (calculator.js) mirrors these functions
line by line, and tests/test_book.py checks both, this one against dit_core's planner and ZeRO formula, the page
against this one in a real browser.

Every constant comes from the project's modules at build time (`constants()`, written by tools/build_book.py into
_static/calculator_constants.js); nothing here or in the page repeats a number the planner owns.

Per GPU, for one micro-batch of `micro_batch` samples:
  * model states, by strategy. DDP and FSDP are `dit_core.parallel.plan.Plan.states_gib` (zero3 off / on): fp32
    weights, gradients and AdamW's moments (STATE_BYTES), an fp32 EMA copy, and under bf16 without sharding autocast's
    bf16 copies of the weights. ZeRO-1/2/3 are DeepSpeed's layouts, `dit_core.parallel.zero_report.formula`: in bf16
    DeepSpeed holds bf16 weights and gradients and keeps the fp32 master copy in the optimizer (2 + 2 + 12), so it
    makes no autocast copies. An EMA copy is sharded with the states under ZeRO-3 and FSDP (as the planner assumes)
    and whole otherwise. Tensor and pipeline parallelism divide every state by tp x pp.
  * activations: `Plan.activations_gib`: ACT_BYTES[precision] per sample, token, hidden unit and block, over tp x cp
    (Megatron's sequence parallelism beside TP assumed); 1F1B keeps pp micro-batches on the first stage, so PP does
    not shrink them. Full recomputation (`DiT.set_recompute("full", blocks)`) keeps only a recomputed block's input,
    S x h elements per sample in the activation precision (ELEMENT_BYTES; counted by dit_core.memory, see
    tests/test_book.py), adds one block's activations, rebuilt during its backward (`Plan.working_gib`), and
    drops the autocast copies of the recomputed blocks' weights (made again in backward).
"""
from __future__ import annotations

import inspect

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
COMPONENTS = ("parameters", "gradients", "optimizer", "ema", "autocast_copies", "activations")


def constants() -> dict:
    """The numbers the page needs, read from the Python modules that own them (plan.py, zero_report.py, model.py)."""
    from dit_core.model import TimestepEmbedder
    from dit_core.parallel import plan
    from dit_core.parallel.zero_report import formula
    return {
        "GIB": plan.GIB, "STATE_BYTES": plan.STATE_BYTES, "EMA_BYTES": plan.EMA_BYTES,
        "AUTOCAST_COPY_BYTES": plan.AUTOCAST_COPY_BYTES, "ACT_BYTES": dict(plan.ACT_BYTES),
        "ACT_BYTES_COMPILED_GPU": plan.ACT_BYTES_COMPILED_GPU,
        "ELEMENT_BYTES": dict(plan.ELEMENT_BYTES), "MFU": plan.MFU, "PEAK_TFLOPS": plan.PEAK_TFLOPS,
        "BUDGET": 0.9,      # plan.plan() leaves a tenth of the GPU for the allocator, buffers and workspace
        # bytes per parameter of each state, unsharded: DeepSpeed's layout by precision (ZeRO stage 0, one rank)
        "ZERO_STATE_BYTES": {p: formula(0, 1, 1, p) for p in plan.ACT_BYTES},
        "TIMESTEP_FREQ_DIM": inspect.signature(TimestepEmbedder.__init__).parameters["freq_dim"].default,
    }


def dit_params(m: dict, c: dict) -> int:
    """Trainable parameters of dit_core.model.DiT (dense MLP): patch embedding, timestep MLP, label table (with the
    null class), `depth` blocks (qkv, projection, MLP, adaLN's 6h modulation) and the final layer."""
    h, p, ch = m["hidden"], m["patch"], m["in_channels"]
    mlp = int(h * m["mlp_ratio"])
    out = p * p * ch * (2 if m["learn_sigma"] else 1)
    embed = ch * p * p * h + h + c["TIMESTEP_FREQ_DIM"] * h + h + h * h + h + (m["num_classes"] + 1) * h
    block = (3 * h * h + 3 * h) + (h * h + h) + (h * mlp + mlp) + (mlp * h + h) + (6 * h * h + 6 * h)
    final = h * out + out + 2 * h * h + 2 * h
    return embed + m["depth"] * block + final


def tokens(m: dict) -> int:
    return (m["image_size"] // m["patch"]) ** 2


def problems(m: dict) -> list:
    """What makes a layout impossible, one sentence each (the page shows the same sentences)."""
    out = []
    for k in ("hidden", "depth", "heads", "image_size", "patch", "in_channels", "num_classes", "micro_batch",
              "dp", "tp", "pp", "cp"):
        if not (isinstance(m[k], int) and m[k] >= 1):
            out.append(f"{k} must be a whole number of at least 1.")
    if out:
        return out
    if m["hidden"] % m["heads"]:
        out.append(f"hidden {m['hidden']} is not divisible by heads {m['heads']}.")
    if m["image_size"] % m["patch"]:
        out.append(f"image size {m['image_size']} is not divisible by patch {m['patch']}.")
    if m["heads"] % m["tp"]:
        out.append(f"TP {m['tp']} must divide the heads ({m['heads']}): each rank keeps whole heads.")
    if m["depth"] % m["pp"]:
        out.append(f"PP {m['pp']} must divide the depth ({m['depth']}): each stage keeps whole blocks.")
    if tokens(m) % m["cp"]:
        out.append(f"CP {m['cp']} must divide the tokens ({tokens(m)}): each rank keeps a slice of them.")
    return out


def memory(m: dict, c: dict) -> dict:
    """Bytes per GPU, by component, for each strategy in STRATEGIES: {strategy: {component: bytes, "total": bytes}},
    and for DDP and FSDP also "peak", one step's peak (`Plan.peak_gib` at one micro-batch per step: the gradients and
    the kept activations are not held at once, so the larger of the two counts). `m`: hidden, depth, heads, mlp_ratio,
    image_size, patch, in_channels, num_classes, learn_sigma, micro_batch, precision ("fp32", "bf16", or "bf16c": bf16
    with the activation bytes measured for the compiled step on one H100, ACT_BYTES_COMPILED_GPU), ema (bool),
    recompute ("none" or "full"), recompute_blocks (0 = all), dp, tp, pp, cp."""
    psi = dit_params(m, c)
    share = psi / (m["tp"] * m["pp"])                       # the parameters one tp x pp rank holds
    dp = m["dp"]
    compiled = m["precision"] == "bf16c"
    prec = "bf16" if compiled else m["precision"]
    fp32 = c["ZERO_STATE_BYTES"]["fp32"]
    # plan.py's STATE_BYTES split as fp32 weights, gradients and AdamW's moments are (4 : 4 : 8)
    scale = c["STATE_BYTES"] / (fp32["parameters"] + fp32["gradients"] + fp32["optimizer"])
    depth, blocks = m["depth"], m["recompute_blocks"]
    recomputed = 0 if m["recompute"] != "full" else (depth if blocks == 0 or blocks >= depth else blocks)
    per_block = tokens(m) * m["hidden"] * m["micro_batch"] / (m["tp"] * m["cp"])
    act = c["ACT_BYTES_COMPILED_GPU"] if compiled else c["ACT_BYTES"][prec]
    kept = per_block * (act * (depth - recomputed) + c["ELEMENT_BYTES"][prec] * recomputed)
    working = per_block * act if recomputed else 0.0
    activations = kept + working
    copies = c["AUTOCAST_COPY_BYTES"] * share * (1 - recomputed / depth)
    ema = c["EMA_BYTES"] * share if m["ema"] else 0.0
    result = {}
    for s in STRATEGIES:
        if s in ("ddp", "fsdp"):
            part = dp if s == "fsdp" else 1
            r = {k: fp32[k] * scale * share / part for k in ("parameters", "gradients", "optimizer")}
            r["ema"] = ema / part
            r["autocast_copies"] = copies if s == "ddp" and prec != "fp32" else 0.0
        else:
            stage = int(s[-1])
            w = c["ZERO_STATE_BYTES"][prec]
            r = {"parameters": w["parameters"] * share / (dp if stage >= 3 else 1),
                 "gradients": w["gradients"] * share / (dp if stage >= 2 else 1),
                 "optimizer": w["optimizer"] * share / dp,
                 "ema": ema / (dp if stage >= 3 else 1), "autocast_copies": 0.0}
        r["activations"] = activations
        r["total"] = sum(r[k] for k in COMPONENTS)
        if s in ("ddp", "fsdp"):
            r["peak"] = r["total"] - r["gradients"] - activations + max(kept, r["gradients"]) + working
        result[s] = r
    return result
