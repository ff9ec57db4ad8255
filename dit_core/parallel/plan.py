"""Which axes first: a planner for DP x PP x CP x TP from memory and communication arithmetic (chapter 16).

Not a search over every layout and not a simulator: the order of the published rules of thumb, with constants the
workbook measured, and predictions that chapter 16 and tests/test_plan.py compare with measurements.

  * Data parallelism first, with the model states sharded (ZeRO-3 / FSDP) when they do not fit (Rajbhandari et al.,
    2020; torchtitan starts every layout from FSDP), and only over a data-parallel group of at least 2.
  * Tensor parallelism next, inside a node only (Narayanan et al., 2021, "Efficient Large-Scale Language Model
    Training on GPU Clusters": TP up to the GPUs of one node, pipeline parallelism across nodes), when memory or
    ZeRO-3's traffic forces it and a block computes for longer than its all-reduces take. The arithmetic is an
    upper bound: on 2 x H200 `configs/bench.yaml` ran slower with TP 2 than on one GPU (docs/results.md).
  * Context parallelism when one sample's activations do not fit (Liu et al., 2023; torchtitan's CP): its ring
    traffic grows with the tokens while attention grows with their square.
  * Pipeline parallelism when the model states still do not fit a node: point-to-point activations between stages
    are the least traffic of all, so PP is the axis that crosses the slow links, at the price of a bubble
    (P - 1)/(M + P - 1) (chapter 12).

Memory per GPU (`Plan.memory_gib`, in GiB):
  * model states: 16 bytes per parameter (fp32 weights, gradients and AdamW's two moments; or, mixed precision as in
    the ZeRO paper, 2 + 2 + 12), + 4 for an fp32 EMA copy where the job keeps one, divided by tp x pp, and by dp as
    well under ZeRO-3; in bf16 without ZeRO-3, + 2 bytes per parameter (tp x pp share) for the bf16 copies of the
    weights that autocast makes in forward and the linear layers keep for backward (counted on the CPU by
    dit_core.memory: the part of the saved bytes that does not grow with the batch);
  * activations: ACT_BYTES[precision] per sample, token, hidden unit and block, times the samples of one micro-batch,
    divided by tp (which assumes Megatron's sequence parallelism beside TP; this project's TP has none) and by cp;
    1F1B keeps as many micro-batches on the first stage as there are stages, so PP does not shrink it;
    with full recomputation of `recompute_blocks` blocks, each of those keeps only its input (the residual stream,
    one element per token and hidden unit in the activations' precision: under CUDA autocast the patch embedding
    already returns bf16) and the one being recomputed holds a whole block's activations again during its backward;
  * `memory_gib` adds them all (an upper bound, what the planner sizes layouts with); `peak_gib` models one step's
    peak, when gradients and activations are not held at once (measured on one H100 at DiT-XL/2: chapter 18);
  * `offload_optimizer`: AdamW's two moments (8 bytes per parameter) live in host memory (ZeRO-Offload's idea).
The layers outside the blocks (embeddings, final layer, loss) are left out: a few per cent at DiT-XL/2's shape.

Time: FLOPs of the blocks at MFU x PEAK_TFLOPS; bytes per layer from the project's own formulas, which its tests
check against counted bytes (`tp_allreduce_elements`, `ring_attention_elements`, zero_report's `comm_formula`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .tensor import tp_allreduce_elements
from .ulysses import ring_attention_elements

GIB = 2 ** 30
STATE_BYTES = 16          # per parameter: fp32 AdamW 4 + 4 + 8, or the ZeRO paper's mixed precision 2 + 2 + 12
EMA_BYTES = 4             # per parameter: an fp32 EMA copy of the weights (DiT training keeps one)
AUTOCAST_COPY_BYTES = 2   # per parameter, bf16 without ZeRO-3: autocast's bf16 copies of the weights, kept for backward
# Bytes one DiT block keeps for backward per sample, token and hidden unit, by precision. Measured, not taken from the
# LLM literature (Korthikanti et al. 2022 give 34 for a GPT block in 16-bit with flash attention): counted on the
# project's 2-core CPU on 2026-12-06 (torch 2.14) by dit_core.memory.activation_bytes_per_token_hidden, which sees
# every tensor autograd saves, once per storage, weights excluded, and isolates one block and one sample's share by
# differences of depth and batch; at DiT-XL/2's shape (256 tokens, hidden 1152, 16 heads), fused attention (SDPA
# keeps its output and log-sum-exp, not the scores): 80.21 in fp32, 40.13 under bf16 autocast. Chapter 16 counts them
# again at every full run. adaLN-Zero's modulated inputs and gated branch outputs are tensors an LLM block does not
# keep; under autocast the residual stream and the LayerNorm inputs stay fp32.
# On a GPU, eager CUDA autocast also runs LayerNorm in fp32 (CPU autocast runs it in bf16): it keeps 0.603x of fp32's
# bytes, not 0.500x, at configs/bench.yaml's shape on one H100 (docs/measurements/1xh100-2026-12-06-session/), about 48
# here. The compiled bf16 runs of DiT-XL/2 on the H100 fit 40.1 within 7% (chapter 16), so 40.1 is the constant for a
# compiled GPU step and an underestimate of about a fifth for an eager one.
ACT_BYTES = {"fp32": 80.2, "bf16": 40.1}
# The same, measured on one H100 for the compiled bf16 step (each block compiled, torch 2.11): the activations after
# forward at batch 128 less those at batch 64, per sample, block, token and hidden unit: 34.5 at DiT-XL/2
# (docs/measurements/1xh100-2026-12-06-xl/xl_memory_bf16.json; 192 - 128 gives the same). The compiler recomputes
# cheap element-wise results in backward rather than keeping them, hence less than the 40.1 eager autocast keeps.
ACT_BYTES_COMPILED_GPU = 34.5
NVLINK_GBS = 297.0        # all-reduce bus bandwidth measured on 2 x H200 (docs/results.md, chapter 05)
IB_GBS = 50.0             # one 400 Gb/s InfiniBand NDR link per GPU, the usual H100/H200 cluster (a spec, not measured)
PEAK_TFLOPS = 989.0       # dense bf16 of one H100 SXM and of one H200 (NVIDIA's data sheets), of which `mfu` is reached
# The fraction of PEAK_TFLOPS a DiT step reaches, measured: this project's DiT at DiT-XL/2's shape on one H100 SXM,
# bf16 + torch.compile, batch 128: 557 images/s x 711.7 GFLOPs per image (forward + backward) = 40.1% of 989 TFLOP/s
# (docs/measurements/1xh100-2026-12-06/dit_xl_bench.json; Meta's DiT train.py loop on the same GPU, fp32 with TF32,
# batch 32: 10.7%). Published DiT figures (theirs, not measured here) are lower: fast-DiT ~25% of an A100, Open-Sora 12%
# of an H800, the DiT paper ~7% of a TPU v3. Small shapes run far lower (configs/bench.yaml on one H200: ~10%): pass a
# job's own `mfu`.
MFU = 0.401
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}
ADAM_MOMENT_BYTES = 8     # per parameter: exp_avg and exp_avg_sq in fp32 (the part of STATE_BYTES offloading moves)


@dataclass
class Job:
    name: str
    params: float            # parameters
    layers: int
    hidden: int
    heads: int
    tokens: int              # per sample
    gpu_gib: float           # GiB (2^30 bytes): a 141 GB H200 is 131.3
    gpus_per_node: int
    nodes: int
    global_batch: int = 256  # samples per optimizer step
    intra_gbs: float = NVLINK_GBS
    inter_gbs: float = IB_GBS
    mfu: float = MFU         # the fraction of PEAK_TFLOPS the blocks run at (measured; see MFU)
    precision: str = "bf16"  # activations, gathered weights and all-reduced activations: "bf16" or "fp32"
    ema: bool = False        # an fp32 EMA copy of the weights on every GPU
    act_bytes: float = 0.0   # bytes a block keeps per sample, token and hidden unit; 0: ACT_BYTES[precision]

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class Plan:
    job: Job
    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    zero3: bool = False
    micro_batch: int = 1     # samples per micro-batch on each GPU
    recompute_blocks: int = 0        # blocks (of this GPU's share) fully recomputed in backward
    offload_optimizer: bool = False  # AdamW's moments in host memory
    reasons: list = field(default_factory=list)

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step on each data-parallel replica."""
        return math.ceil(self.job.global_batch / (self.dp * self.micro_batch))

    def states_gib(self) -> float:
        j = self.job
        states = STATE_BYTES - (ADAM_MOMENT_BYTES if self.offload_optimizer else 0)
        per_param = (states + (EMA_BYTES if j.ema else 0)) / (self.dp if self.zero3 else 1)
        return per_param * j.params / (self.tp * self.pp) / GIB + self.autocast_copies_gib()

    def autocast_copies_gib(self) -> float:
        """bf16 without ZeRO-3: the copies autocast makes of the weights of the blocks that are not recomputed (a
        recomputed block makes its copies again in backward)."""
        j = self.job
        if j.precision == "fp32" or self.zero3:
            return 0.0
        kept = 1 - min(self.recompute_blocks, j.layers) / j.layers
        return AUTOCAST_COPY_BYTES * kept * j.params / (self.tp * self.pp) / GIB

    def block_gib(self, micro_batch: int | None = None) -> float:
        """What one block keeps for backward: the job's activation bytes per sample, token and hidden unit."""
        j = self.job
        mb = self.micro_batch if micro_batch is None else micro_batch
        return (j.act_bytes or ACT_BYTES[j.precision]) * j.tokens * j.hidden * mb / (self.tp * self.cp) / GIB

    def activations_gib(self, micro_batch: int | None = None) -> float:
        """Kept from forward to backward: every block's activations, or only the input of a recomputed one."""
        j = self.job
        mb = self.micro_batch if micro_batch is None else micro_batch
        rc = min(self.recompute_blocks, j.layers)
        kept = ELEMENT_BYTES[j.precision] * j.tokens * j.hidden * mb / (self.tp * self.cp) / GIB
        return self.block_gib(mb) * (j.layers - rc) + kept * rc

    def working_gib(self, micro_batch: int | None = None) -> float:
        """With recomputation: the activations of the block being recomputed, held during its backward."""
        return self.block_gib(micro_batch) if self.recompute_blocks else 0.0

    def memory_gib(self, micro_batch: int | None = None) -> float:
        """States, gradients included, plus activations: the sum the planner sizes a layout with (an upper bound of
        the peak, which `peak_gib` models)."""
        return self.states_gib() + self.activations_gib(micro_batch) + self.working_gib(micro_batch)

    def peak_gib(self, micro_batch: int | None = None) -> float:
        """The peak of one step. Gradients and activations do not peak together: zero_grad(set_to_none) frees the
        gradients before forward, and backward frees each block's activations as it makes that block's gradients,
        so the peak is the weights, AdamW's moments, the EMA and autocast's copies plus the larger of the kept
        activations and the gradients (plus the block being recomputed). With gradient accumulation the gradients
        of the earlier micro-batches are held through forward: then both count."""
        j = self.job
        shard = (self.dp if self.zero3 else 1) * self.tp * self.pp
        grads = 4 * j.params / shard / GIB
        base = self.states_gib() - grads
        acts = self.activations_gib(micro_batch)
        held = acts + grads if self.accum > 1 else max(acts, grads)
        return base + held + self.working_gib(micro_batch)

    def largest_micro_batch(self, budget_gib: float) -> int:
        """The most samples per micro-batch (a power of two, at most a replica's share of the global batch) that fit
        `budget_gib`; 1 if none does."""
        mb, most = 1, max(1, self.job.global_batch // self.dp)
        while mb * 2 <= most and self.memory_gib(mb * 2) <= budget_gib:
            mb *= 2
        return mb

    def layout(self) -> str:
        return f"DP {self.dp} x PP {self.pp} x CP {self.cp} x TP {self.tp}" + (" (ZeRO-3)" if self.zero3 else "")


def block_seconds(job: Job, tp: int = 1, cp: int = 1) -> float:
    """Forward + backward of one block on one sample's tokens of this rank: 3 x (24·s·h² + 4·s²·h) FLOPs
    (the linear layers and attention), split over tp x cp ranks."""
    s, h = job.tokens, job.hidden
    return 3 * (24 * s * h * h + 4 * s * s * h) / (tp * cp) / (PEAK_TFLOPS * 1e12 * job.mfu)


def tp_seconds(job: Job, tp: int) -> float:
    """One block's tensor-parallel all-reduces of one sample: a ring all-reduce moves 2(t-1)/t of the data."""
    return (tp_allreduce_elements(1, job.tokens, job.hidden) * ELEMENT_BYTES[job.precision] * 2 * (tp - 1) / tp
            / (job.intra_gbs * 1e9))


def tp_speedup(job: Job, tp: int) -> float:
    """What the arithmetic predicts for one block: its time on one GPU over its time with TP `tp` (the slices'
    compute, then the all-reduces, not overlapped). An upper bound: it ignores the work TP does not split (norms,
    modulation, the embeddings: replicated on every tp rank) and each all-reduce's latency."""
    return block_seconds(job) / (block_seconds(job, tp) + tp_seconds(job, tp))


def cp_seconds(job: Job, cp: int, inter: bool = False) -> float:
    """One block's ring of K and V blocks, forward and backward (the backward sends K, V and their gradients)."""
    bw = job.inter_gbs if inter else job.intra_gbs
    return 3 * ring_attention_elements(1, job.tokens, job.hidden, cp) * ELEMENT_BYTES[job.precision] / (bw * 1e9)


def step_compute_seconds(job: Job) -> float:
    """One optimizer step's forward and backward over the global batch, spread over every GPU."""
    return job.global_batch * job.layers * block_seconds(job) / job.gpus


def zero3_bytes(p: Plan) -> float:
    """Bytes one GPU sends per optimizer step under ZeRO-3 (ring algorithms): for every micro-batch, all-gather the
    weights for forward and again for backward, and reduce-scatter the gradients (gradients are not accumulated
    unsharded): 3·accum·Ψ elements of this GPU's tp x pp share, (dp - 1)/dp of them leaving it; the formula of
    dit_core.parallel.zero_report.comm_formula (stage 3), which chapter 07 and tests/test_plan.py check against the
    bytes counted in real ZeRO-3 runs. 0 without ZeRO-3 or with one data-parallel rank."""
    if not p.zero3 or p.dp == 1:
        return 0.0
    j = p.job
    return 3 * p.accum * j.params / (p.tp * p.pp) * (p.dp - 1) / p.dp * ELEMENT_BYTES[j.precision]


def zero3_seconds(p: Plan) -> float:
    """zero3_bytes over the slow link once the data-parallel group spans nodes."""
    j = p.job
    bw = j.inter_gbs if p.dp * p.tp * p.cp * p.pp > j.gpus_per_node and p.dp > 1 else j.intra_gbs
    return zero3_bytes(p) / (bw * 1e9)


def grad_allreduce_seconds(p: Plan) -> float:
    """Without ZeRO-3: the once-per-step all-reduce of this GPU's tp x pp share of the fp32 gradients over the
    data-parallel group (a ring sends 2(dp-1)/dp of them), over the slow link once that group spans nodes."""
    j = p.job
    if p.zero3 or p.dp == 1:
        return 0.0
    bw = j.inter_gbs if p.dp * p.tp * p.cp * p.pp > j.gpus_per_node else j.intra_gbs
    return 2 * (p.dp - 1) / p.dp * 4 * j.params / (p.tp * p.pp) / (bw * 1e9)


def step_seconds(p: Plan) -> tuple[float, float]:
    """One optimizer step: (communication hidden behind compute, none of it hidden), the two bounds a real run falls
    between. Compute is the blocks' FLOPs at the job's measured utilisation; communication the data-parallel
    traffic (ZeRO-3's gathers and reduce-scatters, or the gradient all-reduce)."""
    compute = step_compute_seconds(p.job)
    comm = zero3_seconds(p) + grad_allreduce_seconds(p)
    return max(compute, comm), compute + comm


def plan(job: Job) -> Plan:
    p = Plan(job, dp=job.gpus)
    budget = 0.9 * job.gpu_gib                      # leave room for the allocator, buffers and workspace
    if p.memory_gib(1) > budget and p.dp > 1:       # 1. shard the states over the data-parallel ranks
        p.reasons.append(f"states {p.states_gib():.0f} GiB + one sample's activations {p.activations_gib(1):.0f} GiB "
                         f"do not fit one GPU: ZeRO-3/FSDP over DP")
        p.zero3 = True

    # 2. tensor parallelism inside the node, while one sample does not fit, or ZeRO-3's traffic (per micro-batch, at
    #    the largest micro-batch that fits) takes longer than the step computes, and it pays
    def too_much():
        p.micro_batch = p.largest_micro_batch(budget)
        return p.memory_gib() > budget or zero3_seconds(p) > step_compute_seconds(job)

    while too_much() and p.tp * 2 <= job.gpus_per_node and job.heads % (p.tp * 2) == 0:
        t = p.tp * 2
        ratio = block_seconds(job, t) / tp_seconds(job, t)
        if ratio < 1.0 and p.activations_gib(1) < budget:
            p.reasons.append(f"TP {t} would talk longer than it computes (compute/comm {ratio:.1f})")
            break
        why = ("memory" if p.memory_gib() > budget else
               f"ZeRO-3 traffic {zero3_seconds(p):.0f} s > compute {step_compute_seconds(job):.0f} s per step")
        p.tp, p.dp = t, p.dp // 2
        p.reasons.append(f"TP {t} inside the node for {why} (compute/comm {ratio:.1f})")
    # 3. context parallelism while one sample's activations do not fit
    while (p.activations_gib(1) > budget - min(p.states_gib(), budget / 2) and p.dp > 1
           and job.tokens % (p.cp * 2) == 0):
        c = p.cp * 2
        inter = p.tp * c > job.gpus_per_node
        p.cp, p.dp = c, p.dp // 2
        ratio = block_seconds(job, p.tp, c) / cp_seconds(job, c, inter)
        p.reasons.append(f"CP {c} for {job.tokens} tokens ({'across' if inter else 'inside'} nodes, "
                         f"compute/comm {ratio:.1f})")
    # 4. pipeline stages across nodes while the states still do not fit
    while p.memory_gib(1) > budget and p.dp > 1 and job.layers % (p.pp * 2) == 0:
        p.pp, p.dp = p.pp * 2, p.dp // 2
        p.reasons.append(f"PP {p.pp}: stages across nodes, point-to-point activations only")
    if p.zero3 and p.dp == 1:                       # the other axes took every rank: nothing left to shard over
        p.zero3 = False
        p.reasons.append("no ZeRO-3: a data-parallel group of 1 has nothing to shard the states over")
    p.micro_batch = p.largest_micro_batch(budget)
    if not p.reasons:
        p.reasons.append("fits one GPU: data parallelism only (ZeRO-1/2 to save the optimizer's share)")
    if p.memory_gib() > budget:
        p.reasons.append(f"still {p.memory_gib():.0f} GiB per GPU: add activation recomputation, more GPUs, or "
                         f"a smaller model")
    return p
