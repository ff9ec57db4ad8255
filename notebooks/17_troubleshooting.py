# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 17 · Memory, recomputation, RoPE, ONNX, and troubleshooting (故障排查)
#
# **The idea.** The fundamentals the course notes teach beside the strategies: where a training step's GPU memory
# (显存) goes, and when; how **activation recomputation** (激活重计算, also "activation checkpointing") and
# **offload** (卸载) trade time for it, and what to reach for, in order, when memory runs out (out of memory,
# reproduced on purpose); a **rotary position embedding** (旋转位置编码, RoPE) for the DiT; running the trained
# denoiser without PyTorch through **ONNX**. Then the other symptoms every learner meets, each one reproduced on
# purpose and fixed: a loss that becomes NaN, a loss that does not fall, a distributed job that hangs, ranks that
# disagree, and what TF32 does to fp32. At the end, **scaling laws** (缩放定律) in miniature.
#
# The code: `dit_core/memory.py` (counting and measuring memory), `train.recompute` / `train.recompute_blocks`
# (activation checkpointing in the training loop), `model.pos_embed=rope2d` (in `dit_core/model.py`),
# `dit_core/export.py` (ONNX), `tools/oom_demo.py`, `tools/hang_demo.py`, `tools/rank_checksums.py`,
# `tools/tf32.py`, `tools/scaling.py`. Every cell that runs something runs it on this 2-core CPU; the GPU figures
# are read from files measured on one H200 with the project's own tools: `docs/measurements/1xh200-2026-12-03/`
# (`tools/gpu_fundamentals.sh`).

# %%
import contextlib, os, json, math, re, shlex, subprocess, sys
import numpy as np
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.logs import read_jsonl
from dit_core.model import DiT, apply_rope, rope_2d_tables
from dit_core.memory import state_bytes, saved_activation_bytes, block_activation_elements
from dit_core.parity import BITWISE, SUM_ORDER, parity, run_here
from dit_core.plots import sample_grid

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
os.chdir("..")  # launchers are run from the repository root
GPU = "docs/measurements/1xh200-2026-12-03"
MIB = 2 ** 20
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "run.save_final=false", "--overwrite"]

# %% [markdown]
# ## 1. Where a training step's memory goes
#
# Two kinds of memory. **Model states** are there all the time: fp32 parameters (4 bytes each), their gradients
# (4) and AdamW's two moments (8), 16 bytes per parameter (chapter 07). **Activations** exist between a forward and
# its backward: every tensor autograd saves to compute a gradient later. They grow with batch x tokens x hidden x
# depth, and at any realistic batch they are the larger part. On a CPU there is no allocator to ask, so the
# activations are *counted*: a `saved_tensors_hooks` pack hook sees every tensor autograd saves, and
# `memory.saved_activation_bytes` adds each storage once, weights excluded. Beside the count, the formula for one
# block (`memory.block_activation_elements`), read off the block's operations: the LayerNorm inputs, the modulated
# inputs, q, k, v and the attention output, the projections' inputs, the gated branches, fc1's input and GELU's and
# fc2's 4h-wide inputs, which is S·h·(12 + 2·4) = 20·S·h per sample, plus small per-token and per-sample terms.

# %%
cfg = load_config("configs/tiny.yaml", {})
m = cfg.model
counted = {}
for depth in (1, 2, 4):
    c = load_config("configs/tiny.yaml", {"model.depth": depth})
    torch.manual_seed(0)
    counted[depth] = saved_activation_bytes(DiT(c.model), c, batch=8)
tokens = (m.image_size // m.patch_size) ** 2
per_block = block_activation_elements(tokens, m.hidden_size, m.num_heads, m.mlp_ratio) * 4 * 8
torch.manual_seed(0)
states = state_bytes(DiT(cfg.model))
print(f"tiny DiT (hidden {m.hidden_size}, {tokens} tokens), batch 8, fp32:")
print(f"  model states: parameters {states['parameters'] / MIB:.2f} MiB, gradients {states['gradients'] / MIB:.2f} MiB, "
      f"AdamW moments {states['optimizer'] / MIB:.2f} MiB")
print(f"  activations counted, depth 1 / 2 / 4: {', '.join(f'{counted[d] / MIB:.3f}' for d in (1, 2, 4))} MiB")
print(f"  one block, counted (depth 2 - depth 1): {counted[2] - counted[1]:,} bytes; formula: {per_block:,} bytes")

# %%
# NBVAL_CHECK_OUTPUT
print("one block's activations: formula == count, exactly:", counted[2] - counted[1] == per_block,
      "| linear in depth:", counted[4] - counted[2] == 2 * per_block)

# %% [markdown]
# On one H200 the allocator can be asked. `python -m dit_core.memory --config configs/bench.yaml --batch 256` trains
# the benchmark DiT (hidden 384, depth 12, 196 tokens) in fp32 and reads `torch.cuda.memory_allocated` after every
# block's forward and backward (`step_timeline`). It also writes torch's memory snapshot of that step
# (`snapshot.pickle` in the measurements folder: drop it on https://pytorch.org/memory_viz to see every
# allocation with its stack):

# %%
mem = json.load(open(f"{GPU}/memory.json"))
tl = mem["timeline"]
steps_ = [e for e in tl if e["what"] != "peak of the step"]
peak = next(e["allocated"] for e in tl if e["what"] == "peak of the step")
fwd = [e["allocated"] for e in steps_ if e["what"].startswith("forward block")]
gpu_block = float(np.median(np.diff(fwd)))
fig, ax = plt.subplots(figsize=(10, 3.4))
ax.plot(range(len(steps_)), [e["allocated"] / 2 ** 30 for e in steps_], "o-", ms=3)
ax.axhline(peak / 2 ** 30, color="C3", ls=":", label=f"peak {peak / 2 ** 30:.1f} GiB")
ticks = [i for i, e in enumerate(steps_) if not e["what"].startswith(("forward block", "backward block"))
         or e["what"].endswith(" 0") or e["what"].endswith(" 11")]
ax.set_xticks(ticks, [steps_[i]["what"].split(" (")[0] for i in ticks], rotation=30, ha="right", fontsize=7)
ax.set_ylabel("GiB allocated"); ax.legend(); ax.set_title("one training step, bench DiT, batch 256, fp32, one H200")
plt.tight_layout()
print(f"allocated at the start: {steps_[0]['allocated'] / MIB:.0f} MiB, of which weights and AdamW moments "
      f"{(mem['rows'][0]['states']['parameters'] + mem['rows'][0]['states']['optimizer']) / MIB:.0f} MiB")
print(f"each block's forward adds {gpu_block / MIB:.1f} MiB; the formula says "
      f"{mem['block_formula_bytes'] / MIB:.1f} MiB ({gpu_block / mem['block_formula_bytes'] - 1:+.1%})")
print(f"peak {peak / MIB:.0f} MiB, at the turn from forward to backward; after backward {steps_[-3]['allocated'] / MIB:.0f} MiB")

# %% [markdown]
# **What to notice.** Memory climbs by the same step for each block's forward and falls by it in each block's
# backward: the peak sits at the turn from forward to backward, when every block's activations are alive and the
# first gradients are being made. What is allocated at the start of a step (446 MiB: the fp32 weights and AdamW's
# moments, 372 MiB, plus the batch and small buffers) is 2% of the peak (18.3 GiB). Sharding them (ZeRO,
# FSDP) would save little here, which is what chapter 07 measured on two GPUs (every stage's peak 5.1-5.2 GiB). The
# counted formula is within 0.3% of the GPU's per-block step. The rest is probably the CUDA attention kernel saving
# slightly different tensors than the CPU one (not looked at here).
#
# ## 2. Recomputation and offload, on the DiT itself
#
# `train.recompute=full` wraps each block in `torch.utils.checkpoint` (non-reentrant): forward keeps only the
# block's input, and backward runs the block again to get what it needs. `train.recompute_blocks=N` does it for the
# first N blocks only. `train.recompute=attention` recomputes only the attention core, which is Korthikanti et al.'s
# (2022) *selective* recomputation: it targets the S² attention scores, the largest activations when attention is
# computed as matmul-softmax-matmul. Recomputation runs the same operations on the same inputs again, so on the CPU
# the loss and the gradient norm must be **bitwise** those of keeping every activation, at every step
# (`parity(..., BITWISE)`). `launchers/single.py` on this CPU, 30 steps of a small DiT (hidden 32, depth 2), each
# mode against keeping everything (on a GPU the same switch: `python launchers/single.py --config configs/mnist.yaml
# --set train.recompute=full`, `--device auto` takes the GPU):

# %%
STEPS = 6 if SMOKE else 30
modes = {"keep everything": [], "full, every block": ["--set", "train.recompute=full"],
         "full, first block only": ["--set", "train.recompute=full", "--set", "train.recompute_blocks=1"],
         "attention core": ["--set", "train.recompute=attention"]}
logs = dict(zip(modes, run_here("launchers/single.py", [SMALL + ["--max-steps", str(STEPS), "--results-dir",
                                                                 f"/tmp/ch17/rc{i}"] + f
                                                        for i, f in enumerate(modes.values())])))
ref = logs.pop("keep everything")
recompute_parity = {name: parity(ref, log, BITWISE) for name, log in logs.items()}
for name, v in recompute_parity.items():
    print(f"{name:24s} {v}")

# %%
# NBVAL_CHECK_OUTPUT
for name, v in recompute_parity.items():
    print(f"{name:24s} against keeping every activation, loss and gradient norm at every step, bitwise: "
          f"{'PASS' if v.ok else 'FAIL'}")

# %%
rows = mem["rows"]
full = [r for r in rows if r["recompute"] in ("none", "full") and not r["save_on_cpu"]]
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
a1.plot([r["blocks"] for r in full], [r["peak"] / 2 ** 30 for r in full], "o-")
a1.set_xlabel("blocks recomputed (of 12)"); a1.set_ylabel("peak GiB")
a2.plot([r["blocks"] for r in full], [r["step_s"] * 1e3 for r in full], "o-", color="C1")
a2.set_xlabel("blocks recomputed (of 12)"); a2.set_ylabel("step ms")
plt.suptitle("bench DiT, batch 256, fp32, one H200 (python -m dit_core.memory)", fontsize=9); plt.tight_layout()
base = rows[0]
print(f"{'variant':34s} {'peak MiB':>9s} {'step ms':>8s}")
for r in rows:
    name = ("save_on_cpu (pinned)" if r["save_on_cpu"] else
            f"recompute {r['recompute']}" + (f", {r['blocks']} blocks" if r["recompute"] == "full" else ""))
    if r["recompute"] == "full" and r["blocks"] not in (1, 6, 12):
        continue
    print(f"{name:34s} {r['peak'] / MIB:9.0f} {r['step_s'] * 1e3:8.1f}   "
          f"({r['peak'] / base['peak']:.2f}x memory, {r['step_s'] / base['step_s']:.2f}x time)")
by_n = {r["blocks"]: r for r in full}                 # 0: nothing recomputed; 1-12: the first N blocks
per_mem, per_s = (by_n[0]["peak"] - by_n[11]["peak"]) / 11, (by_n[11]["step_s"] - by_n[0]["step_s"]) / 11
print(f"blocks 1 to 11: each recomputed block gives back {per_mem / 2 ** 30:.2f} GiB of the peak for {per_s * 1e3:.1f} ms "
      f"({per_s / base['step_s']:.1%} of the step); the 12th gives back {(by_n[11]['peak'] - by_n[12]['peak']) / MIB:.0f} MiB; "
      f"with all 12 recomputed, allocated at the end of forward {by_n[12]['after_forward'] / 2 ** 30:.2f} GiB, "
      f"the peak {by_n[12]['peak'] / 2 ** 30:.2f} GiB")
z2 = {k: json.load(open(f"{GPU}/{f}_bench1024.json")) for k, f in (("ZeRO-2", "zero2"), ("with offload", "zero2_offload"))}
print(f"ZeRO-Offload, one H200, configs/bench.yaml at hidden 1024 ({z2['ZeRO-2']['psi']:,} parameters), "
      f"{z2['ZeRO-2']['precision']}, one rank: CUDA peak "
      + ", ".join(f"{k} {z['ranks'][0]['cuda_peak_bytes'] / MIB:,.0f} MiB" for k, z in z2.items()))

# %% [markdown]
# **What to notice.** Each recomputed block gives back its 1.4 GiB at about 5.7 ms, or 2.7% of the step, up to
# the 11th: recomputing all 12 takes the peak from 18.3 to 3.0 GiB for 33% more time, about one extra forward (a
# forward is roughly a third of a step). The memory line is straight up to 11 blocks and flattens at the last (132 MiB,
# the line above): with everything recomputed, the peak is no longer at the end of forward (1.52 GiB then) but inside
# backward, where
# one block's activations are rebuilt beside the gradients. So `recompute_blocks` buys memory block by block, down to
# that floor. Selective recomputation of the attention core saves almost nothing here: this DiT's attention runs in
# a fused kernel (in fp32 on the GPU the memory-efficient one; a fused CPU kernel here) that never stores the S x S scores, so
# the term selective recomputation was designed for is already gone. `save_on_cpu(pin_memory=True)` moves every
# saved activation to pinned host memory (peak 1.5 GiB, below full recomputation) but costs 4.7x the time: the
# copies over PCIe are not overlapped with compute. ZeRO-Offload (DeepSpeed's `offload_optimizer: cpu`,
# `configs/ds_zero2_offload.json`) keeps the fp32 master weights, AdamW's moments and the optimizer step in CPU
# memory. DeepSpeed refuses the project's AdamW there unless `zero_force_ds_cpu_optimizer` is false (it wants its
# compiled `DeepSpeedCPUAdam`); with that flag, ZeRO-2 with offload matches the single process on 2 CPU processes
# (1.6e-7 over 20 steps, `tests/test_zero.py`, as `docs/results.md` reports; not run here). On a CPU the "offload" moves nothing, so its memory was measured on
# one H200, where model states dominate: `configs/bench.yaml` at hidden 1024 (230M parameters), bf16, batch 8, one
# rank, `--report`: ZeRO-2's CUDA peak 5,819 MiB, with offload 2,328 MiB (the last line above, from
# `zero2*_bench1024.json` in the measurements folder), for 2.6x the time (20 steps in 13.2 s instead of 5.1 s: the
# run's times as `docs/results.md` reports them; the JSON files hold no time). For this section's bench DiT, whose states
# are 2% of the peak, it would save little.
#
# ## 3. Out of memory: the order of remedies
#
# Reproduced on this CPU: `tools/oom_demo.py` caps its own memory at 2 GiB (`RLIMIT_DATA`: the heap and anonymous
# mappings, where the CPU allocator puts every tensor) and runs one training step of the tiny DiT at a batch of
# 8192, whose block activations (2.6 GiB by the formula of section 1) do not fit. Then the same step with every block
# recomputed; when it fits, the tool prints the process's peak resident memory (`ru_maxrss`, torch's own libraries
# included). On a GPU the error is `torch.cuda.OutOfMemoryError`, and its message also gives the memory allocated
# and reserved by PyTorch.

# %%
oom = {}
for r_ in ("none", "full"):
    res_ = subprocess.run([sys.executable, "tools/oom_demo.py", "--limit-mib", "2048", "--batch", "8192", "--recompute", r_],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.getcwd()))
    oom[r_] = res_.stdout.strip()
    print(oom[r_])
print(f"formula: {block_activation_elements(16, 64, 4) * 4 * 8192 * 4 / 2 ** 30:.2f} GiB of block activations at batch 8192")

# %%
# NBVAL_CHECK_OUTPUT
print("batch 8192 in 2 GiB: the step runs out of memory:", "can't allocate memory" in oom["none"],
      "| with train.recompute=full it fits:", ": ok," in oom["full"])

# %% [markdown]
# Before the remedies, one number the table needs: how much a **bf16 autocast** (自动混合精度) step keeps. The count of section 1,
# under `torch.autocast(dtype=torch.bfloat16)`, for the bench DiT of section 2 at a batch of 1 and of 2: the
# difference is what one sample adds, the rest is kept once per step. Autocast does not run every operation in bf16,
# and its lists differ between devices: CPU autocast runs `layer_norm` in bf16, CUDA autocast runs it in fp32 (so
# its input, statistics and output stay 4 bytes). The CPU count is made both ways: with CPU autocast's own rules,
# and with `layer_norm` moved to fp32 as on a GPU.

# %%
bench = load_config("configs/bench.yaml", {})
_layer_norm = F.layer_norm


@contextlib.contextmanager
def layer_norm_in_fp32():
    """CUDA autocast's rule for layer_norm, on the CPU: the input cast to fp32 and the norm run outside autocast."""
    def ln(x, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return _layer_norm(x.float(), *args, **kwargs)
    F.layer_norm = ln                     # nn.LayerNorm calls F.layer_norm at every forward
    try:
        yield
    finally:
        F.layer_norm = _layer_norm


AMP = {"fp32": (False, False), "bf16 autocast, CPU's rules": (True, False),
       "bf16 autocast, layer_norm in fp32 (CUDA's)": (True, True)}
per_sample, once = {}, {}
for name, (bf16, ln32) in AMP.items():
    n = {}
    for b in (1, 2):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                (layer_norm_in_fp32() if ln32 else contextlib.nullcontext()):
            n[b] = saved_activation_bytes(DiT(bench.model), bench, batch=b)
    per_sample[name], once[name] = n[2] - n[1], 2 * n[1] - n[2]
n_params = sum(p.numel() for p in DiT(bench.model).parameters())
print(f"bench DiT ({n_params:,} parameters, 196 tokens), what autograd keeps, counted on this CPU:")
for name in AMP:
    print(f"  {name:44s} {per_sample[name] / MIB:6.2f} MiB per sample "
          f"({per_sample[name] / per_sample['fp32']:.3f}x fp32), {once[name] / MIB:5.1f} MiB once per step")

# %%
# NBVAL_CHECK_OUTPUT
r_cpu, r_cuda = (per_sample[k] / per_sample["fp32"] for k in list(AMP)[1:])
print("fp32: everything kept grows with the batch (nothing kept once):", once["fp32"] == 0)
print("bf16, CPU's rules: about half of fp32 per sample (0.45-0.55):", 0.45 < r_cpu < 0.55,
      "| layer_norm in fp32: more than half (> 0.55):", r_cuda > 0.55)
print("bf16: what is kept once is about 2 bytes per parameter (autocast's bf16 copies of the weights, within 2%):",
      all(abs(once[k] / (2 * n_params) - 1) < 0.02 for k in list(AMP)[1:]))

# %% [markdown]
# From section 2's measurements (bench DiT, fp32, batch 256 on one H200, peak 18.3 GiB, 2% of it model states) and
# the counts above, what each remedy costs and saves, cheapest first. Only row 2 is measured at this size; the others
# are arithmetic on those numbers:

# %%
none = rows[0]
act = none["peak"] - none["start"]
full12 = next(r for r in rows if r["recompute"] == "full" and r["blocks"] == 12)
amp_ = list(AMP)[2]
print(f"{'remedy':58s} {'peak GiB':>9s}  cost")
print(f"{'as measured (batch 256)':58s} {none['peak'] / 2 ** 30:9.1f}")
print(f"{'1. halve the micro-batch, accumulate 2 (same global batch)':58s} {(none['start'] + act / 2) / 2 ** 30:9.1f}"
      "  (arithmetic: activations / 2) the same result, more, smaller steps")
print(f"{'2. recompute all 12 blocks (measured)':58s} {full12['peak'] / 2 ** 30:9.1f}"
      f"  {full12['step_s'] / none['step_s'] - 1:+.0%} time")
print(f"{'3. bf16 autocast':58s} {(none['start'] + act * r_cuda + once[amp_]) / 2 ** 30:9.1f}"
      f"  (arithmetic: activations x {r_cuda:.2f}, counted with CUDA's layer_norm rule, + {once[amp_] / MIB:.0f} MiB "
      f"of weight copies; x {r_cpu:.2f} would give {(none['start'] + act * r_cpu + once[amp_]) / 2 ** 30:.1f}) "
      "faster on a GPU, a looser tolerance")
print(f"{'4. ZeRO-3 / FSDP over 8 GPUs (model states / 8)':58s} {(none['peak'] - none['start'] * 7 / 8) / 2 ** 30:9.1f}"
      f"  (arithmetic) communication; here it saves {none['start'] * 7 / 8 / 2 ** 30:.1f} GiB")

# Row 3 measured: one training step of the same DiT at batch 256 on one H100 (torch 2.11; `dit_core.memory.step_memory`
# in fp32 and under bf16 autocast, recorded in docs/measurements/1xh100-2026-12-06-session/bf16_memory.json)
h100 = json.load(open("docs/measurements/1xh100-2026-12-06-session/bf16_memory.json"))["step"]       # cwd: the repository root
above = {k: h100[k]["after_forward"] - h100[k]["start"] for k in ("fp32", "bf16")}
print(f"{'3, measured on one H100: fp32 peak':58s} {h100['fp32']['peak'] / 2 ** 30:9.1f}")
print(f"{'3, measured on one H100: bf16 autocast peak':58s} {h100['bf16']['peak'] / 2 ** 30:9.1f}"
      f"  activations {above['bf16'] / above['fp32']:.3f} x fp32's (the CPU count with CUDA's rule: {r_cuda:.3f})")
print("the CPU count predicts the GPU's activation ratio within 2%:", abs(above["bf16"] / above["fp32"] / r_cuda - 1) < 0.02)

# %% [markdown]
# Batch and accumulation come first because they change nothing about the result (chapter 04 proved accumulation
# equals the large batch). Recomputation changes only the time, bf16 changes the numerics within the curve
# tolerance, and sharding (ZeRO, FSDP, chapters 07 and 13) changes the program. It pays when model states, not
# activations, fill the GPU, which is not the case here. For a large model it is the other way round (chapter 16's
# planning table). Also check for memory held by mistake: a loss accumulated with its graph (`total += loss`
# instead of `loss.item()`), or a list of outputs kept across steps.
#
# bf16 autocast is not the halving it is often taken for. Counted on this CPU, the bench DiT keeps 70.0 MiB per
# sample in fp32 and 35.1 MiB (0.50x) under CPU autocast's rules, but 42.2 MiB (0.60x) with `layer_norm` in fp32,
# which is what CUDA autocast does (PyTorch's autocast op reference lists `layer_norm` among the CUDA ops that
# autocast to float32): each block's two LayerNorms keep their input, statistics and output in 4 bytes. On top
# comes what is kept once per step, 61.6 MiB here: autocast's bf16 copies of the weights, about 2 bytes per
# parameter, held from their first use in forward until backward has used them. Row 3 is therefore 11.3 GiB, not
# the 9.4 GiB that halving would give. That row is arithmetic on a CPU count; the measurement is
# `torch.cuda.max_memory_allocated` with and without autocast on a GPU, made once on one H100 (the last three lines):
# there the step's activations under bf16 are 0.603x fp32's, the ratio the CPU count with CUDA's LayerNorm rule
# predicts, and the peak 11.5 GiB (that H100 run's fp32 peak was 18.5 GiB, the H200's 18.3).
#
# ## 4. A 2-D rotary position embedding
#
# DiT adds a fixed sin-cos embedding to the tokens once. RoPE (Su et al., 2021, "RoFormer") instead *rotates*
# every head's query and key vectors, channel pair by channel pair, by an angle proportional to the token's
# position. A rotation by angle mθ applied to q at position m and nθ applied to k at position n leaves
# q·k = |q||k|cos(... + (m - n)θ), so the score depends only on the **offset** m - n. `model.pos_embed=rope2d` makes
# it 2-D the axial way (Heo et al., 2024, "Rotary Position Embedding for Vision Transformer"): half the channel
# pairs turn with the token's row, half with its column.
#
# Four checks, on the tables the model itself rotates with (`blocks[0].attn.rope_cos`, `rope_sin`; the tiny DiT's
# 4 x 4 grid, head size 16) and `model.apply_rope`:
# 1. **only the offset counts**: a different random query and key at every position; move all of them by the same
#    (dy, dx) (each vector rotated by its new position's angles) and every score between two moved tokens must stay
#    what it was;
# 2. **both axes are seen**: one query vector and one key vector, the key at offset (0, 1) or (1, 0) from the query,
#    must score differently from the key on the query's own position;
# 3. **rows and columns are told apart**: offsets (0, 1) and (1, 0) must give different scores;
# 4. **two-dimensional, not the flattened index**: (0, 1) and (1, -3) are both one step apart in the flattened order
#    (row x 4 + column) and must give different scores.
#
# Each check must be able to fail, so the same four run on four tables built wrong on purpose: a 1-D RoPE over the
# flattened index (every pair turned by row x 4 + column), one that ignores the column (its pairs never turn), one
# that turns every pair by row + column, and the tables of a 5 x 5 grid used on 4 x 4 tokens.

# %%
rcfg = load_config("configs/tiny.yaml", {"model.pos_embed": "rope2d"})
torch.manual_seed(0)
attn = DiT(rcfg.model).blocks[0].attn              # the tables the model rotates q and k with
g, D = rcfg.model.image_size // rcfg.model.patch_size, attn.head_dim
pos = [(i // g, i % g) for i in range(g * g)]
at = {p_: i for i, p_ in enumerate(pos)}


def rope_scores(cos, sin, q, k):
    """Every rotated query against every rotated key; q, k: (tokens, D), row i turned by the angles of table row i."""
    return apply_rope(q[None, :, None], cos, sin)[0, :, 0] @ apply_rope(k[None, :, None], cos, sin)[0, :, 0].T


def rope_checks(cos, sin, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(g * g, D, generator=gen), torch.randn(g * g, D, generator=gen)   # a different pair per token
    base = rope_scores(cos, sin, q, k)
    moved = 0.0
    for t in ((0, 1), (1, 0), (1, 1), (2, -1), (-1, 2)):        # every token moved by t: offsets unchanged
        keep = [i for i, (r, c) in enumerate(pos) if (r + t[0], c + t[1]) in at]
        to = [at[(pos[i][0] + t[0], pos[i][1] + t[1])] for i in keep]
        after = rope_scores(cos[to], sin[to], q[keep], k[keep])
        moved = max(moved, float((after - base[keep][:, keep]).abs().max() / base.abs().max()))
    # one query vector on every token against one key vector on every token: the score of each offset
    same = rope_scores(cos, sin, torch.randn(1, D, generator=gen).repeat(g * g, 1),
                       torch.randn(1, D, generator=gen).repeat(g * g, 1))
    by_offset = {}
    for m_, (r1, c1) in enumerate(pos):
        for n_, (r2, c2) in enumerate(pos):
            by_offset.setdefault((r2 - r1, c2 - c1), []).append(float(same[m_, n_]))
    s = {o: float(np.mean(v)) for o, v in by_offset.items()}
    scale = max(abs(v) for v in s.values())
    differ = lambda a, b: abs(s[a] - s[b]) / scale > 1e-3
    return {"moved": moved, "scores": s,
            "checks": {"only the offset": moved <= 1e-5,
                       "both axes": differ((0, 1), (0, 0)) and differ((1, 0), (0, 0)),
                       "rows vs columns": differ((0, 1), (1, 0)),
                       "2-D, not flat": differ((0, 1), (1, 1 - g))}}


def tables(angles):
    return angles.cos().float(), angles.sin().float()


theta = 100.0 ** (-torch.arange(D // 2, dtype=torch.float64) / (D // 2))     # one angle step per channel pair
row_ = torch.tensor([r for r, _ in pos], dtype=torch.float64)[:, None]
col_ = torch.tensor([c for _, c in pos], dtype=torch.float64)[:, None]
no_col = (attn.rope_cos.clone(), attn.rope_sin.clone())
no_col[0][:, D // 4:], no_col[1][:, D // 4:] = 1.0, 0.0     # the column's half of the pairs never turns
TABLES = {"rope2d (the model's tables)": (attn.rope_cos, attn.rope_sin),
          "1-D over the flattened index": tables((row_ * g + col_) * theta),
          "column ignored": no_col,
          "row + column on every pair": tables((row_ + col_) * theta),
          "tables of a 5 x 5 grid": tuple(t[:g * g] for t in rope_2d_tables(D, g + 1))}
rope = {name: rope_checks(*t) for name, t in TABLES.items()}
SHOWN = ((0, 0), (0, 1), (1, 0), (1, 1 - g))
print(f"{'tables':30s} {'moved':>8s} " + " ".join(f"{'s' + str(o):>9s}" for o in SHOWN))
for name, r in rope.items():
    print(f"{name:30s} {r['moved']:8.1e} " + " ".join(f"{r['scores'][o]:9.4f}" for o in SHOWN))
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
for ax, name in zip(axes, list(TABLES)[:2]):
    off = np.array([[rope[name]["scores"][(dr, dc)] for dc in range(1 - g, g)] for dr in range(1 - g, g)])
    ax.imshow(off, cmap="RdBu", extent=(-g + 0.5, g - 0.5, g - 0.5, -g + 0.5))
    ax.set_xlabel("column offset"); ax.set_ylabel("row offset"); ax.set_title(f"score by offset: {name}", fontsize=9)
plt.tight_layout()

# %%
# NBVAL_CHECK_OUTPUT
print(f"{'tables':30s} " + " ".join(f"{c:>16s}" for c in rope[list(TABLES)[0]]["checks"]))
for name, r in rope.items():
    print(f"{name:30s} " + " ".join(f"{'pass' if ok else 'FAIL':>16s}" for ok in r["checks"].values()))

# %% [markdown]
# **What to notice.** The model's tables pass all four checks: moving every token by the same offset changes no score
# by more than 2.1e-7 of the largest (fp32 rounding). Each wrong table fails exactly the check that guards against it,
# and the first two columns show why one check is not enough. The 1-D RoPE over the flattened index passes the
# offset check too, because moving a token by (dy, dx) moves its flattened index by 4·dy + dx; only check 4 sees that
# it scores (0, 1) and (1, -3) alike (-7.96 both). The table that ignores the column is also translation-invariant;
# check 2 sees that a key one column to the right scores as if it sat on the query's own position. The row + column
# table cannot tell (0, 1) from (1, 0). Tables of the wrong grid size turn tokens by angles of the wrong rows (token
# 4 of a 4 x 4 grid is row 1, column 0; of a 5 x 5 grid, row 0, column 4), which check 1 catches at once. The left
# picture is the model's score for each (row, column) offset; the right one, the 1-D RoPE's, takes one value wherever
# 4·dy + dx is the same, such as (0, 1) and (1, -3).
#
# Trained at `configs/mnist.yaml` for 1,500 steps on one H200 with each embedding (`tools/time_to_quality.py`, the
# same seed, batches and steps; 1,000 guided samples scored by the workbook's classifier and feature FID):

# %%
for pos_ in ("sincos", "rope2d"):
    qj = json.load(open(f"{GPU}/rope_{pos_}.json"))
    last = qj["points"][-1]
    print(f"{pos_:7s}: step {last['step']}, loss {last['loss']:.4f}, sample accuracy {last['accuracy']:.1%} "
          f"(worst class {last['min_class_accuracy']:.0%}), FID {last['fid']:.1f} (floor {last['fid_floor']:.1f}); "
          f"snapshots at steps {[p['step'] for p in qj['points']]}")

# %% [markdown]
# At equal steps the two are close: 100.0% and 99.9% sample accuracy, FID 34.6 and 38.9, one run each. On a fixed
# 4 x 4 grid of a 28 x 28 image, sin-cos has nothing to lose: every image has the same size, so absolute positions
# are as good as offsets. RoPE's strengths lie elsewhere: images of other sizes than the training one, and long
# sequences. For text, 1-D RoPE turns each pair by the token's index (RoFormer; LLaMA and most current LLMs use it).
# T5 (Raffel et al., 2020) instead adds a learned scalar bias to each attention score, indexed by the offset m - n
# put into logarithmic buckets (exact for small offsets, coarser for far ones), shared across layers. The
# token-splitting strategies (Ulysses, context parallelism) refuse `rope2d` in one sentence: their ranks would have
# to pass on the positions of their token slices, which this workbook does not do yet.
#
# ## 5. The denoiser without PyTorch: ONNX
#
# `torch.onnx.export` (the `torch.export`-based exporter) turns the DiT's forward (x_t, t, y) into an ONNX graph with
# a dynamic batch, and onnxruntime runs it. `export.OnnxDenoiser` gives the session the two members the samplers
# use, `cfg` and the DiT's own `forward_with_cfg`, so `Diffusion.sample` runs the exported graph unchanged.
# (Needs the `onnx` extra: `pip install -e ".[onnx]"`.) A tiny DiT trained briefly on this CPU, exported, checked
# and sampled:

# %%
from dit_core.checkpoint import model_from_checkpoint
from dit_core.diffusion import Diffusion
from dit_core.export import OnnxDenoiser, export_onnx, max_difference

ONNX_STEPS = 20 if SMOKE else 1500
run_here("launchers/single.py", [["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(ONNX_STEPS),
                                  "--set", "train.tensorboard=false", "--results-dir", "/tmp/ch17/onnx", "--overwrite"]])
from pathlib import Path
model, mcfg = model_from_checkpoint(Path(f"/tmp/ch17/onnx/checkpoint-{ONNX_STEPS}"))
model.eval()
session = OnnxDenoiser(export_onnx(model, "/tmp/ch17/dit.onnx"), mcfg.model)
diff = max_difference(model, session, batch=16)
d = Diffusion(mcfg.diffusion)
labels = torch.arange(10).repeat_interleave(4)
a_img = d.sample(model, labels, cfg_scale=3.0, steps=25, seed=0)
b_img = d.sample(session, labels, cfg_scale=3.0, steps=25, seed=0)
print(f"{os.path.getsize('/tmp/ch17/dit.onnx') / MIB:.2f} MiB of ONNX; max |PyTorch - onnxruntime| over 16 inputs: "
      f"{diff:.1e}; over 40 sampled images: {(a_img - b_img).abs().max():.1e}")
sample_grid(b_img, nrow=10, title=f"sampled with onnxruntime (tiny DiT, {ONNX_STEPS} CPU steps)");

# %%
# NBVAL_CHECK_OUTPUT
print("onnxruntime == PyTorch, outputs (<= 1e-5) and sampled images (<= 1e-4):", diff <= 1e-5,
      float((a_img - b_img).abs().max()) <= 1e-4)

# %% [markdown]
# ## 6. The loss is NaN, or far too large
#
# Two usual causes. **fp16 without a loss scaler**: fp16's largest number is 65504 and its smallest normal one
# 6.1e-5 (chapter 04), so a large activation overflows to inf, inf - inf is NaN, and small gradients round to 0.
# **A learning rate too high**: the weights jump out of the region where the loss is smooth, activations grow each
# step, and the loss overflows even in fp32. Before it overflows, a diverging run is finite and looks like a run:
# it writes checkpoints, with a loss of 1e15 and weights thousands of times a healthy run's. So the loop judges
# divergence (发散) by two finite measures as well (chapter 04): the weights' norm against its value at
# initialisation (`train.diverge_weights`, 100x) and each step's loss against its running level
# (`train.diverge_loss`, 10x the median of the last 50 steps). Both causes, small, first with the guard as it ships,
# then with the two finite checks turned off so that only the NaN check is left:

# %%
x = torch.tensor([300.0, 1e-8], dtype=torch.float16)
print("fp16: 300² =", (x[0] * x[0]).item(), "| 300² - 300² =", (x[0] * x[0] - x[0] * x[0]).item(),
      "| a gradient of 1e-8 becomes", x[1].item(), "| scaled by 2^16 first it is",
      f"{torch.tensor(1e-8 * 2 ** 16).half().item():.3e}", "in fp16, unscaled in fp32:",
      f"{torch.tensor(1e-8 * 2 ** 16).half().float().item() / 2 ** 16:.3e}")
HOT = ["--set", "train.lr=1e3", "--set", "train.warmup_steps=0"]
OFF = ["--set", "train.diverge_loss=0", "--set", "train.diverge_weights=0"]
verdicts = {}
for name, extra in (("fp32, lr 1000", HOT), ("fp16, lr 1000", ["--precision", "fp16"] + HOT),
                    ("fp16, lr 1000, finite checks off", ["--precision", "fp16"] + HOT + OFF),
                    ("fp32, lr 1000, finite checks off", HOT + OFF)):
    try:
        run_here("launchers/single.py", [SMALL + ["--max-steps", "40", "--results-dir", "/tmp/ch17/nan"] + extra])
        verdicts[name] = None
    except Exception as e:
        verdicts[name] = str(e)
    print(f"{name}: {verdicts[name]}")

# %%
# NBVAL_CHECK_OUTPUT
print("as shipped, fp32 and fp16 stop at step 0 on the weights' norm, naming the rate:",
      all("by step 0 (train.diverge_weights=100)" in (verdicts[k] or "") and "the rate at that step was"
          in verdicts[k] for k in ("fp32, lr 1000", "fp16, lr 1000")))
print("finite checks off, fp16: the loss scaler skips the overflowing steps, then the run stops in one sentence:",
      "loss scaler skipped" in (verdicts["fp16, lr 1000, finite checks off"] or ""))
print("finite checks off, fp32: the first non-finite loss stops the run, naming the rate:",
      "the rate at that step was" in (verdicts["fp32, lr 1000, finite checks off"] or ""))

# %% [markdown]
# One AdamW step moves every weight by about the learning rate, so at lr 1000 the weights' norm is already about two
# thousand times its initial value after step 0 (the number above); a healthy run grows it by 1.6x over 2000 steps
# (`docs/faults.md`). The guard stops there, before the loss has overflowed, and says which checkpoint is still safe.
# With the finite checks off you see the older, last line of defence: in fp16 the `GradScaler` halves its scale and
# skips a step whose gradients overflowed (a few skips are the scaler working), and `train.max_nonfinite_steps`
# skips in a row stop the run; in fp32 the first non-finite loss stops it. Either way no checkpoint with diverged
# weights is written (`tests/test_faults.py`), and a checkpoint left by an older run with such weights is refused on
# resume. Remedies: lower `train.lr` or lengthen `train.warmup_steps`, keep `train.grad_clip`, and prefer bf16 to
# fp16 (fp32's range, no scaler needed).
#
# ## 7. The loss does not fall
#
# Two bugs that run without an error. A **forgotten `zero_grad`**: `.grad` accumulates (chapter 01), so each step
# follows the sum of every gradient so far. A **target that does not belong to the input**: here the noise drawn a
# second time with `randn_like` after the noisy image was made, so the model is asked to predict noise it never saw.
# A hand-written loop, with each bug and without:

# %%
from dit_core.data import load_mnist

tiny = load_config("configs/tiny.yaml", {"model.hidden_size": 32, "model.depth": 2, "diffusion.objective": "eps"})
data = load_mnist("train", "cpu", 2048)
diff_ = Diffusion(tiny.diffusion)
LOOP = 40 if SMOKE else 150


def hand_loop(zero_grad=True, fresh_noise=False):
    torch.manual_seed(0)
    net = DiT(tiny.model)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    out, norms = [], []
    for step in range(LOOP):
        idx = torch.randint(0, len(data), (32,), generator=g)
        x0, y = data.gather(idx)
        t = torch.randint(0, 1000, (32,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = diff_.q_sample(x0, t, noise)
        target = torch.randn_like(noise) if fresh_noise else noise      # the bug: a second, unrelated draw
        loss = F.mse_loss(net(x_t, t, y), target)
        if zero_grad:
            opt.zero_grad()
        loss.backward()
        # the norm of what .grad holds now: this step's gradient, or without zero_grad the sum of every step's so far
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()
                                                           if p.grad is not None])).item())
        opt.step()
        out.append(loss.item())
    return out, norms


loops = {"correct": hand_loop(), "no zero_grad": hand_loop(zero_grad=False),
         "target drawn again": hand_loop(fresh_noise=True)}
curves = {k_: v[0] for k_, v in loops.items()}
fig, ax = plt.subplots(figsize=(6.5, 3))
for k_, v in curves.items():
    ax.plot(np.convolve(v, np.ones(5) / 5, mode="valid"), label=k_)
ax.set_xlabel("step"); ax.set_ylabel("loss (5-step mean)"); ax.legend(); plt.tight_layout()
tail = {k_: float(np.mean(v[-10:])) for k_, v in curves.items()}
print({k_: round(v, 3) for k_, v in tail.items()})
for k_, (_, gn) in loops.items():
    print(f"{k_:18s}: norm of .grad after backward, step 0 {gn[0]:.3f}, step {LOOP - 1} {gn[-1]:.3f}; larger than at "
          f"the step before at {sum(b > a for a, b in zip(gn, gn[1:]))} of {LOOP - 1} steps")

# %%
# NBVAL_CHECK_OUTPUT
print("correct loop: the loss falls from 1 to below 0.8:", tail["correct"] < 0.8)
print("target drawn again: the loss stays near 1 (the variance of noise it cannot know):", tail["target drawn again"] > 0.9)
print("no zero_grad: worse than the correct loop:", tail["no zero_grad"] > tail["correct"])

# %% [markdown]
# The unrelated target is the easy one to recognise: an eps-prediction loss that stays at 1.0 (the noise's
# variance) means the model predicts zero, the best it can do against noise it cannot see. The forgotten
# `zero_grad` is sneakier: the loss still falls for a while, because AdamW normalises the ever-growing sum, but the
# update points along the *history* of the gradients, not the current one. Checks that catch both early: the loss of
# an untrained model (1.0 for eps), overfitting one small batch (the loss must approach 0), and the gradient norm:
# without `zero_grad` the norm of what `.grad` holds grew at 143 of the 149 steps here, from 0.195 to 10.7, while the
# correct loop's rose at 72 and ended at 0.149 (the lines above).
#
# ## 8. A distributed job that hangs
#
# A collective returns only when every rank of its group has called it. A rank that skips one (a branch on its
# rank, an uneven last batch, an exception swallowed on one rank) leaves the others waiting. The process group's
# timeout (`run.dist_timeout`, 300 s in this workbook; torch's default is 10 minutes for NCCL and 30 for gloo) turns
# the wait into an error. `tools/hang_demo.py` reproduces it with a timeout of 5 s, then a subtler bug: the ranks
# call the same collective with different shapes. `TORCH_DISTRIBUTED_DEBUG=DETAIL` makes torch compare every
# collective's signature across ranks before running it:

# %%
def demo(mode, debug="OFF"):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISTRIBUTED_DEBUG=debug, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "tools/hang_demo.py", mode], capture_output=True, text=True, env=env, timeout=120)
    lines = []
    for line in r.stdout.splitlines():
        if line.startswith("[rank"):               # whole, unless it is DETAIL's long report: then its start and shapes
            shapes = re.findall(r"TensorShape=\[[0-9, ]*\]", line)
            lines.append(line if len(line) <= 400 else line[:150] + " ... " + ", ".join(shapes))
    # a rank killed inside a C++ library prints no line of its own: its error and how it ended are on stderr
    died = [x.strip() for x in r.stderr.splitlines()
            if "what():" in x or x.strip().startswith(("rank ", "exitcode "))]
    return sorted(lines), died


hang, died = {}, {}
for key in (("skip", "OFF"), ("mismatch", "OFF"), ("mismatch", "DETAIL")):
    hang[key], died[key] = demo(*key)
for (mode, dbg), lines in hang.items():
    print(f"--- {mode}, TORCH_DISTRIBUTED_DEBUG={dbg}")
    for line in lines:
        print("  " + line)
    for line in died[mode, dbg]:
        print("  (stderr) " + line)

# %%
# NBVAL_CHECK_OUTPUT
print("a skipped collective ends rank 0 with a timeout error after ~5 s, not a hang:",
      any("Timed out" in line and "after 5." in line for line in hang["skip", "OFF"]))
print("DETAIL names the mismatch and the collective's shape on each side:",
      any("Detected mismatch between collectives" in line and "TensorShape=[4]" in line
          and "TensorShape=[5]" in line for line in hang["mismatch", "DETAIL"]))

# %% [markdown]
# Without `DETAIL` the mismatched shapes end with rank 0 killed by SIGABRT inside gloo, which printed no line of its
# own (its stderr: "Received data size doesn't match expected size. Is there a distributed collective mismatch in
# your code?"), and "Connection reset by peer" on rank 1: a guess at the kind of bug on one rank, a lost connection
# on the other, and neither names the collective, the shapes or the line. What to reach for, in order: the timeout
# (so nothing hangs forever; `docs/faults.md`), `TORCH_DISTRIBUTED_DEBUG=DETAIL` (collective signatures checked, at
# a cost: use it to debug, not to train), `NCCL_DEBUG=INFO` on GPUs (NCCL prints its rings, transports and errors;
# `NCCL_DEBUG_SUBSYS=COLL` every collective), and `py-spy dump --pid PID` on a stuck rank (`pip install py-spy`):
# the Python stack of every thread, which shows the line each rank waits in. Ranks that wait in *different*
# collectives are the bug.
#
# ## 9. Ranks that disagree
#
# Data parallelism assumes every rank holds the same weights and a different slice of the batch. Three ways that
# fails silently: **seeds** (each rank initialises its own model; without a common seed or the initial broadcast,
# chapter 06's `--break broadcast`, the replicas start apart, and since every rank then applies the same averaged
# update nothing pulls them together), **the sampler** (every rank reading the same batch, which is one rank's work
# done W times), and **randomness in the forward** (dropout, or here the classifier-free guidance label drop, drawn
# per rank). This workbook draws everything random from the global batch (the determinism contract,
# `dit_core.batch`), so a rank's slice is fixed by its rank alone.
#
# A cheap check for any job: gather a fingerprint (指纹) of the weights from every rank. `tools/rank_checksums.py` runs a
# launcher's own `main` on every rank, then hashes each rank's parameters (sha256 of their bytes), sums them and
# gathers them. Three runs of chapter 06's hand-written data parallelism (`launchers/ddp.py --impl hand`, 2
# processes over gloo on this CPU, 10 steps, in one job): correct; every rank initialised from its own seed
# (`--seed-by-rank`) with rank 0's weights broadcast at the start; and the same without the broadcast
# (`--break broadcast`). Each log is also compared with one process (`parity`, loss and gradient norm, 1e-5).

# %%
from dit_core.batch import global_batch, shard

gb = global_batch(0, 0, 16, len(data), 1000, 0.1)
mine = [shard(gb, r, 2).indices for r in range(2)]
print("indices of step 0, rank 0 / rank 1:", mine[0].tolist(), mine[1].tolist())

RANK_RUNS = {"correct": [], "seeded by rank, broadcast": ["--seed-by-rank"],
             "seeded by rank, no broadcast": ["--break", "broadcast"]}
ddp_args = SMALL + ["--max-steps", "10"]
cmds = [shlex.join(["launchers/ddp.py", "--impl", "hand", *ddp_args, "--results-dir", f"/tmp/ch17/ranks{i}",
                    "--log-jsonl", f"/tmp/ch17/ranks{i}.jsonl", *extra]) for i, extra in enumerate(RANK_RUNS.values())]
job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "tools/rank_checksums.py", "/tmp/ch17/ranks.json", *cmds], capture_output=True, text=True,
                     env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd()))
if job.returncode:
    raise RuntimeError(job.stderr[-3000:])
fingerprints = dict(zip(RANK_RUNS, json.load(open("/tmp/ch17/ranks.json"))))
(one,) = run_here("launchers/single.py", [ddp_args + ["--results-dir", "/tmp/ch17/ranks_one"]])
rank_parity = {name: parity(one, read_jsonl(f"/tmp/ch17/ranks{i}.jsonl"), SUM_ORDER)
               for i, name in enumerate(RANK_RUNS)}
for name, f in fingerprints.items():
    r0, r1 = f["ranks"]
    print(f"{name}: sha256 {r0['sha256'][:12]} / {r1['sha256'][:12]}, sum {r0['sum']:.6f} / {r1['sum']:.6f}, "
          f"largest |rank 1 - rank 0| {r1['max_abs_diff_to_rank0']:.2e}")
    print(f"    against one process: {rank_parity[name]}")

# %%
# NBVAL_CHECK_OUTPUT
agree = {name: len({r["sha256"] for r in f["ranks"]}) == 1 for name, f in fingerprints.items()}
print("the contract's shards are disjoint and cover the batch:", set(mine[0].tolist()).isdisjoint(mine[1].tolist())
      and sorted(mine[0].tolist() + mine[1].tolist()) == sorted(gb.indices.tolist()))
for name in RANK_RUNS:
    print(f"{name:30s} both ranks hold the same weights: {agree[name]!s:5s} | against one process: "
          f"{'PASS' if rank_parity[name].ok else 'FAIL'}")

# %% [markdown]
# **What to notice.** The correct run and the run seeded by rank with the broadcast end with the same sha256 on both
# ranks, and the same one as each other: the broadcast made rank 1's own initialisation irrelevant, and both logs
# match one process (loss 1.1e-7, gradient norm 6.0e-8). Without the broadcast the ranks end apart (weights up to
# 0.60 apart after 10 steps) and the log no longer matches one process (loss 4.1e-2, gradient norm 1.7e-1): the
# logged loss is the mean over two different models. Here `parity` catches it too, because this workbook has a
# single-process reference for every run; a job without one still has the fingerprints, which cost one all-gather.
# The same check on GPUs: `torchrun --nproc_per_node 2 tools/rank_checksums.py sums.json "launchers/ddp.py --config
# configs/mnist.yaml --max-steps 100"` (`--device auto`: one GPU per process, NCCL). `launchers/ddp.py` has run on
# NCCL with 2 GPUs (chapter 06; `docs/measurements/2xh200-2026-11-24/`); `tools/rank_checksums.py` has run only
# over gloo on this CPU.

# %% [markdown]
# ## 10. TF32: what Meta's DiT `train.py` switches on
#
# Meta's DiT training script sets `torch.backends.cuda.matmul.allow_tf32 = True` and `torch.backends.cudnn.allow_tf32
# = True`. TF32 is a tensor-core mode for fp32 matrix products: the inputs are rounded to 10 mantissa bits (fp16's
# precision, fp32's range) and the products accumulated in fp32. PyTorch leaves it off for matmuls by default.
# `tools/tf32.py` on one H200, both ways in one process:

# %%
tf = json.load(open(f"{GPU}/tf32.json"))
for r in tf["matmul"]:
    print(f"8192² matmul, TF32 {'on ' if r['tf32'] else 'off'}: {r['tflops']:.0f} TFLOP/s, relative error vs fp64 "
          f"{r['rel_error_vs_fp64']:.1e}")
f32, t32 = tf["train"]["fp32"], tf["train"]["tf32"]
print(f"300 steps of configs/mnist.yaml in fp32: {f32['seconds']:.1f} s without TF32, {t32['seconds']:.1f} s with; "
      f"final loss {tf['final_loss']['fp32']:.4f} vs {tf['final_loss']['tf32']:.4f}; largest relative difference "
      f"of one step's loss {tf['max_rel_loss_diff']:.1%}")
fig, ax = plt.subplots(figsize=(6.5, 3))
ax.plot(f32["loss"], label="fp32"); ax.plot(t32["loss"], "--", label="fp32 with TF32 matmuls")
ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(); plt.tight_layout()

# %% [markdown]
# **What to notice.** TF32 makes the big matmul 7.6x faster (49 to 374 TFLOP/s) and 180x less exact (1.6e-6 to
# 2.9e-4 relative error, fp16-like). For training it is a different rounding, not a worse result: the two curves
# follow each other, individual steps differ by up to 6% (two runs of noisy mini-batch steps drift apart, as fp32 vs
# bf16 did in chapter 04), and the final losses agree within 1.4%. The whole run was only 1.3x faster, because this
# small model is not dominated by large matmuls. For training, TF32 is free speed. For a parity test against another
# process it is a tolerance to state: PyTorch leaves it off for matmuls but on for cuDNN convolutions (the DiT's
# patch embedding is one), so `dit_core.train` turns both off explicitly for fp32 runs.

# %% [markdown]
# ## 11. Scaling laws in miniature
#
# Kaplan et al. (2020, "Scaling Laws for Neural Language Models") found that a language model's test loss falls as
# a power of its parameter count N, of the data D and of the compute C ≈ 6·N·D, each over many orders of magnitude:
# L(N) ∝ N^-0.076, L(C_min) ∝ C^-0.050. Hoffmann et al. (2022, "Chinchilla") fitted L = E + A/N^α + B/D^β with an
# irreducible loss E (α ≈ 0.34, β ≈ 0.28) and concluded that compute-optimal training grows N and D about equally
# (N_opt ∝ C^0.5, about 20 tokens per parameter). The same experiment in miniature: DiTs of several widths (depth 4),
# one recipe, the learning rate constant after warm-up (so that the loss at step s of one run stands for a run of s
# steps), the loss against N and against C. First on this CPU (three widths, 150 steps of 32 images):

# %%
sc_cpu = "/tmp/ch17/scaling_cpu.json"
subprocess.run([sys.executable, "tools/scaling.py", "--out", sc_cpu, "--device", "cpu", "--widths", "16", "32", "64",
                "--steps", "150", "--batch", "32"], check=True, capture_output=True,
               env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd()))
cpu_runs = json.load(open(sc_cpu))["runs"]
gpu_sc = json.load(open(f"{GPU}/scaling.json"))


def window_mean(loss, s, w=50):
    return float(np.mean(loss[max(0, s - w):s]))


def power_fit(x, y):
    """log y = a log x + b: the exponent a and the prefactor e^b."""
    a_, b_ = np.polyfit(np.log(x), np.log(y), 1)
    return a_, math.exp(b_)


def frontier(runs, every):
    """Compute-optimal points: the lowest loss reached by any model at each compute C = 6 N D."""
    pts = sorted((6 * r["params"] * r["tokens_per_step"] * s, window_mean(r["loss"], s), r["hidden"])
                 for r in runs for s in range(every, len(r["loss"]) + 1, every))
    best, out = float("inf"), []
    for C, L, h in pts:
        if L < best:
            best = L
            out.append((C, L, h))
    return out


for name, runs in (("CPU", cpu_runs), ("H200", gpu_sc["runs"])):
    N = np.array([r["params"] for r in runs], float)
    L = np.array([window_mean(r["loss"], len(r["loss"])) for r in runs])
    aN, _ = power_fit(N, L)
    print(f"{name}: widths {[r['hidden'] for r in runs]}, N = {[f'{n:,.0f}' for n in N]}, final loss "
          f"{[round(float(v), 4) for v in L]}; L(N) ∝ N^{aN:.3f}")

N = np.array([r["params"] for r in gpu_sc["runs"]], float)
L = np.array([window_mean(r["loss"], len(r["loss"])) for r in gpu_sc["runs"]])
E_grid = np.linspace(0.0, 0.999 * L.min(), 2000)
res = [np.sum((np.log(L - E) - np.polyval(np.polyfit(np.log(N), np.log(L - E), 1), np.log(N))) ** 2) for E in E_grid]
E_fit = float(E_grid[int(np.argmin(res))])
aE, AE = power_fit(N, L - E_fit)
front = frontier(gpu_sc["runs"], 100)
aC, AC = power_fit([p[0] for p in front], [p[1] for p in front])
print(f"H200, with an irreducible loss E: L = {E_fit:.4f} + {AE:.3f}·N^{aE:.2f} (5 points, 3 parameters)")
print(f"H200, compute-optimal frontier ({len(front)} points): L ∝ C^{aC:.3f}; the frontier's models by compute: "
      f"{sorted(set(p[2] for p in front), key=[p[2] for p in front].index)}")

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
a1.loglog(N, L, "o", label="final loss (H200, 3000 steps)")
nn_ = np.logspace(np.log10(N.min()) - 0.2, np.log10(N.max()) + 0.3, 50)
a1.loglog(nn_, power_fit(N, L)[1] * nn_ ** power_fit(N, L)[0], "--", label=f"pure power law N^{power_fit(N, L)[0]:.3f}")
a1.loglog(nn_, E_fit + AE * nn_ ** aE, ":", label=f"E + A·N^{aE:.2f}")
a1.set_xlabel("parameters N"); a1.set_ylabel("training loss"); a1.legend(fontsize=7)
for r in gpu_sc["runs"]:
    Cs = [6 * r["params"] * r["tokens_per_step"] * s for s in range(100, len(r["loss"]) + 1, 100)]
    a2.loglog(Cs, [window_mean(r["loss"], s) for s in range(100, len(r["loss"]) + 1, 100)], lw=1,
              label=f"hidden {r['hidden']}")
cc = np.array([p[0] for p in front])
a2.loglog(cc, AC * cc ** aC, "k--", lw=1.5, label=f"frontier fit C^{aC:.3f}")
a2.set_xlabel("compute C = 6·N·D (FLOPs)"); a2.set_ylabel("training loss"); a2.legend(fontsize=7)
plt.tight_layout()

# %%
# NBVAL_CHECK_OUTPUT
cpu_L = [window_mean(r["loss"], len(r["loss"])) for r in cpu_runs]
print("CPU, 150 steps: each wider model ends lower:", all(b < a for a, b in zip(cpu_L, cpu_L[1:])))
print("H200, 3000 steps: each wider model ends lower, and the frontier's loss falls with compute:",
      all(b < a for a, b in zip(L, L[1:])), aC < 0)

# %% [markdown]
# **What it shows, and what it does not.** The ordering holds: at equal steps a wider model ends lower, and the
# compute-optimal frontier moves to wider models as compute grows (hidden 32 first, 384 last), the shape of Kaplan's
# and Chinchilla's plots. The numbers do not transfer. A pure power law fits L(N) with an exponent near -0.035, but the
# points bend: the diffusion loss has a large irreducible part (the noise no model can predict), and with E ≈ 0.12
# subtracted the exponent is about -0.5. That is a fit of 3 parameters to 5 points, so it is a description and not a
# measurement. The frontier bends the same way: it flattens as it nears the irreducible loss, falling faster than
# the straight fit (C^-0.074) at small compute and slower at large. The loss is a training loss at one learning rate, a constant rate favours no budget, and MNIST
# at 16 tokens saturates early. Kaplan's exponents come from cross-entropy on text over seven orders of magnitude,
# tuned per size. To turn this into a real study: a held-out loss, a learning-rate sweep per width, a decaying
# schedule with one run per budget (as Chinchilla did), and many more decades of N than these two (Kaplan's span
# more than six).

# %% [markdown]
# ## Exercises
#
# 1. **Predict.** How many bytes of activations does one block of `configs/mnist.yaml` (hidden 128, 16 tokens)
#    save per sample in fp32? Check with `memory.block_activation_elements`.
# 2. **Measure.** With the measured 1.4 GiB and 5.7 ms per recomputed block of section 2, how many blocks must you
#    recompute to train the bench DiT at batch 512 in 24 GiB, and what does the step cost then?
# 3. **Break it.** In section 7, also forget `zero_grad` *and* lower the learning rate 10x. Does the loss still end
#    worse than the correct loop? Why does AdamW hide part of the bug?
#
# Solutions: [docs/solutions.md](../docs/solutions.md#chapter-17).

# %% [markdown]
# ## 中文要点
#
# 内存（在 GPU 上即显存）：模型状态（参数、梯度、AdamW 两个动量，fp32 共 16 字节/参数）常驻；激活在前向与反向之间存在，随批量×token×隐藏维度×层数增长，峰值出现在前向结束、反向开始之时。单个 block 的激活公式与本机 CPU 上的计数完全一致（H200 上逐 block 实测相差 0.3%）。
#
# 激活重计算：`train.recompute=full` 每个 block 只保存输入，反向时重算。用 `parity(..., BITWISE)` 逐步比较损失和梯度范数，三种重算方式都与保存全部激活逐位相同（PASS）。H200 上重算 12 个 block 把峰值从 18.3 GiB 降到 3.0 GiB，时间多 33%。只重算注意力核心几乎不省显存（融合注意力本就不保存 S×S 分数）。`save_on_cpu` 更省显存，但耗时为 4.7 倍。
#
# 内存不足（OOM）：在本机 CPU 上用 2 GiB 的 `RLIMIT_DATA` 复现：batch 8192 的一步内存不足，全部重算后可以运行。补救顺序：先减小微批量并做梯度累积，再重算，再 bf16，最后 ZeRO/FSDP。bf16 autocast 并不等于激活减半：在 CPU 上计数，bench DiT 每个样本 fp32 保存 70.0 MiB；CPU 的 autocast 规则下 bf16 为 35.1 MiB（0.50 倍），按 CUDA 的规则（layer_norm 用 fp32）为 42.2 MiB（0.60 倍），每步另有约 61.6 MiB 的 bf16 权重副本。据此对 H200 的测量做算术推算，峰值约 11.3 GiB，而不是减半给出的 9.4 GiB；在一块 H100 上实测 bf16 一步的峰值为 11.5 GiB，激活为 fp32 的 0.603 倍，与 CPU 按 CUDA 规则的计数一致。
#
# 旋转位置编码（RoPE）：旋转 q、k 使注意力分数只依赖相对位移；二维 RoPE 一半通道按行、一半按列旋转。四项检查（分数只依赖位移、两个轴都起作用、行与列可区分、是二维位移而不是展平后的一维序号）：模型自己的表全部通过；四个故意做错的表各自只在对应的那一项失败，例如展平的一维 RoPE 也通过位移检查，只有第 4 项发现它。在固定 4×4 网格上与 sin-cos 效果相当。
#
# ONNX：导出去噪网络，onnxruntime 的输出与 PyTorch 一致（≤1e-5），可以直接用于采样。
#
# 故障排查：NaN（fp16 无缩放、学习率过大）；发散在变成 NaN 之前就被判定：lr=1000 时第 0 步后权重范数已是初始值的约 2000 倍（上限 `train.diverge_weights`=100），fp32 与 fp16 都在第 0 步停止且不保存检查点；关掉这两项有限值检查后，fp16 的损失缩放器连续跳过 10 步才停止，fp32 在第 3 步出现 NaN 时停止；损失不降（忘记 zero_grad、目标与输入无关）、分布式卡住（超时、TORCH_DISTRIBUTED_DEBUG=DETAIL、NCCL_DEBUG=INFO、py-spy）。
#
# 各 rank 不一致：`tools/rank_checksums.py` 在真实的 2 进程 DDP 作业结束后收集每个 rank 的权重哈希。正确的运行和"按 rank 设种子、但有初始广播"的运行，两个 rank 的权重逐位相同，且与单进程一致（PASS）；去掉广播后两个 rank 的权重不同（最大差 0.60），与单进程比较为 FAIL。
#
# TF32 让 fp32 矩阵乘快 7.6 倍，误差接近 fp16。
#
# 缩放定律（迷你版）：更宽的模型在相同步数下损失更低，计算最优前沿随算力移向更大的模型；但扩散损失有很大的不可约部分，指数不能直接与 Kaplan / Chinchilla 的语言模型结果比较。
