"""N-D parallelism with real processes: 8 CPU ranks (gloo) composing DP, PP, CP and TP, against one process.

All 8-process runs are one torchrun job (conftest.declare); the layout arithmetic and the one-sentence checks
are tested without processes."""
import json

import pytest
import torch

from conftest import PARITY_STEPS as STEPS
from conftest import assert_parity, declare, job_dir, parity_flags
from dit_core.checkpoint import model_from_checkpoint
from dit_core.config import ConfigError, load_config
from dit_core.parallel.nd import AXES, Layout, check_nd, mesh_picture, resolve_layout
from dit_core.parity import SUM_ORDER, parity

D = job_dir() / "nd"
_R = "launchers/nd.py"
# (name, flags): 3-D as Megatron (D = T = P = 2), and two layouts with context parallelism (C = 2), one of them
# without a pipeline (P = 1: any degree may be 1)
LAYOUTS = [("dp2 pp2 tp2", ["--dp", "2", "--pp", "2", "--tp", "2"], Layout(2, 2, 1, 2)),
           ("pp2 cp2 tp2", ["--pp", "2", "--cp", "2", "--tp", "2"], Layout(1, 2, 2, 2)),
           ("dp2 cp2 tp2", ["--dp", "2", "--cp", "2", "--tp", "2"], Layout(2, 1, 2, 2))]
BAD = [(["--dp", "2", "--pp", "2", "--cp", "2", "--tp", "2"], "--dp 2 x --pp 2 x --cp 2 x --tp 2 = 16 is not the "
                                                              "world size 8"),
       (["--tp", "3"], "--pp 1 x --cp 1 x --tp 3 = 3 ranks per data-parallel replica does not divide the world size 8"),
       (["--tp", "8"], "model.num_heads=4 is not divisible by --tp 8"),
       (["--cp", "2", "--set", "model.patch_size=4"], "model.patch_size=4 gives 49 tokens, not divisible by --cp 2"),
       (["--pp", "8"], "8 pipeline stages (--pp) is more than model.depth=2 blocks"),
       (["--pp", "2", "--microbatches", "1"], "--schedule 1f1b needs at least as many micro-batches as stages "
                                             "(--microbatches 1 < --pp 2)")]
for name, flags, _ in LAYOUTS:
    extra = ["--set", f"train.ckpt_every={STEPS // 2}"] if name == "dp2 pp2 tp2" else []
    declare(8, f"nd {name}", _R, parity_flags() + flags + extra + ["--results-dir", D / name.replace(" ", "_")])
# (--break cp-average, a constant factor, is with every strategy's negative control in test_negative_controls.py)
declare(8, "nd break norm-every-tp-rank", _R, parity_flags() + LAYOUTS[0][1] + ["--break", "norm-every-tp-rank",
                                                                              "--results-dir", D / "norm-every-tp-rank"])
CKPT = D / "dp2_pp2_tp2" / f"checkpoint-{STEPS // 2}"
declare(8, "nd again", _R, parity_flags() + LAYOUTS[0][1] + ["--results-dir", D / "again", "--resume", CKPT])
declare(8, "nd wrong layout", _R, parity_flags() + LAYOUTS[1][1] + ["--results-dir", D / "wrong", "--resume", CKPT])
for i, (args, _) in enumerate(BAD):
    declare(8, f"nd bad{i}", _R, parity_flags(1) + args + ["--results-dir", D / f"bad{i}"])


@pytest.fixture(scope="module")
def eight(jobs):
    return jobs(8)


@pytest.mark.parametrize("name", [n for n, _, _ in LAYOUTS])
def test_eight_ranks_match_one_process(eight, reference, name):
    log, ref = eight[f"nd {name}"], reference(1)[0]
    # clipping acts at every step (norms > 0.05), so the norm, summed over pp x tp, must be the whole model's
    assert min(r["grad_norm"] for r in ref) > 0.05
    assert_parity(ref, log)
    assert log[-1]["samples_seen"] == STEPS * 16


@pytest.mark.parametrize("name, layout", [(n, L) for n, _, L in LAYOUTS])
def test_device_mesh_coordinates_and_groups(eight, name, layout):
    """Every rank's coordinates and the ranks of its process groups, as the project built them, equal those of torch's
    init_device_mesh of the same shape, which each rank built independently in the same run; and both follow the
    documented formula rank = ((d·P + p)·C + c)·T + t."""
    assert isinstance(eight[f"nd {name}"], list)                 # the run trained
    record = json.loads((D / name.replace(" ", "_") / "mesh.json").read_text())
    assert [r["rank"] for r in record] == list(range(8))
    P, C, T = layout.pp, layout.cp, layout.tp
    for r in record:
        assert r["coords"] == r["torch_coords"], r
        assert r["groups"] == r["torch_groups"], r
        d, p, c, t = (r["torch_coords"][a] for a in ("dp", "pp", "cp", "tp"))
        assert ((d * P + p) * C + c) * T + t == r["rank"]
    # tp on consecutive ranks
    assert all(r["groups"]["tp"] == list(range(r["rank"] - r["coords"]["tp"], r["rank"] - r["coords"]["tp"] + T))
               for r in record)


def test_a_wrong_norm_reduction_is_caught(eight, reference):
    """The replicated parameters' squares counted on every tp rank: the norm too large, clipping too hard, so the
    loss leaves the curve too. (The cp ranks' gradients averaged instead of summed, which only the norm shows, is
    with the other strategies' negative controls in test_negative_controls.py.)"""
    v = parity(reference(1)[0], eight["nd break norm-every-tp-rank"], SUM_ORDER)
    assert v.failed == ("loss", "grad_norm") and v.loss > 1e-4 and v.norm_ratio[0] > 1.2, str(v)


def test_checkpoint_is_single_process_weights_and_resume_is_exact(eight, reference):
    ours, _ = model_from_checkpoint(D / "dp2_pp2_tp2" / f"checkpoint-{STEPS}")          # gathered: a plain DiT
    theirs, _ = model_from_checkpoint(reference(1)[1] / f"checkpoint-{STEPS}")
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k
    assert_parity(eight["nd dp2 pp2 tp2"][STEPS // 2:], eight["nd again"], rtol=0.0, steps=STEPS - STEPS // 2)


def test_resuming_another_layout_is_one_sentence(eight):
    msg = eight["nd wrong layout"]
    want = "was written with --dp 2 --pp 2 --cp 1 --tp 2 on 8 processes, not --dp 1 --pp 2 --cp 2 --tp 2 on 8 processes"
    assert isinstance(msg, str) and want in msg and "launchers/nd.py --dp 2 --pp 2" in msg, msg


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_layouts_are_one_sentence(eight, i):
    msg = eight[f"nd bad{i}"]
    assert isinstance(msg, str) and BAD[i][1] in msg, msg


def test_layout_arithmetic():
    L = Layout(2, 2, 1, 2)
    coords = [tuple(L.coords(r).values()) for r in (0, 1, 2, 7)]
    assert coords == [(0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (1, 1, 0, 1)]
    assert list(L.coords(0)) == list(AXES)
    assert L.lines("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.lines("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert L.lines("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert L.lines("dp", "cp") == L.lines("dp") and L.lines("pp", "tp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert Layout(1, 2, 2, 2).lines("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert Layout(1, 2, 2, 2).lines("dp", "cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert resolve_layout(8, None, 2, 2, 1) == Layout(2, 2, 2, 1)
    assert mesh_picture(L).splitlines()[1] == "  dp0 pp0: r0(cp0,tp0) r1(cp0,tp1)"
    with pytest.raises(ConfigError, match="--cp 0 must be at least 1"):
        resolve_layout(8, None, 1, 0, 1)


def test_checks_name_the_axis():
    cfg = load_config("configs/tiny.yaml", {"model.num_heads": 4, "model.depth": 2, "model.patch_size": 7,
                                            "train.global_batch_size": 16})
    check_nd(cfg, Layout(2, 2, 2, 2), 16, 4, "1f1b")
    with pytest.raises(ConfigError, match="not divisible by --tp 8"):
        check_nd(cfg, Layout(1, 1, 1, 8), 8, 1, "gpipe")
    check_nd(cfg, Layout(4, 2, 1, 1), 8, 4, "1f1b")          # 16 images / 4 replicas = 4 micro-batches of 1
    with pytest.raises(ConfigError, match="--microbatches 4 does not divide"):
        check_nd(cfg, Layout(8, 1, 1, 1), 8, 4, "gpipe")     # 16 / 8 replicas = 2 images: not 4 micro-batches
    with pytest.raises(ConfigError, match="is not the world size 4"):
        check_nd(cfg, Layout(2, 2, 1, 2), 4, 4, "1f1b")


def test_the_planner_orders_the_axes_by_the_published_rules():
    from dit_core.parallel.plan import Job, block_seconds, plan, tp_seconds
    # the workbook's DiT fits one GPU many times over: data parallelism only
    H200, GB80 = 141e9 / 2 ** 30, 80e9 / 2 ** 30
    small = plan(Job("mnist", 1.28e6, 4, 128, 4, 16, H200, 2, 1, 4096))
    assert (small.dp, small.pp, small.cp, small.tp, small.zero3) == (2, 1, 1, 1, False)
    # a narrow, short block computes for less time than its TP 2 all-reduces take; configs/bench.yaml is marginal
    assert block_seconds(Job("narrow", 5e6, 4, 256, 4, 16, H200, 2, 1), 2) < tp_seconds(Job("narrow", 5e6, 4, 256, 4,
                                                                                          16, H200, 2, 1), 2)
    bench = Job("bench", 32.5e6, 12, 384, 6, 196, H200, 2, 1)
    assert 1 < block_seconds(bench, 2) / tp_seconds(bench, 2) < 1.5
    # a 70B model: states sharded first (ZeRO-3), then TP inside the node, never across it
    big = plan(Job("70B", 70e9, 80, 8192, 64, 4096, GB80, 8, 8, 1024))
    assert big.zero3 and 1 < big.tp <= 8 and big.dp * big.pp * big.cp * big.tp == 64
    assert big.memory_gib() <= 0.9 * GB80
    # a sequence too long for one GPU's activations, even with TP across the node: context parallelism
    long = plan(Job("video", 13e9, 40, 5120, 40, 262144, H200, 8, 4, 32))
    assert long.cp > 1 and long.tp * long.cp * long.pp * long.dp == 32 and long.memory_gib() <= 0.9 * H200
