"""Pipeline schedules as data: every stage's list of actions, ("F", m) or ("B", m), and a simulator.

`gpipe` runs every forward, then every backward; `one_f_one_b` warms up with P - s - 1 forwards, then
alternates one forward and one backward, so at most P - s micro-batches wait for their backward (GPipe keeps
all M). `simulate` replays the lists with a cost per action and predicts the bubble, which chapter 12 checks
against (P - 1) / (M + P - 1) and against the bubble measured from real events. `dit_core.parallel.pipeline`
runs the same lists over real processes.
"""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Action:
    op: str        # "F" (forward of a micro-batch) or "B" (its backward)
    mb: int

    def __repr__(self) -> str:
        return f"{self.op}{self.mb}"


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


BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b}


def schedule(name: str, stages: int, microbatches: int) -> list[list[Action]]:
    """Every stage's action list."""
    return [BUILDERS[name](stages, microbatches, s) for s in range(stages)]


def simulate(actions: list[list[Action]], t_forward: float = 1.0, t_backward: float = 2.0) -> dict:
    """Replay every stage's action list with fixed costs and no communication time: when does each action
    start and end? F(m) on stage s waits for F(m) on s-1; B(m) waits for B(m) on s+1 (the last stage's B(m)
    for its own F(m)). Returns the timeline and each stage's bubble (idle share of the whole step)."""
    P = len(actions)
    done: dict = {}                     # (op, mb, stage) -> end time
    clock = [0.0] * P
    pos = [0] * P
    timeline = [[] for _ in range(P)]
    while any(pos[s] < len(actions[s]) for s in range(P)):
        progressed = False
        for s in range(P):
            if pos[s] == len(actions[s]):
                continue
            a = actions[s][pos[s]]
            dep = (("F", a.mb, s - 1) if s > 0 else None) if a.op == "F" else \
                  (("B", a.mb, s + 1) if s < P - 1 else ("F", a.mb, s))
            if dep is not None and dep not in done:
                continue
            start = max(clock[s], done[dep] if dep else 0.0)
            end = start + (t_forward if a.op == "F" else t_backward)
            done[(a.op, a.mb, s)] = end
            timeline[s].append((a, start, end))
            clock[s], pos[s], progressed = end, pos[s] + 1, True
        if not progressed:
            raise RuntimeError("the schedule deadlocks: some action waits for one that never runs")
    span = max(clock)
    busy = [sum(e - b for _, b, e in timeline[s]) for s in range(P)]
    return {"timeline": timeline, "span": span, "bubble": [1 - b / span for b in busy]}


def bubble_formula(stages: int, microbatches: int) -> float:
    """GPipe's and 1F1B's idle share: (P - 1) / (M + P - 1) (Huang et al. 2019; Narayanan et al. 2021)."""
    return (stages - 1) / (microbatches + stages - 1)
