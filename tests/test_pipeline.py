"""Pipeline parallelism with real processes: torchrun, gloo, on the CPU; schedules and their simulator.

Each table of runs is one torchrun job (`run_launchers`: launchers/pipeline.py's main once per row)."""
import json

import pytest
import torch

from conftest import PARITY_STEPS as STEPS
from conftest import assert_parity, declare, job_dir, parity_flags, torchrun
from dit_core.checkpoint import model_from_checkpoint
from dit_core.config import ConfigError, load_config
from dit_core.diffusion import Diffusion
from dit_core.parallel.pipeline import (bubble_formula, check_pipeline, describe_split, gpipe, one_f_one_b, schedule,
                                        simulate, split_blocks)
from dit_core.parity import SUM_ORDER, parity

TWO = [("gpipe", 4, 1), ("gpipe", 8, 1), ("1f1b", 4, 1), ("1f1b", 8, 1), ("gpipe", 4, 2), ("1f1b", 4, 2)]
BAD = [(["--pp-degree", "2", "--set", "model.depth=1"], "2 pipeline stages (--pp-degree x --virtual-stages) is more "
                                                         "than model.depth=1 blocks"),
       (["--pp-degree", "2", "--microbatches", "3"], "--microbatches 3 does not divide"),
       (["--pp-degree", "2", "--schedule", "1f1b", "--microbatches", "1"],
        "--schedule 1f1b needs at least as many micro-batches as stages"),
       (["--pp-degree", "3", "--set", "model.depth=3"], "world size 2 is not divisible by --pp-degree 3"),
       (["--pp-degree", "2", "--schedule", "1f1b", "--virtual-stages", "2"], "--virtual-stages 2 goes with --schedule "
                                                                             "interleaved"),
       (["--pp-degree", "2", "--schedule", "interleaved", "--virtual-stages", "2", "--microbatches", "3",
         "--global-batch-size", "12", "--set", "model.depth=4"], "needs 2 or more ranks and --microbatches a multiple of 2"),
       (["--pp-degree", "2", "--schedule", "interleaved", "--virtual-stages", "2"],
        "4 pipeline stages (--pp-degree x --virtual-stages) is more than model.depth=2 blocks")]


def pp(schedule_name, m, accum, *extra):
    return parity_flags(**{"train.grad_accum": accum}) + ["--schedule", schedule_name, "--microbatches", str(m), *extra]


# PP 2: both schedules, M = 4 and 8, accumulation 2; the torch.distributed.pipelining reference; the
# rescale-grads bug; a checkpointed run and its resume; the bad inputs (the suite's 2-process job). PP 4 and
# DP 2 x PP 2 (its 4-process job).
D = job_dir() / "pp"
TORCH = [(s, a) for s in ("gpipe", "1f1b") for a in (1, 2)]
INTERLEAVED = [(4, 1, "hand"), (8, 1, "hand"), (4, 2, "hand"), (4, 1, "torch"), (4, 2, "torch")]   # (M, accum, impl)
DEEP = {"model.depth": 4}
# Four ranks (slow on 2 cores): PP 4 with each schedule once (GPipe at M = 4, 1F1B at M = 8; the 2-process job runs
# both schedules at both M), and DP 2 x PP 2 with each schedule.
FOUR = [("gpipe", 4, 4), ("1f1b", 8, 4), ("gpipe", 4, 2), ("1f1b", 4, 2)]
_R = "launchers/pipeline.py"
for s, m, a in TWO:
    declare(2, f"pp {s} {m} a{a}", _R, pp(s, m, a, "--pp-degree", "2", "--results-dir", D / f"{s}{m}a{a}"))
for s, a in TORCH:
    declare(2, f"pp torch {s} a{a}", _R, pp(s, 4, a, "--pp-degree", "2", "--impl", "torch",
                                             "--results-dir", D / f"torch{s}a{a}"))
for m, a, impl in INTERLEAVED:     # 2 ranks x 2 chunks: blocks 0 | 1 | 2 | 3 on ranks 0, 1, 0, 1
    declare(2, f"pp interleaved {m} a{a} {impl}", _R, pp("interleaved", m, a, "--pp-degree", "2", "--virtual-stages", "2",
                                                          "--impl", impl, "--set", "model.depth=4",
                                                          "--results-dir", D / f"inter{m}a{a}{impl}"))
declare(2, "pp broken", _R, pp("1f1b", 4, 2, "--pp-degree", "2", "--break", "rescale-grads", "--results-dir", D / "broken"))
declare(2, "pp ckpt", _R, pp("1f1b", 4, 1, "--pp-degree", "2", "--set", f"train.ckpt_every={STEPS // 2}",
                             "--results-dir", D / "ckpt"))
declare(2, "pp again", _R, pp("1f1b", 4, 1, "--pp-degree", "2", "--results-dir", D / "again",
                              "--resume", D / "ckpt" / f"checkpoint-{STEPS // 2}"))
# the interleaved run's last checkpoint (two chunks per rank) resumed as plain 1F1B: another layout of the optimizer state
declare(2, "pp wrong v", _R, pp("1f1b", 4, 1, "--pp-degree", "2", "--set", "model.depth=4", "--results-dir", D / "wrongv",
                                "--max-steps", str(STEPS + 2), "--resume", D / "inter4a1hand" / f"checkpoint-{STEPS}"))
for i, (args, _) in enumerate(BAD):
    declare(2, f"pp bad{i}", _R, parity_flags(1) + args + ["--results-dir", D / f"bad{i}"])
for s, m, p in FOUR:
    declare(4, f"pp four {s} {m} {p}", _R, pp(s, m, 1, "--pp-degree", str(p), "--results-dir", D / f"four{s}{m}{p}",
                                              *(["--set", "model.depth=4"] if p == 4 else [])))


@pytest.fixture(scope="module")
def two(jobs):
    j = jobs(2)
    return {"hand": {c: j[f"pp {c[0]} {c[1]} a{c[2]}"] for c in TWO},
            "torch": {c: j[f"pp torch {c[0]} a{c[1]}"] for c in TORCH},
            "interleaved": {c: j[f"pp interleaved {c[0]} a{c[1]} {c[2]}"] for c in INTERLEAVED},
            "broken": j["pp broken"], "ckpt": j["pp ckpt"], "again": j["pp again"], "wrong v": j["pp wrong v"],
            "bad": [j[f"pp bad{i}"] for i in range(len(BAD))], "dir": D}


@pytest.mark.parametrize("name, m, accum", TWO)
def test_two_stages_match_one_process(two, reference, name, m, accum):
    log, ref = two["hand"][(name, m, accum)], reference(accum)[0]
    # clipping acts at every step: the global norm spans both stages' gradients
    assert min(r["grad_norm"] for r in ref) > 0.05
    assert_parity(ref, log)
    assert log[-1]["samples_seen"] == STEPS * 16


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("accum", [1, 2])
def test_torch_pipelining_matches_one_process(two, reference, name, accum):
    assert_parity(reference(accum)[0], two["torch"][(name, accum)])


@pytest.mark.parametrize("m, accum, impl", INTERLEAVED)
def test_interleaved_1f1b_matches_one_process(two, reference, m, accum, impl):
    """Two chunks per rank (the 4 blocks as stages 0-3 on ranks 0, 1, 0, 1), by hand and through torch's
    ScheduleInterleaved1F1B."""
    assert_parity(reference(accum, **DEEP)[0], two["interleaved"][(m, accum, impl)])


def test_rescaling_gradients_every_accumulation_step_is_caught(two, reference):
    """torchtitan#1733's bug (divide every .grad by M after each accumulation step): the first piece's gradient
    is divided twice, so the gradient is not a constant factor off and the loss leaves the single-process curve
    too; with one accumulation step it would be harmless. (The constant-factor control, each micro-batch's 1/M
    forgotten, is in test_negative_controls.py.)"""
    v = parity(reference(2)[0], two["broken"], SUM_ORDER)
    assert v.failed == ("loss", "grad_norm") and v.loss > 1e-3, str(v)


def test_checkpoint_is_single_process_weights_and_resume_is_exact(two, reference):
    ckpt, ref_dir = two["dir"] / "ckpt", reference(1)[1]
    ours, cfg = model_from_checkpoint(ckpt / f"checkpoint-{STEPS}")          # loads as a plain DiT
    theirs, _ = model_from_checkpoint(ref_dir / f"checkpoint-{STEPS}")
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k
    d, labels = Diffusion(cfg.diffusion), torch.arange(10)
    a = d.sample(ours, labels, cfg_scale=3.0, steps=10, seed=0)
    b = d.sample(theirs, labels, cfg_scale=3.0, steps=10, seed=0)
    assert (a - b).abs().max() <= 1e-4                                       # the same digits
    assert_parity(two["ckpt"][STEPS // 2:], two["again"], rtol=0.0, steps=STEPS - STEPS // 2)   # bitwise


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_layouts_are_one_sentence(two, i):
    msg = two["bad"][i]
    assert isinstance(msg, str) and BAD[i][1] in msg, msg


def test_resuming_another_virtual_stage_layout_is_one_sentence(two):
    msg = two["wrong v"]
    assert isinstance(msg, str) and ("was written with --pp-degree 2 --virtual-stages 2 on 2 processes, not "
                                     "--pp-degree 2 on 2 processes" in msg and "--schedule interleaved" in msg), msg


@pytest.mark.parametrize("name, m, p", FOUR)
def test_four_stages_and_dp2_x_pp2_match_one_process(reference, jobs, name, m, p):
    ref = reference(1, **({"model.depth": 4} if p == 4 else {}))[0]
    assert_parity(ref, jobs(4)[f"pp four {name} {m} {p}"])


def test_gradients_equal_torch_pipelining_and_one_process(tmp_path):
    out = tmp_path / "checks.json"
    r = torchrun("tests/pp_checks.py", [str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.loads(out.read_text())
    assert c["smallest_gradient_norm"] > 1e-6            # every weight has a gradient worth comparing
    for key in ("hand_gpipe", "hand_1f1b", "torch_gpipe", "torch_1f1b", "hand_interleaved", "torch_interleaved"):
        stages = c[key]
        assert max(s["worst_vs_single"] for s in stages) <= 1e-6, (key, stages)
        want = c["all_params_deep" if "interleaved" in key else "all_params"]
        assert sorted(stages[0]["params"] + stages[1]["params"]) == want              # every weight, once
    # GPipe keeps all 4 micro-batches' activations; 1F1B at most P - s of them: the executor's count of the schedule
    assert [s["peak_in_flight"] for s in c["hand_gpipe"]] == [4, 4]
    assert [s["peak_in_flight"] for s in c["hand_1f1b"]] == [2, 1]
    # and the bytes autograd saved (measured by the saved-tensors hook): 1F1B's stage s peaks at (P - s)/M of GPipe's
    for s, (g, f) in enumerate(zip(c["hand_gpipe"], c["hand_1f1b"])):
        assert abs(f["peak_saved_bytes"] / g["peak_saved_bytes"] - (2 - s) / 4) < 0.01, (s, g, f)
    # bytes: per micro-batch, stage 0 sends (B, T*H + H) fp32 forward; stage 1 the same shape back
    packed = 4 * (16 * 32 + 32) * 4                              # micro-batch 4, 16 tokens, hidden 32, fp32
    assert g["bytes_sent"] == c["hand_gpipe"][1]["bytes_sent"] == 4 * packed


def test_schedules_and_the_simulator():
    assert [repr(a) for a in one_f_one_b(4, 8, 0)][:5] == ["F0", "F1", "F2", "F3", "B0"]
    assert [repr(a) for a in one_f_one_b(4, 8, 3)][:4] == ["F0", "B0", "F1", "B1"]
    for P in (2, 4):
        for M in (1, 2, 4, 8, 16):
            for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)):
                if name != "gpipe" and M < P or name == "interleaved" and M % P:
                    continue
                acts = schedule(name, P, M, v)
                every = sorted((op, m, j) for op in "FB" for m in range(M) for j in range(v))
                assert all(sorted((a.op, a.mb, a.chunk) for a in stage) == every for stage in acts)
                sim = simulate(acts, chunks=v)
                assert max(sim["bubble"]) == pytest.approx(bubble_formula(P, M, v), abs=1e-9), (P, M, name, v)
    # interleaving two chunks per rank shrinks the bubble: 4 stages, 8 micro-batches
    assert bubble_formula(4, 8, 2) < 0.6 * bubble_formula(4, 8)
    assert gpipe(2, 2, 0) == gpipe(2, 2, 1)
    assert split_blocks(5, 2) == [(0, 3), (3, 5)] and split_blocks(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert describe_split(5, 2) == ("5 blocks over 2 stages (uneven: the first take one block more); "
                                    "stage 0: blocks 0-2, stage 1: blocks 3-4")
    assert describe_split(4, 2, 2).endswith("chunk 2 (rank 0): block 2, chunk 3 (rank 1): block 3")


def test_the_simulator_with_measured_costs():
    """The replay tools/bench_pipeline.py feeds with measured times: equal stages give the formula whatever the
    costs; uneven stages, a send cost or one slow action give a larger bubble; so the simulated column can differ."""
    def pipe(sim):
        return sum(sim["bubble"]) / len(sim["bubble"])
    for name, P, M, v in (("gpipe", 2, 4, 1), ("1f1b", 2, 8, 1), ("1f1b", 4, 8, 1), ("interleaved", 2, 4, 2),
                          ("interleaved", 4, 8, 2)):
        acts, C = schedule(name, P, M, v), P * v
        want = bubble_formula(P, M, v)
        # every chunk the same (measured-looking) time: the formula, whatever the forward/backward ratio
        for tf, tb in ((0.3, 0.7), (1.0, 1.0), (2.0, 5.0)):
            sim = simulate(acts, [tf] * C, [tb] * C, chunks=v)
            assert sim["bubble"] == pytest.approx([want] * P, abs=1e-9), (name, P, M, v, tf, tb)
            same = [[tf if a.op == "F" else tb for a in stage] for stage in acts]   # each action's own time
            assert simulate(acts, durations=same, chunks=v)["bubble"] == pytest.approx([want] * P, abs=1e-9)
        # the last chunk 30 % slower (it runs the final layer and the loss): more idle, on the pipeline's mean
        slow = [1.3 if k == C - 1 else 1.0 for k in range(C)]
        assert pipe(simulate(acts, slow, [2 * t for t in slow], chunks=v)) > want + 1e-3, (name, P, M, v)
        # messages that cost time
        assert pipe(simulate(acts, [1.0] * C, [2.0] * C, chunks=v, t_send=0.1)) > want + 1e-3, (name, P, M, v)
        # one slow action among equal ones (the spread of a CPU's timings), on the critical path: stage 0's first
        # forward, which every later action waits for (a slow action in an idle slot may cost nothing)
        jitter = [[1.0 if a.op == "F" else 2.0 for a in stage] for stage in acts]
        jitter[0][0] *= 1.5
        assert pipe(simulate(acts, durations=jitter, chunks=v)) > want + 1e-3, (name, P, M, v)
    with pytest.raises(ValueError, match="3 costs for 4 chunks"):
        simulate(schedule("interleaved", 2, 4, 2), [1.0] * 3, [2.0] * 4, chunks=2)


def _bench():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_pipeline", Path(__file__).resolve().parents[1] / "tools" /
                                                  "bench_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name, M, v", [("gpipe", 4, 1), ("1f1b", 8, 1), ("interleaved", 4, 2)])
def test_bench_analysis_of_a_known_timeline(name, M, v):
    """tools/bench_pipeline.py's analysis on a timeline whose every action's time is known (written by the simulator
    with uneven chunks and a slower first action every step): it finds each chunk's median time, the measured bubble
    (from the events alone) equals the replay of the same times, and the simulated (medians) and formula differ."""
    P, C = 2, 2 * v
    acts = schedule(name, P, M, v)
    tf = [0.010 * (1 + 0.2 * k) for k in range(C)]          # later chunks slower
    tb = [2 * t for t in tf]
    steps = []
    for i in range(3):
        d = [[(tf if a.op == "F" else tb)[a.chunk * P + s] for a in stage] for s, stage in enumerate(acts)]
        d[0][0] *= 1 + 0.25 * i                              # stage 0's first forward: slower every step
        sim = simulate(acts, durations=d, chunks=v)
        steps.append([{"step": i, "seconds": sim["span"], "peak_in_flight": 1, "peak_saved_bytes": 2**20,
                       "bytes_sent": 100, "events": [{"kind": a.op, "what": repr(a), "start": b, "end": e}
                                                     for a, b, e in sim["timeline"][s]]} for s in range(P)])
    tl = {"pp_degree": P, "microbatches": M, "schedule": name, "virtual_stages": v, "micro_batch": 4,
          "packed_width": 10, "ranks": [{"rank": s, "stage": s, "pipeline": 0, "steps": [st[s] for st in steps]}
                                        for s in range(P)]}
    r = _bench().analyse(tl)
    assert r["steps_analysed"] == 2 and r["median_forward_ms"] == pytest.approx([1e3 * t for t in tf])
    assert r["median_backward_ms"] == pytest.approx([1e3 * t for t in tb])
    assert r["bubble_measured"] == pytest.approx(r["bubble_replayed"], abs=1e-9)
    assert r["bubble_simulated"] == pytest.approx(simulate(acts, tf, tb, chunks=v)["bubble"], abs=1e-12)
    mean = sum(r["bubble_simulated"]) / P
    assert mean > r["bubble_formula"] + 1e-3 and sum(r["bubble_measured"]) / P > mean + 1e-4
    # events that are not the schedule's actions are refused, not analysed
    tl["ranks"][1]["steps"][1]["events"].pop()
    with pytest.raises(ValueError, match="not its schedule's actions"):
        _bench().analyse(tl)


def test_layout_checks():
    cfg = load_config("configs/tiny.yaml", {"train.global_batch_size": 16, "model.depth": 4})
    check_pipeline(cfg, 2, 4, 4, "gpipe", 2)
    with pytest.raises(ConfigError, match="does not divide; use a batch that is a multiple of 32"):
        check_pipeline(cfg, 2, 4, 16, "gpipe", 2)
