"""Context parallelism (上下文并行) by hand: ring attention, and Ulysses x Ring (USP).

Ulysses (dit_core.parallel.ulysses) trades the sequence split for a head split with one all-to-all, so its degree
stops at the number of heads. Ring attention keeps every rank on its own slice of the queries and passes the key /
value blocks round a ring of P ranks instead (Liu et al. 2023, "Ring Attention with Blockwise Transformers"):

    step j = 0 .. P-1:  rank r attends its queries to the K/V block that started on rank r - j, while it already
                        sends that block on to rank r + 1 and receives the next one from rank r - 1

Softmax over the whole sequence is merged block by block (online softmax): a running row maximum m, a running sum
of exponentials l and an unnormalised output o; a new block with scores s rescales them by exp(m - m_new). After P
blocks, o / l is exact attention and lse = m + log l is kept for backward. Backward runs the ring again: each rank
recomputes a block's probabilities exp(s - lse) from the saved lse (never storing P blocks of probabilities), adds
its queries' share to that block's dK and dV, and passes the partial sums along with the block; after P steps
every dK / dV is back on the rank that owns the block, summed over every rank's queries.

A DiT's attention is not causal: every block is a full block, each rank does the same work at every step, and no
load balancing is needed. A causal LLM skips blocks above the diagonal, so with contiguous slices the last rank does
P times the work of the first; the zig-zag split (rank r takes chunks r and 2P-1-r of 2P) evens it out.
"""
from __future__ import annotations

import datetime
import math

import torch
import torch.distributed as dist

from ..config import ConfigError, ModelConfig
from .dist import DistEnv, check_degree
from .ulysses import ResplitAllToAll, UlyssesStrategy, check_token_split


def _merge(o, m, l, s, v):
    """Fold a block of scores s (B, H, Sq, Sk) and values v (B, H, Sk, D) into the running (o, m, l)."""
    m_new = torch.maximum(m, s.amax(-1))
    p = torch.exp(s - m_new.unsqueeze(-1))
    alpha = torch.exp(m - m_new)
    return o * alpha.unsqueeze(-1) + p @ v, m_new, l * alpha + p.sum(-1)


# Elements this process has sent round a ring (forward and backward), for measurements (tools/bench_context.py).
SENT = {"elements": 0}


class _Ring:
    """One round of the ring: send `x` to the next rank, receive the previous rank's into a new buffer."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size) if group is not None else \
            (self.rank + 1) % self.size
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size) if group is not None else \
            (self.rank - 1) % self.size

    def start(self, x: torch.Tensor, recv_len: int, tag: int = 0):
        """Send `x` on and receive the previous rank's block, `recv_len` tokens long (dim -2: slices may differ by
        one token when the sequence is not a multiple of P). `tag` keeps two exchanges in flight apart (backward:
        the K/V block, tag 0, and its partial dK/dV, tag 1)."""
        if self.size == 1:
            return [], x                                # a ring of one: the block stays
        buf = x.new_empty((*x.shape[:-2], recv_len, x.shape[-1]))
        SENT["elements"] += x.numel()
        ops = [dist.P2POp(dist.isend, x, self.next, self.group, tag),
               dist.P2POp(dist.irecv, buf, self.prev, self.group, tag)]
        return dist.batch_isend_irecv(ops), buf

    @staticmethod
    def finish(pending):
        works, buf = pending
        for w in works:
            w.wait()
        return buf


def slice_lengths(local: int, group) -> list[int]:
    """Every rank's number of tokens (one small all-gather): the ring passes blocks of these lengths."""
    n = torch.tensor([local], dtype=torch.int64)
    out = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, n, group=group)
    return [int(x) for x in out]


class RingAttention(torch.autograd.Function):
    """Exact attention of this rank's queries over every rank's keys and values, on (B, H, S_local, D) tensors.

    `merge_dtype` (teaching only): round the running max, sum and output to this dtype after every step, as a kernel
    that keeps its partial results in bf16 would. The default keeps them in fp32 at least, whatever the inputs;
    bf16 shows the error such merging accumulates over the P steps (ring-flash-attention#22)."""

    @staticmethod
    def forward(ctx, q, k, v, group, merge_dtype=None, equal=False):
        ring = _Ring(group)
        # equal: the caller knows every slice has this rank's length (the DiT's even token split), so no exchange
        lens = [k.shape[-2]] * ring.size if equal or ring.size == 1 else slice_lengths(k.shape[-2], group)
        scale = 1.0 / math.sqrt(q.shape[-1])
        acc = torch.promote_types(q.dtype, torch.float32)   # statistics in fp32 at least (bf16 inputs), fp64 kept
        qf = q.to(acc)
        B, H, S, _ = q.shape
        o = torch.zeros(B, H, S, v.shape[-1], dtype=acc, device=q.device)
        m = torch.full((B, H, S), -math.inf, dtype=acc, device=q.device)
        l = torch.zeros((B, H, S), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()          # one message per step, not two
        for step in range(ring.size):
            nxt = lens[(ring.rank - step - 1) % ring.size]                # the block that arrives next
            pending = ring.start(kv, nxt) if step < ring.size - 1 else None   # it travels while we compute
            kj, vj = kv.to(acc).unbind(0)
            o, m, l = _merge(o, m, l, (qf @ kj.transpose(-1, -2)) * scale, vj)
            if merge_dtype is not None:
                o, m, l = (t.to(merge_dtype).to(acc) for t in (o, m, l))
            if pending is not None:
                kv = _Ring.finish(pending)
        out = o / l.unsqueeze(-1)
        lse = m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.lens = group, scale, lens
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale, lens = _Ring(ctx.group), ctx.scale, ctx.lens
        acc = out.dtype
        qf, do = q.to(acc), dout.to(acc)
        delta = (do * out).sum(-1, keepdim=True)       # rowsum(dO ∘ O): the softmax backward's correction
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v]).contiguous()
        partial = None                                 # the travelling block's partial dK, dV, on its way here
        for step in range(ring.size):
            nxt = lens[(ring.rank - step - 1) % ring.size]            # the block (and dK, dV) that arrives next
            send_kv = ring.start(kv, nxt) if step < ring.size - 1 else None
            kj, vj = kv.to(acc).unbind(0)
            p = torch.exp((qf @ kj.transpose(-1, -2)) * scale - lse.unsqueeze(-1))  # this block's probabilities
            dp = do @ vj.transpose(-1, -2)
            ds = p * (dp - delta)
            dq += (ds @ kj) * scale
            mine = torch.stack([(ds.transpose(-1, -2) @ qf) * scale, p.transpose(-1, -2) @ do])
            # the other ranks' share of this block's dK, dV was sent during the step before and travelled while
            # the lines above computed: wait for it only now, add this rank's share, pass the sum on with the block.
            # After P steps every block's dK, dV is home, summed over every rank's queries.
            dkv = mine if partial is None else _Ring.finish(partial) + mine
            partial = ring.start(dkv, nxt, tag=1)
            if send_kv is not None:
                kv = _Ring.finish(send_kv)
        dkv = _Ring.finish(partial)                    # the last hop home: nothing left to compute while it travels
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, merge_dtype=None,
                   equal: bool = False) -> torch.Tensor:
    """Attention over the whole sequence when each rank of `group` holds a contiguous slice of it.

    q, k, v: (batch, seq_local, heads, head_dim), the layout and contract of `ulysses_attention`; returns this
    rank's slice of full (non-causal) attention, same shape. The slices may differ in length (a sequence that is
    not a multiple of P): each block is whole, nothing to pad or mask in non-causal attention; the lengths are
    exchanged once per call, unless `equal` says every slice is as long as this one."""
    out = RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group, merge_dtype, equal)
    return out.transpose(1, 2)


def context_attention(q, k, v, ulysses_group, ring_group) -> torch.Tensor:
    """USP (Ulysses x Ring): all-to-all over the Ulysses group (U ranks: U slices of the tokens -> all U slices, H/U
    heads), ring attention over the ring group on those heads, all-to-all back. q, k, v: (B, S_local, H, D)."""
    U, H = dist.get_world_size(ulysses_group), q.shape[2]
    if H % U:
        raise ValueError(f"{H} attention heads are not divisible by the Ulysses degree {U}; use a multiple of {U} "
                         f"heads, or a larger ring degree instead.")
    qkv = ResplitAllToAll.apply(torch.stack([q, k, v]), 3, 2, ulysses_group)      # (3, B, U*S_local, H/U, D)
    out = ring_attention(*qkv.unbind(0), group=ring_group, equal=True)   # Ulysses needs equal slices anyway
    return ResplitAllToAll.apply(out, 1, 2, ulysses_group)                      # (B, S_local, H, D)


class ContextAttention:
    """The callable swapped into every block (`DiT.set_attention`)."""

    def __init__(self, ulysses_group, ring_group):
        self.ulysses_group, self.ring_group = ulysses_group, ring_group

    def __call__(self, q, k, v):
        if self.ulysses_group is None:
            return ring_attention(q, k, v, self.ring_group, equal=True)     # the DiT splits its tokens evenly
        return context_attention(q, k, v, self.ulysses_group, self.ring_group)

    def __deepcopy__(self, memo):
        return self


def check_context_parallel(model: ModelConfig, ring: int, ulysses: int, world_size: int) -> None:
    """Every reason a DP x (Ulysses x Ring) layout cannot run, as one sentence, before any step."""
    if ring < 1 or ulysses < 1:
        raise ConfigError(f"--cp-degree {ring} and --ulysses-degree {ulysses} must both be at least 1.")
    check_degree(world_size, ring * ulysses, "--cp-degree x --ulysses-degree")
    if model.num_heads % ulysses:
        raise ConfigError(f"model.num_heads={model.num_heads} is not divisible by --ulysses-degree {ulysses}: "
                          f"Ulysses gives each rank whole heads; use a multiple of {ulysses} heads or move the degree "
                          f"to --cp-degree (the ring has no such limit).")
    tokens = (model.image_size // model.patch_size) ** 2
    degree = ring * ulysses
    if degree > tokens:
        raise ConfigError(f"--cp-degree x --ulysses-degree = {degree} ranks share one image, but model.patch_size="
                          f"{model.patch_size} gives it only {tokens} token{'s' if tokens > 1 else ''}; use at most {tokens} rank{'s' if tokens > 1 else ''} or a smaller "
                          f"patch size (more tokens).")
    check_token_split(model, degree, "--cp-degree x --ulysses-degree =")


class ContextStrategy(UlyssesStrategy):
    """DP x CP for `dit_core.train`: the sequence split, loss normalisation and gradient reduction of Ulysses
    (UlyssesStrategy), with ring attention (and Ulysses inside it, USP) in every block. Ranks [d*C, (d+1)*C) form
    context-parallel group d (C = ring x ulysses) and train on data-parallel slice d of the global batch. Inside a
    group, inner rank i = ring index x U + Ulysses index holds token slice i: a Ulysses group (U consecutive inner
    ranks) gathers U neighbouring slices, one contiguous block of the ring."""

    # (teaching) cp-average: the context-parallel ranks' partial gradients averaged (/ dp x cp, the world size) instead
    # of summed (/ dp): every gradient cp x ulysses times too small (N-D parallelism's cp-average, here alone)
    BROKEN = ("cp-average",)

    def __init__(self, env: DistEnv, ring: int, ulysses: int = 1, broken: str | None = None):
        if broken not in (None, *self.BROKEN):
            raise ConfigError(f"--break {broken} is not one of {', '.join(self.BROKEN)}.")
        super().__init__(env, ring * ulysses, flag="--cp-degree x --ulysses-degree")
        self.broken = broken
        self.ring, self.ulysses = ring, ulysses
        timeout = datetime.timedelta(seconds=env.timeout)
        C, mine = ring * ulysses, {}
        for d in range(env.world_size // C):           # every rank builds every group, in the same order
            base = d * C
            for j in range(ring):
                ranks = [base + j * ulysses + u for u in range(ulysses)]
                g = dist.new_group(ranks, timeout=timeout) if ulysses > 1 else None
                if env.rank in ranks:
                    mine["ulysses"] = g
            for u in range(ulysses):
                ranks = [base + j * ulysses + u for j in range(ring)]
                g = dist.new_group(ranks, timeout=timeout)
                if env.rank in ranks:
                    mine["ring"] = g
        self.ulysses_group, self.ring_group = mine["ulysses"], mine["ring"]

    def attention(self):
        return ContextAttention(self.ulysses_group, self.ring_group)

    def grad_divisor(self) -> int:
        return self.world_size if self.broken == "cp-average" else super().grad_divisor()
