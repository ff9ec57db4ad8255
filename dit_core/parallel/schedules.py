"""Pipeline schedules as data: every stage's list of actions, ("F", m) or ("B", m), and a simulator.

`gpipe` runs every forward, then every backward; `one_f_one_b` warms up with P - s - 1 forwards, then
alternates one forward and one backward, so at most P - s micro-batches wait for their backward (GPipe keeps
all M). `interleaved_1f1b` gives each rank v chunks of layers ("virtual stages": chunk k of P·v lives on rank
k mod P), so a micro-batch visits every rank v times and the bubble shrinks v-fold. `simulate` replays the
lists with a cost per action (one cost for every stage, each stage's own, or each action's own) and an optional
cost per message, and returns the timeline and each stage's bubble: with equal stages and free messages it is
`bubble_formula`; chapter 12 replays the lists with the times measured from real events
(tools/bench_pipeline.py). `dit_core.parallel.pipeline` runs the same lists over real processes.
"""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Action:
    op: str        # "F" (forward of a micro-batch) or "B" (its backward)
    mb: int
    chunk: int = 0  # which of this rank's v chunks (interleaved schedules; 0 otherwise)

    def __repr__(self) -> str:
        return f"{self.op}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


def gpipe(stages: int, microbatches: int, stage: int) -> list[Action]:
    """GPipe: all M forwards, then all M backwards. Every micro-batch's activations live until its backward."""
    return [Action("F", m) for m in range(microbatches)] + [Action("B", m) for m in range(microbatches)]


def one_f_one_b(stages: int, microbatches: int, stage: int) -> list[Action]:
    """1F1B (PipeDream-flush): P - s - 1 warm-up forwards, then one forward and one backward in turn, then the
    remaining backwards. A micro-batch's backward starts as soon as the last stage has its loss, so stage s
    holds at most P - s micro-batches' activations."""
    warm = min(stages - stage - 1, microbatches)
    out = [Action("F", m) for m in range(warm)]
    for i in range(microbatches - warm):
        out += [Action("F", warm + i), Action("B", i)]
    out += [Action("B", m) for m in range(microbatches - warm, microbatches)]
    return out


def interleaved_1f1b(stages: int, microbatches: int, stage: int, chunks: int = 2) -> list[Action]:
    """Interleaved 1F1B (Narayanan et al., 2021): rank s holds chunks s, s + P, ..., s + (v-1)P of the P·v
    chunks. Micro-batches go through in groups of P: forwards of the group on chunk 0, then on chunk 1, ...;
    backwards the other way round. A longer warm-up (2(P - s - 1) + (v - 1)P forwards) lets the steady state
    alternate one forward and one backward. Needs M to be a multiple of P."""
    P, M, v = stages, microbatches, chunks
    total = M * v

    def mb(i):
        return (i // (P * v)) * P + i % P

    def fwd(i):
        return Action("F", mb(i), (i // P) % v)

    def bwd(i):
        return Action("B", mb(i), v - 1 - (i // P) % v)
    warm = min((P - stage - 1) * 2 + (v - 1) * P, total)
    out = [fwd(i) for i in range(warm)]
    for k in range(total - warm):
        out += [fwd(warm + k), bwd(k)]
    out += [bwd(k) for k in range(total - warm, total)]
    return out


BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_1f1b}


def schedule(name: str, stages: int, microbatches: int, chunks: int = 1) -> list[list[Action]]:
    """Every stage's action list (`chunks`: virtual stages per rank, for the interleaved schedule)."""
    if name == "interleaved":
        return [interleaved_1f1b(stages, microbatches, s, chunks) for s in range(stages)]
    return [BUILDERS[name](stages, microbatches, s) for s in range(stages)]


def simulate(actions: list[list[Action]], t_forward=1.0, t_backward=2.0, chunks: int = 1, t_send: float = 0.0,
             durations: list[list[float]] | None = None) -> dict:
    """Replay every stage's action list: when does each action start and end? A forward of micro-batch m on
    chunk k (global chunk k = j·P + s for chunk j of rank s) waits for its forward on chunk k - 1; a backward on
    chunk k for its backward on k + 1 (the last chunk's for its own forward).

    What an action costs:
    * `t_forward`, `t_backward` numbers: a whole stage's forward and backward, the same on every stage; a chunk
      costs 1/v of it (v = `chunks`). Then the bubble is `bubble_formula`'s, whatever the two numbers.
    * `t_forward`, `t_backward` sequences of P·v numbers: one action's cost on each chunk along the pipeline
      (global chunk order k = j·P + s), taken as they are (e.g. each stage's measured median): uneven stages.
    * `durations[s][i]`: the cost of stage s's i-th action itself (e.g. each action's measured time).
    `t_send`: a message's time from the end of the action that sends it to the start of the action on the other
    rank that needs it (0: messages are free, as the formula assumes).

    Returns the timeline and each stage's bubble (its idle share of the whole step's span)."""
    P, v = len(actions), chunks
    C = P * v

    def per_chunk(t):
        if isinstance(t, (int, float)):
            return [t / v] * C
        if len(t) != C:
            raise ValueError(f"{len(t)} costs for {C} chunks along the pipeline (P = {P}, v = {v}); give one number "
                             f"or one per chunk.")
        return list(t)
    cost = {"F": per_chunk(t_forward), "B": per_chunk(t_backward)}
    if durations is not None and [len(d) for d in durations] != [len(a) for a in actions]:
        raise ValueError("durations[s] needs one cost per action of stage s.")
    done: dict = {}                     # (op, mb, global chunk) -> end time
    clock = [0.0] * P
    pos = [0] * P
    timeline = [[] for _ in range(P)]
    while any(pos[s] < len(actions[s]) for s in range(P)):
        progressed = False
        for s in range(P):
            if pos[s] == len(actions[s]):
                continue
            a = actions[s][pos[s]]
            k = a.chunk * P + s
            dep = (("F", a.mb, k - 1) if k > 0 else None) if a.op == "F" else \
                  (("B", a.mb, k + 1) if k < C - 1 else ("F", a.mb, k))
            if dep is not None and dep not in done:
                continue
            # a dependency on another chunk is a message (chunk k - 1 and k + 1 live on other ranks when P > 1)
            ready = 0.0 if dep is None else done[dep] + (t_send if dep[2] != k and P > 1 else 0.0)
            start = max(clock[s], ready)
            end = start + (durations[s][pos[s]] if durations is not None else cost[a.op][k])
            done[(a.op, a.mb, k)] = end
            timeline[s].append((a, start, end))
            clock[s], pos[s], progressed = end, pos[s] + 1, True
        if not progressed:
            raise RuntimeError("the schedule deadlocks: some action waits for one that never runs")
    span = max(clock)
    busy = [sum(e - b for _, b, e in timeline[s]) for s in range(P)]
    return {"timeline": timeline, "span": span, "bubble": [1 - b / span for b in busy]}


def bubble_formula(stages: int, microbatches: int, chunks: int = 1) -> float:
    """The idle share of the step: GPipe's and 1F1B's (P - 1) / (M + P - 1) (Huang et al. 2019; Narayanan et
    al. 2021); interleaved with v chunks per rank, the bubble's time shrinks v-fold (Narayanan et al. 2021:
    (P - 1) / (v·M) of the ideal time), so its share is (P - 1) / (v·M + P - 1)."""
    return (stages - 1) / (chunks * microbatches + stages - 1)
