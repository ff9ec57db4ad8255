"""Pipeline bubble, activation memory and bytes, measured from real events beside the formulas.

    python tools/bench_pipeline.py --out docs/bench_pipeline_cpu.json            # 2 stages on a 2-core CPU
    python tools/bench_pipeline.py --nproc 4 --pp-degree 4 --device cuda ...      # on GPUs

Every (schedule, M) row is one run of `launchers/pipeline.py --timeline` (all rows in one torchrun job). A stage's
bubble is the share of the schedule's span (the step's barrier to its last action, the slowest stage's) in which
it neither ran a forward nor a backward; the first step (warm-up) is left out. The simulator replays the same
action lists with the forward and backward times measured here (their mean over stages and steps).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.parallel.pipeline import bubble_formula, schedule, simulate  # noqa: E402
from dit_core.parity import run_launchers  # noqa: E402
from dit_core.scratch import scratch_dir  # noqa: E402


def analyse(tl: dict) -> dict:
    """One run's timeline file -> bubble per stage, compute times, memory, bytes."""
    P, M, v = tl["pp_degree"], tl["microbatches"], tl.get("virtual_stages", 1)
    ranks = sorted([r for r in tl["ranks"] if r["pipeline"] == 0], key=lambda r: r["stage"])
    steps = ranks[0]["steps"][1:]                      # leave the warm-up step out
    bubbles, tf, tb = [[] for _ in range(P)], [], []
    for i in range(len(steps)):
        evs = [r["steps"][i + 1]["events"] for r in ranks]
        span = max(max(e["end"] for e in ev) for ev in evs)
        for s, ev in enumerate(evs):
            busy = sum(e["end"] - e["start"] for e in ev if e["kind"] in ("F", "B"))
            bubbles[s].append(1 - busy / span)
            tf += [e["end"] - e["start"] for e in ev if e["kind"] == "F"]
            tb += [e["end"] - e["start"] for e in ev if e["kind"] == "B"]
    t_f, t_b = sum(tf) / len(tf), sum(tb) / len(tb)
    # a chunk's measured time is 1/v of a stage's: scale back so that simulate() (which divides by v) matches
    sim = simulate(schedule(tl["schedule"], P, M, v), v * t_f, v * t_b, chunks=v)
    last = [r["steps"][-1] for r in ranks]
    return {"schedule": tl["schedule"], "P": P, "M": M, "v": v, "micro_batch": tl["micro_batch"],
            "packed_width": tl["packed_width"],
            "bubble_measured": [sum(b) / len(b) for b in bubbles], "bubble_formula": bubble_formula(P, M, v),
            "bubble_simulated": max(sim["bubble"]), "t_forward_ms": 1e3 * t_f, "t_backward_ms": 1e3 * t_b,
            "peak_in_flight": [s["peak_in_flight"] for s in last],
            "peak_saved_mib": [s["peak_saved_bytes"] / 2**20 for s in last],
            "bytes_sent": [s["bytes_sent"] for s in last],
            "step_events": [r["steps"][-1]["events"] for r in ranks]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--pp-degree", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--microbatches", default="1,2,4,8,16")
    p.add_argument("--steps", type=int, default=4)
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
    print(f"{'schedule':>11} {'M':>3} | {'bubble measured (per stage)':>28} | {'formula':>7} | {'simulated':>9} | "
          f"{'F ms':>6} {'B ms':>6} | {'in flight':>9} | {'saved MiB':>13}")
    for r in out:
        print(f"{r['schedule']:>11} {r['M']:>3} | {' '.join(f'{b:.3f}' for b in r['bubble_measured']):>28} | "
              f"{r['bubble_formula']:7.3f} | {r['bubble_simulated']:9.3f} | {r['t_forward_ms']:6.1f} "
              f"{r['t_backward_ms']:6.1f} | {str(r['peak_in_flight']):>9} | "
              f"{' '.join(f'{m:.1f}' for m in r['peak_saved_mib']):>13}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": out}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
