"""Which axes first: a planner for DP x PP x CP x TP from memory and communication arithmetic (chapter 16).

Not a search over every layout and not a simulator: the order of the published rules of thumb, each one checked
against numbers the workbook measured or counted.

  * Data parallelism first, with the model states sharded (ZeRO-3 / FSDP) when they do not fit (Rajbhandari et al.,
    2020; torchtitan starts every layout from FSDP). It communicates once per step and overlaps with backward.
  * Tensor parallelism next, inside a node only (Narayanan et al., 2021, "Efficient Large-Scale Language Model
    Training on GPU Clusters": TP up to the GPUs of one node, pipeline parallelism across nodes), and only when the
    hidden size makes a block's compute outweigh its all-reduces: on 2 x H200 `configs/bench.yaml` (hidden 384, 196
    tokens; a ratio of 1.1 by this arithmetic) ran slower with TP 2 than on one GPU (docs/results.md).
  * Context parallelism when one sequence's activations do not fit (Liu et al., 2023; torchtitan's CP): its ring
    traffic grows with the tokens while attention grows with their square, so it pays only at long sequences (on
    2 x H200 Ulysses was 0.52x one GPU at 196 tokens and 1.42x at 3136).
  * Pipeline parallelism when the model states still do not fit a node: point-to-point activations between stages
    are the least traffic of all, so PP is the axis that crosses the slow links, at the price of a bubble
    (P - 1)/(M + P - 1) (chapter 12).

Memory per GPU: model states 16 bytes per parameter (bf16 weights and gradients, fp32 master weights and Adam's two
moments; Rajbhandari et al., 2020), divided by tp x pp, and by dp as well under ZeRO-3. Activations of one sample
with flash attention: 34 bytes per token per hidden unit per layer (Korthikanti et al., 2022, "Reducing Activation
Recomputation in Large Transformer Models", without the 5as/h score term that flash attention does not store),
divided by tp (which assumes Megatron's sequence parallelism beside TP; this project's TP has none, where plain TP
gives s·h·(10 + 24/t)) and by cp; 1F1B keeps as many micro-batches on the first stage as there are
stages, so PP does not shrink it. Bytes moved per layer: the project's own formulas, which its tests check against
counted bytes (`tp_allreduce_elements`, `ring_attention_elements`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .tensor import tp_allreduce_elements
from .ulysses import ring_attention_elements

GIB = 2 ** 30
STATE_BYTES = 16          # per parameter, mixed-precision Adam (ZeRO paper's 2 + 2 + 12)
ACT_BYTES = 34            # per token x hidden x layer, one sample, bf16, flash attention (Korthikanti et al.)
NVLINK_GBS = 297.0        # all-reduce bus bandwidth measured on 2 x H200 (docs/results.md, chapter 05)
IB_GBS = 50.0             # one 400 Gb/s InfiniBand NDR link per GPU, the usual H100/H200 cluster (a spec, not measured)
PEAK_TFLOPS = 989.0       # H200 dense bf16 (NVIDIA's data sheet), of which `mfu` is reached


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
    mfu: float = 0.5         # the fraction of PEAK_TFLOPS the blocks run at

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
    reasons: list = field(default_factory=list)

    def states_gib(self) -> float:
        shards = self.tp * self.pp * (self.dp if self.zero3 else 1)
        return STATE_BYTES * self.job.params / shards / GIB

    def activations_gib(self) -> float:
        j = self.job
        return ACT_BYTES * j.tokens * j.hidden * j.layers / (self.tp * self.cp) / GIB

    def memory_gib(self) -> float:
        return self.states_gib() + self.activations_gib()

    def layout(self) -> str:
        return f"DP {self.dp} x PP {self.pp} x CP {self.cp} x TP {self.tp}" + (" (ZeRO-3)" if self.zero3 else "")


def block_seconds(job: Job, tp: int = 1, cp: int = 1) -> float:
    """Forward + backward of one block on one sample's tokens of this rank: 3 x (24·s·h² + 4·s²·h) FLOPs
    (the linear layers and attention), split over tp x cp ranks."""
    s, h = job.tokens, job.hidden
    return 3 * (24 * s * h * h + 4 * s * s * h) / (tp * cp) / (PEAK_TFLOPS * 1e12 * job.mfu)


def tp_seconds(job: Job, tp: int) -> float:
    """One block's tensor-parallel all-reduces of one sample (bf16): a ring all-reduce moves 2(t-1)/t of the data."""
    return tp_allreduce_elements(1, job.tokens, job.hidden) * 2 * 2 * (tp - 1) / tp / (job.intra_gbs * 1e9)


def cp_seconds(job: Job, cp: int, inter: bool = False) -> float:
    """One block's ring of K and V blocks, forward and backward (the backward sends K, V and their gradients)."""
    bw = job.inter_gbs if inter else job.intra_gbs
    return 3 * ring_attention_elements(1, job.tokens, job.hidden, cp) * 2 / (bw * 1e9)


def step_compute_seconds(job: Job) -> float:
    """One optimizer step's forward and backward over the global batch, spread over every GPU."""
    return job.global_batch * job.layers * block_seconds(job) / job.gpus


def zero3_seconds(p: Plan) -> float:
    """ZeRO-3's traffic per step and GPU: all-gather the bf16 weights for forward and again for backward, reduce-
    scatter the gradients (3 x 2 bytes per parameter of this GPU's tp x pp share), over the slow link once the data-
    parallel group spans nodes."""
    j = p.job
    bw = j.inter_gbs if p.dp * p.tp * p.cp * p.pp > j.gpus_per_node and p.dp > 1 else j.intra_gbs
    return 3 * 2 * j.params / (p.tp * p.pp) * (p.dp - 1) / p.dp / (bw * 1e9)


def plan(job: Job) -> Plan:
    p = Plan(job, dp=job.gpus)
    budget = 0.9 * job.gpu_gib                      # leave room for the allocator, buffers and workspace
    if p.memory_gib() > budget:                     # 1. shard the states over the data-parallel ranks
        p.reasons.append(f"states {p.states_gib():.0f} GiB + one sample's activations {p.activations_gib():.0f} GiB do "
                         f"not fit one GPU: ZeRO-3/FSDP over DP")
        p.zero3 = True
    # 2. tensor parallelism inside the node, while activations or states still do not fit (or ZeRO-3's gathers
    #    across nodes take longer than the step computes) and it pays
    def too_much():
        return p.memory_gib() > budget or (p.zero3 and zero3_seconds(p) > step_compute_seconds(job))

    while too_much() and p.tp * 2 <= job.gpus_per_node and job.heads % (p.tp * 2) == 0:
        t = p.tp * 2
        ratio = block_seconds(job, t) / tp_seconds(job, t)
        if ratio < 1.0 and p.activations_gib() < budget:
            p.reasons.append(f"TP {t} would talk longer than it computes (compute/comm {ratio:.1f})")
            break
        why = "memory" if p.memory_gib() > budget else f"ZeRO-3 traffic {zero3_seconds(p):.1f} s/step"
        p.tp, p.dp = t, p.dp // 2
        p.reasons.append(f"TP {t} inside the node for {why} (compute/comm {ratio:.1f})")
    # 3. context parallelism while one sample's activations do not fit
    while p.activations_gib() > budget - min(p.states_gib(), budget / 2) and p.dp > 1 and job.tokens % (p.cp * 2) == 0:
        c = p.cp * 2
        inter = p.tp * c > job.gpus_per_node
        p.cp, p.dp = c, p.dp // 2
        ratio = block_seconds(job, p.tp, c) / cp_seconds(job, c, inter)
        p.reasons.append(f"CP {c} for {job.tokens} tokens ({'across' if inter else 'inside'} nodes, "
                         f"compute/comm {ratio:.1f})")
    # 4. pipeline stages across nodes while the states still do not fit
    while p.memory_gib() > budget and p.dp > 1 and job.layers % (p.pp * 2) == 0:
        p.pp, p.dp = p.pp * 2, p.dp // 2
        p.reasons.append(f"PP {p.pp}: stages across nodes, point-to-point activations only")
    if not p.reasons:
        p.reasons.append("fits one GPU: data parallelism only (ZeRO-1/2 to save the optimizer's share)")
    if p.memory_gib() > budget:
        p.reasons.append(f"still {p.memory_gib():.0f} GiB per GPU: add activation recomputation, more GPUs, or "
                         f"a smaller micro-batch")
    return p
