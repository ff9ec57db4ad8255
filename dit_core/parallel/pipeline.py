"""Pipeline parallelism (流水线并行) by hand: the DiT's blocks split over P stages.

Stage 0 also holds the patch, position, timestep and label embeddings; the last stage the final layer
and the loss. Between stages travels one packed tensor per micro-batch: the tokens h (B, T, H) and the
conditioning vector c (B, H) that every block reads, side by side in a (B, T*H + H) buffer. Forward
sends it to the next stage; backward sends its gradient (dh and dc: the blocks of every later stage add
to dc) to the previous one. Shapes are known from the config, so the receiver allocates its buffer in
advance: plain `isend`/`irecv` of tensors, nothing pickled.

A schedule is a list of actions per stage (`dit_core.parallel.schedules`: GPipe, 1F1B, interleaved 1F1B, the
simulator); `Executor` runs one for real and, when asked, records when each action computed and when it waited.
It has run over gloo (CPU processes) only, never on NCCL with 2 or more GPUs.

This module is the mechanism: the split, the stages, the executor. The strategy that trains with them (DP x PP,
its engine and EMA, the reference engine on torch.distributed.pipelining, `--timeline`) is
`dit_core.parallel.pipeline_train`.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config, ConfigError
from ..engine import autocast_ctx
from ..model import DiT
from .dist import check_degree
from .schedules import (BUILDERS, Action, bubble_formula, gpipe, interleaved_1f1b, one_f_one_b, schedule,  # noqa: F401
                        simulate)

SCHEDULES = ("gpipe", "1f1b", "interleaved")


# ---------------------------------------------------------------- splitting the model

def split_blocks(depth: int, stages: int, flags: str = "--pp-degree x --virtual-stages") -> list[tuple[int, int]]:
    """[lo, hi) of the blocks of every stage: as even as possible, the first stages take one more."""
    if stages > depth:
        raise ConfigError(f"{stages} pipeline stages ({flags}) is more than model.depth={depth} "
                          f"blocks; every stage needs a block: use fewer stages or a deeper model.")
    base, extra = divmod(depth, stages)
    out, lo = [], 0
    for s in range(stages):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def describe_split(depth: int, stages: int, chunks: int = 1) -> str:
    """The split in words, uneven ones said so: what the launcher prints before training."""
    parts, unit = split_blocks(depth, stages * chunks), ("chunk" if chunks > 1 else "stage")
    where = []
    for k, (lo, hi) in enumerate(parts):
        rank = f" (rank {k % stages})" if chunks > 1 else ""
        where.append(f"{unit} {k}{rank}: " + (f"block {lo}" if hi - lo == 1 else f"blocks {lo}-{hi - 1}"))
    even = "even" if len({hi - lo for lo, hi in parts}) == 1 else "uneven: the first take one block more"
    return f"{depth} blocks over {len(parts)} {unit}s ({even}); " + ", ".join(where)


class Stage(nn.Module):
    """Stage s of P: what of the DiT it holds, and its forward on one micro-batch."""

    def __init__(self, model: DiT, stage: int, stages: int, free_rest: bool = True, tokens: slice = slice(None)):
        super().__init__()
        self.stage, self.stages = stage, stages
        # `tokens`: the contiguous range of every image's tokens this rank holds (context parallelism in
        # dit_core.parallel.nd); then the last stage returns its tokens of the prediction, not an image
        self.tokens, self.whole = tokens, tokens == slice(None)
        self.first, self.last = stage == 0, stage == stages - 1
        self.lo, self.hi = split_blocks(len(model.blocks), stages)[stage]
        self.cfg, self.grid = model.cfg, model.grid
        if self.first:
            self.x_embedder, self.t_embedder, self.y_embedder = model.x_embedder, model.t_embedder, model.y_embedder
            self.register_buffer("pos_embed", model.pos_embed, persistent=False)
        self.blocks = nn.ModuleList(model.blocks[self.lo:self.hi])
        if self.last:
            self.final_layer = model.final_layer
        self.unpatchify = model.unpatchify
        if free_rest:
            free_all_but(model, self)

    def global_name(self, name: str) -> str:
        """This stage's parameter name -> the single-process DiT's (blocks are numbered from lo)."""
        if name.startswith("blocks."):
            i, rest = name[len("blocks."):].split(".", 1)
            return f"blocks.{int(i) + self.lo}.{rest}"
        return name

    def local_state(self, sd: dict) -> dict:
        """The entries of a whole DiT state dict that this stage holds, under this stage's names."""
        return {k: sd[self.global_name(k)] for k in self.state_dict()}

    def packed_width(self) -> int:
        h = self.cfg.hidden_size
        return len(range(self.grid * self.grid)[self.tokens]) * h + h

    def forward(self, x):
        """First stage: x = (x_t, t, y, drop); later stages: the packed (B, T*H + H) activations.
        Returns the packed activations, or on the last stage the prediction (B, C, H, W)."""
        if self.first:
            x_t, t, y, drop = x
            h = self.x_embedder(x_t).flatten(2).transpose(1, 2)[:, self.tokens]
            h = h + self.pos_embed[:, self.tokens].to(h.dtype)
            c = self.t_embedder(t) + self.y_embedder(y, drop)
        else:
            H = self.cfg.hidden_size
            h, c = x[:, :-H].view(x.shape[0], -1, H), x[:, -H:]
        for blk in self.blocks:
            h = blk(h, c)
        if self.last:
            out = self.final_layer(h, c)
            return self.unpatchify(out) if self.whole else out
        # c goes on unchanged: every later block reads it, and its gradient comes back with dh
        return torch.cat([h.flatten(1).float(), c.float()], dim=1)


def check_pipeline(cfg: Config, stages: int, world_size: int, microbatches: int, name: str, dp: int,
                   chunks: int = 1, flag: str = "--pp-degree") -> None:
    """Every bad layout is one sentence, before any process waits on another. (`flag`: how the launcher
    names the number of stages; the N-D launcher calls it --pp.)"""
    check_degree(world_size, stages, flag)
    if name not in SCHEDULES:
        raise ConfigError(f"--schedule {name} is not one of {', '.join(SCHEDULES)}.")
    if chunks < 1 or (chunks > 1) != (name == "interleaved"):
        raise ConfigError(f"--virtual-stages {chunks} goes with --schedule interleaved (2 or more chunks per rank) "
                          f"and only with it; use --schedule interleaved --virtual-stages 2, or --virtual-stages 1.")
    split_blocks(cfg.model.depth, stages * chunks, f"{flag} x --virtual-stages" if flag == "--pp-degree" else flag)
    if microbatches < 1:
        raise ConfigError(f"--microbatches {microbatches} must be at least 1.")
    per = cfg.train.global_batch_size // dp // cfg.train.grad_accum
    if cfg.train.global_batch_size % (dp * cfg.train.grad_accum) or per % microbatches:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} gives each of the {dp} pipelines "
            f"{cfg.train.global_batch_size / dp / cfg.train.grad_accum:g} samples per accumulation step, which "
            f"--microbatches {microbatches} does not divide; use a batch that is a multiple of "
            f"{dp * cfg.train.grad_accum * microbatches}.")
    if name in ("1f1b", "interleaved") and microbatches < stages:
        raise ConfigError(f"--schedule {name} needs at least as many micro-batches as stages (--microbatches "
                          f"{microbatches} < {flag} {stages}): its warm-up alone holds {stages - 1}; use "
                          f"--microbatches {stages} or more, or --schedule gpipe.")
    if name == "interleaved" and (stages < 2 or microbatches % stages):
        raise ConfigError(f"--schedule interleaved sends micro-batches round the {stages} ranks in groups of "
                          f"{flag}: it needs 2 or more ranks and --microbatches a multiple of {stages} (not "
                          f"{microbatches}).")


def free_all_but(model: DiT, *keep: nn.Module) -> None:
    """This rank holds only its stage's weights: the rest of the DiT it was cut from keeps empty tensors."""
    mine = {id(p) for m in keep for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in mine:
            p.data = p.data.new_empty(0)


class RankStages(nn.Module):
    """What one rank holds: chunk j of it is global stage j·P + s of P·v (v = 1: just stage s)."""

    def __init__(self, model: DiT, stage: int, stages: int, chunks: int = 1, tokens: slice = slice(None)):
        super().__init__()
        self.stage, self.P, self.v = stage, stages, chunks
        self.chunks = nn.ModuleList([Stage(model, j * stages + stage, stages * chunks, free_rest=False, tokens=tokens)
                                     for j in range(chunks)])
        free_all_but(model, self)

    def global_name(self, name: str) -> str:
        j, rest = name[len("chunks."):].split(".", 1)
        return self.chunks[int(j)].global_name(rest)

    def local_state(self, sd: dict) -> dict:
        return {f"chunks.{j}.{k}": v for j, c in enumerate(self.chunks) for k, v in c.local_state(sd).items()}

    def packed_width(self) -> int:
        return self.chunks[0].packed_width()


# ---------------------------------------------------------------- running a schedule

class Executor:
    """Runs one rank's action list (its v chunks' forwards and backwards) over M micro-batches, with the sends
    and receives they need.

    Before the first action the rank posts that action's receive. After each action, the action's send (its
    output forward, or its input's gradient back) and the next action's receive go out together in one
    `batch_isend_irecv`, and the rank waits for the **receive only** before it computes again; the sends are
    waited for at the end of the step (`run`), after the last action. (Waiting for the sends at once hung the
    interleaved schedule on gloo: two ranks each waited for a send the other would only take after its own
    send was done.) Pairing the send and the receive in one batch follows NCCL's rule for peer-to-peer calls
    that must progress together (one group; NCCL user guide, "Point-to-point communication"); on NCCL the
    batch comes back as one request, so the rank's stream waits for its send too. That path is untested: the
    executor has run over gloo only, never on NCCL with 2 or more GPUs.

    What it counts, per step: `bytes_sent` (every tensor it sends), `peak_saved_bytes` (measured: the storages
    autograd saves for backward during each forward, weights excluded, held until that micro-batch's backward;
    the peak of their sum), `peak_in_flight` (how many micro-batches had run their forward and not yet their
    backward: the schedule's arithmetic, counted), and with `timeline`, `events`: when each action computed and
    when each exchange waited (time.perf_counter)."""

    def __init__(self, stage: RankStages, pp_group, pp_ranks: list[int], device, timeline: bool = False):
        self.stage, self.group, self.device, self.ranks = stage, pp_group, device, pp_ranks
        self.C = stage.P * stage.v          # chunks along the pipeline; chunk k lives on rank k mod P
        self.record = timeline
        self.events: list[dict] = []
        self.peak_in_flight = 0
        self.peak_saved_bytes = 0
        self.bytes_sent = 0
        self.pending: list = []            # sends posted and not yet waited for

    # A message into chunk k carries tag 2k (activations) or 2k + 1 (gradients): both ends compute it, so with
    # several chunks per rank (interleaved) every message lands in the buffer meant for it.
    def _k(self, a: Action) -> int:
        return a.chunk * self.stage.P + self.stage.stage

    def _recv_ops(self, a: Action | None, mb_size: int, box: dict) -> list:
        if a is None:
            return []
        k = self._k(a)
        if a.op == "F" and k > 0:
            buf = torch.empty(mb_size, self.stage.packed_width(), device=self.device)
            box[("in", a.mb, a.chunk)] = buf
            return [dist.P2POp(dist.irecv, buf, self.ranks[(k - 1) % self.stage.P], self.group, tag=2 * k)]
        if a.op == "B" and k < self.C - 1:
            buf = torch.empty(mb_size, self.stage.packed_width(), device=self.device)
            box[("grad", a.mb, a.chunk)] = buf
            return [dist.P2POp(dist.irecv, buf, self.ranks[(k + 1) % self.stage.P], self.group, tag=2 * k + 1)]
        return []

    def _send_ops(self, a: Action, box: dict) -> list:
        k = self._k(a)
        if a.op == "F" and k < self.C - 1:
            t, peer, tag = box[("out", a.mb, a.chunk)].detach(), self.ranks[(k + 1) % self.stage.P], 2 * (k + 1)
        elif a.op == "B" and k > 0:
            t, peer, tag = box.pop(("in_leaf", a.mb, a.chunk)).grad, self.ranks[(k - 1) % self.stage.P], 2 * (k - 1) + 1
        else:
            return []
        self.bytes_sent += t.numel() * t.element_size()
        return [dist.P2POp(dist.isend, t.contiguous(), peer, self.group, tag=tag)]

    def _exchange(self, ops: list, label: str) -> None:
        """Post the sends and receives in one batch; wait for the receives only. A send is waited for at the
        end of the step: with two chunks per rank (interleaved) a rank may send to a peer that is itself
        still sending, and if each waited for its send before posting its next receive, both would wait."""
        if not ops:
            return
        t0 = time.perf_counter()
        reqs = dist.batch_isend_irecv(ops)
        if len(reqs) != len(ops):          # NCCL coalesces a batch into one request: it covers the receives
            reqs[-1].wait()
        else:
            for op, req in zip(ops, reqs):
                if op.op is dist.irecv:
                    req.wait()
                else:
                    self.pending.append((req, op.tensor))     # the tensor stays alive until its send is done
        if self.record:
            self.events.append({"kind": "wait", "what": label, "start": t0, "end": time.perf_counter()})

    def run(self, actions: list[Action], inputs: list, forward_last, backward_scale: float, autocast: str) -> list:
        """`inputs[m]`: what the first stage needs of micro-batch m; `forward_last(m, pred)`: the last stage's
        loss of micro-batch m. Returns the last stage's losses (unscaled), in micro-batch order."""
        box: dict = {}
        losses = {}
        mb_size = inputs[0][0].shape[0]
        in_flight = saved = 0
        sizes = {}
        weights = {p.untyped_storage().data_ptr() for p in self.stage.parameters()}
        seen: set = set()

        def pack(t):
            # activation memory: what autograd keeps for backward, each storage once, weights excluded
            nonlocal saved
            key = t.untyped_storage().data_ptr()
            if key not in weights and key not in seen:
                seen.add(key)
                saved += t.untyped_storage().nbytes()
            return t

        self._exchange(self._recv_ops(actions[0], mb_size, box), f"recv for {actions[0]}")
        for i, a in enumerate(actions):
            t0 = time.perf_counter()
            chunk, key = self.stage.chunks[a.chunk], (a.mb, a.chunk)
            if a.op == "F":
                before = saved
                seen.clear()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    with autocast_ctx(autocast, self.device):
                        if chunk.first:
                            x = inputs[a.mb]
                        else:
                            x = box.pop(("in", *key)).requires_grad_()
                            box[("in_leaf", *key)] = x
                        out = chunk(x)
                    if chunk.last:
                        box[("loss", *key)] = loss = forward_last(a.mb, out)
                        losses[a.mb] = loss.detach()
                    else:
                        box[("out", *key)] = out
                sizes[key] = saved - before
                in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, in_flight)
                self.peak_saved_bytes = max(self.peak_saved_bytes, saved)
            else:
                if chunk.last:
                    (box.pop(("loss", *key)) * backward_scale).backward()
                else:
                    torch.autograd.backward(box.pop(("out", *key)), box.pop(("grad", *key)))
                in_flight -= 1
                saved -= sizes.pop(key)        # the graph of micro-batch m is freed by its backward
            if self.record:
                self.events.append({"kind": a.op, "what": repr(a), "start": t0, "end": time.perf_counter()})
            nxt = actions[i + 1] if i + 1 < len(actions) else None
            self._exchange(self._send_ops(a, box) + self._recv_ops(nxt, mb_size, box),
                           f"after {a}" + (f", for {nxt}" if nxt else ""))
        for req, _ in self.pending:
            req.wait()
        self.pending.clear()
        return [losses[m] for m in sorted(losses)]
