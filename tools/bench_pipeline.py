"""Pipeline bubble, activation memory and bytes, measured from real events beside the formulas.

    python tools/bench_pipeline.py --out docs/bench_pipeline_cpu.json            # 2 stages on a 2-core CPU
    python tools/bench_pipeline.py --nproc 4 --pp-degree 4 --device cuda ...      # on GPUs (never run: see below)

Every (schedule, M) row is one run of `launchers/pipeline.py --timeline` (all rows in one torchrun job). A stage's
bubble is the share of the schedule's span (the step's barrier to its last event, the slowest stage's) in which
it neither ran a forward nor a backward; the first step (warm-up) is left out, the others averaged. Beside the
measured bubble, the formula and two replays of the same action lists (`simulate`), each replay adding what the one
before it leaves out:

  formula     (P-1)/(vM+P-1): equal stages, every action the same time, messages free;
  simulated   each chunk's own median forward and backward time, measured here (uneven stages), messages free;
  replayed    every action with the time it took in that step (uneven stages and each action's spread), messages
              free, averaged over the steps.

What the replay still leaves out (measured minus replayed) is the time in the exchanges (posting sends, waiting for
a receive whose message was ready) and in Python between actions. The pipeline launcher has run over gloo only;
the GPU command above has never been run.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.parallel.pipeline import bubble_formula, schedule, simulate  # noqa: E402
from dit_core.parity import run_launchers  # noqa: E402
from dit_core.scratch import scratch_dir  # noqa: E402


def chunk_of(what: str) -> int:
    """An event's label -> which of its rank's chunks ran it: 'F3.1' -> 1, 'B2' -> 0 (repr of an Action)."""
    return int(what.split(".")[1]) if "." in what else 0


def analyse(tl: dict) -> dict:
    """One run's timeline file -> bubble per stage (measured, simulated, replayed), compute times, memory, bytes."""
    P, M, v = tl["pp_degree"], tl["microbatches"], tl.get("virtual_stages", 1)
    acts = schedule(tl["schedule"], P, M, v)
    ranks = sorted([r for r in tl["ranks"] if r["pipeline"] == 0], key=lambda r: r["stage"])
    steps = range(1, len(ranks[0]["steps"]))           # leave the warm-up step out
    if not steps:
        raise ValueError("the timeline holds one step, the warm-up; run 2 or more (--steps).")
    measured, replayed = [[] for _ in range(P)], [[] for _ in range(P)]
    times: dict = {(op, k): [] for op in "FB" for k in range(P * v)}
    for i in steps:
        work = [[e for e in r["steps"][i]["events"] if e["kind"] in ("F", "B")] for r in ranks]
        span = max(e["end"] for r in ranks for e in r["steps"][i]["events"])
        for s in range(P):
            if [e["what"] for e in work[s]] != [repr(a) for a in acts[s]]:
                raise ValueError(f"stage {s}'s events of step {i} are not its schedule's actions")
            measured[s].append(1 - sum(e["end"] - e["start"] for e in work[s]) / span)
            for e in work[s]:
                times[(e["kind"], chunk_of(e["what"]) * P + s)].append(e["end"] - e["start"])
        rep = simulate(acts, durations=[[e["end"] - e["start"] for e in w] for w in work], chunks=v)
        for s in range(P):
            replayed[s].append(rep["bubble"][s])
    t_f = [statistics.median(times[("F", k)]) for k in range(P * v)]
    t_b = [statistics.median(times[("B", k)]) for k in range(P * v)]
    sim = simulate(acts, t_f, t_b, chunks=v)
    last = [r["steps"][-1] for r in ranks]

    def mean(xs):
        return sum(xs) / len(xs)
    return {"schedule": tl["schedule"], "P": P, "M": M, "v": v, "micro_batch": tl["micro_batch"],
            "packed_width": tl["packed_width"], "steps_analysed": len(steps),
            "step_seconds": mean([ranks[0]["steps"][i]["seconds"] for i in steps]),
            "bubble_measured": [mean(b) for b in measured], "bubble_formula": bubble_formula(P, M, v),
            "bubble_simulated": sim["bubble"], "bubble_replayed": [mean(b) for b in replayed],
            # one action's median time on each chunk along the pipeline (k = j·P + s: chunk j of rank s)
            "median_forward_ms": [1e3 * t for t in t_f], "median_backward_ms": [1e3 * t for t in t_b],
            "peak_in_flight": [s["peak_in_flight"] for s in last],          # the schedule's arithmetic, counted
            "peak_saved_mib": [s["peak_saved_bytes"] / 2**20 for s in last],  # measured: what autograd saved
            "bytes_sent": [s["bytes_sent"] for s in last],
            "step_events": [r["steps"][-1]["events"] for r in ranks]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--pp-degree", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--microbatches", default="1,2,4,8,16")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per row; the first (warm-up) is left out")
    p.add_argument("--model", default="hidden_size=256,depth=8,num_heads=4,patch_size=4",
                   help="model.* settings: large enough that computing dominates the sends")
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--virtual-stages", type=int, default=2, help="chunks per rank of the interleaved rows (1: none)")
    args = p.parse_args(argv)
    tmp = scratch_dir("bench-pp-")
    base = ["--config", "configs/tiny.yaml", "--device", args.device, "--max-steps", str(args.steps),
            "--global-batch-size", str(args.global_batch_size), "--pp-degree", str(args.pp_degree),
            "--set", "train.tensorboard=false", "--set", "train.train_subset=2048", "--set", "train.warmup_steps=1"]
    for kv in args.model.split(","):
        base += ["--set", f"model.{kv}"]
    names = ("gpipe", "1f1b") + (("interleaved",) if args.virtual_stages > 1 else ())
    rows = [(s, int(m)) for s in names for m in args.microbatches.split(",")
            if not (s != "gpipe" and int(m) < args.pp_degree) and not (s == "interleaved" and int(m) % args.pp_degree)]
    extra = {"interleaved": ["--virtual-stages", str(args.virtual_stages)]}
    run_launchers("launchers/pipeline.py", [base + ["--schedule", s, "--microbatches", str(m), *extra.get(s, []),
                                                    "--results-dir", str(tmp / f"{s}{m}"),
                                                    "--timeline", str(tmp / f"{s}{m}.json")]
                                            for s, m in rows], nproc=args.nproc)
    out = [analyse(json.loads((tmp / f"{s}{m}.json").read_text())) for s, m in rows]
    print(f"{'schedule':>11} {'M':>3} | {'measured (per stage)':>20} | {'formula':>7} | {'simulated':>11} | "
          f"{'replayed':>11} | {'F ms (per chunk)':>16} {'B ms':>16} | {'saved MiB':>13} | {'s/step':>6}")
    for r in out:
        def two(xs, f="{:.3f}"):
            return " ".join(f.format(x) for x in xs)
        print(f"{r['schedule']:>11} {r['M']:>3} | {two(r['bubble_measured']):>20} | {r['bubble_formula']:7.3f} | "
              f"{two(r['bubble_simulated']):>11} | {two(r['bubble_replayed']):>11} | "
              f"{two(r['median_forward_ms'], '{:.1f}'):>16} {two(r['median_backward_ms'], '{:.1f}'):>16} | "
              f"{two(r['peak_saved_mib'], '{:.1f}'):>13} | {r['step_seconds']:6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": out}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
