"""Tensor parallelism with real processes: torchrun, gloo, on the CPU."""
import json

import pytest
import torch

from conftest import launcher_flags, run_py, single_runs, torchrun
from dit_core.config import ConfigError, load_config
from dit_core.diffusion import Diffusion
from dit_core.parallel.tensor import check_tensor_parallel
from dit_core.parity import compare, max_rel, run_launcher
from dit_core.train import model_from_checkpoint

STEPS = 20


def flags(**over):
    # 4 heads and an MLP of 128 split over 2 ranks; clipping at 0.05 acts at every step, so the
    # tensor-parallel gradient norm (slices summed over the group) is exercised too.
    return launcher_flags(STEPS, **{"model.num_heads": 4, "train.grad_clip": 0.05, **over})


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    return {acc: (log, d / f"a{acc}") for acc, log in single_runs(d, flags).items()}


def test_tensor_parallel_layers_equal_the_full_layers(tmp_path):
    out = tmp_path / "checks.json"
    r = torchrun("tests/tp_checks.py", [str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.loads(out.read_text())
    assert c["f_forward_is_identity"] and c["f_backward_sums"] and c["g_forward_sums"] and c["g_backward_is_identity"]
    assert c["mlp_worst"] <= 1e-5 and c["attention_worst"] <= 1e-5    # outputs, input and weight gradients
    assert c["block_weight_share"] == 0.5                             # each rank holds half of every block matrix
    assert c["gathered_equals_single"]                                # slices initialise to the single weights
    assert c["all_reduce_calls"] == 2 * 4                             # 2 blocks x (2 in forward + 2 in backward)
    assert c["all_reduce_bytes"] == c["formula_bytes"]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_sharing_every_layer_match_one_process(single, tmp_path, accum):
    log = run_launcher("launchers/tp.py", flags(**{"train.grad_accum": accum, "train.ckpt_every": STEPS // 2}) +
                       ["--tp-degree", "2", "--results-dir", str(tmp_path)], nproc=2)
    ref, ref_dir = single[accum]
    assert len(log) == STEPS and max_rel(compare(ref, log)) <= 1e-5
    assert max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(log, ref)) <= 1e-5
    # The checkpoint holds gathered, single-process weights: it loads as a plain DiT and samples the same digits.
    ours, cfg = model_from_checkpoint(tmp_path / f"checkpoint-{STEPS}")
    theirs, _ = model_from_checkpoint(ref_dir / f"checkpoint-{STEPS}")
    d = Diffusion(cfg.diffusion)
    labels = torch.arange(10)
    a = d.sample(ours, labels, cfg_scale=3.0, steps=10, seed=0)
    b = d.sample(theirs, labels, cfg_scale=3.0, steps=10, seed=0)
    assert (a - b).abs().max() <= 1e-4
    if accum == 1:
        # Resume from the step-10 checkpoint under the same layout: the same last 10 losses, bit for bit.
        # One process cannot resume it (its optimizer state is sliced per rank): one sentence says how.
        half, ckpt = STEPS // 2, tmp_path / f"checkpoint-{STEPS // 2}"
        again = run_launcher("launchers/tp.py", flags() + ["--tp-degree", "2", "--results-dir", str(tmp_path / "again"),
                                                           "--resume", str(ckpt)], nproc=2)
        assert [r["loss"] for r in again] == [r["loss"] for r in log[half:]]
        r = run_py(["launchers/single.py", *flags(), "--results-dir", str(tmp_path / "s"), "--resume", str(ckpt)])
        assert r.returncode == 2 and "written by launchers/tp.py (--tp-degree 2, 2 processes)" in r.stderr
        assert "torchrun --nproc_per_node 2 launchers/tp.py --tp-degree 2" in r.stderr


def test_tensor_parallel_layout_mismatch_is_one_sentence(tmp_path):
    from dit_core.parallel.tensor import check_tp_layout
    from dit_core.train import CheckpointError
    check_tp_layout(tmp_path, {"tp_degree": 2, "world_size": 4}, {"tp_degree": 2, "world_size": 4})
    with pytest.raises(CheckpointError, match=r"--tp-degree 2 on 2 processes, not 2 on 4.*--nproc_per_node 2"):
        check_tp_layout(tmp_path, {"tp_degree": 2, "world_size": 2}, {"tp_degree": 2, "world_size": 4})
    with pytest.raises(CheckpointError, match="without tensor parallelism"):
        check_tp_layout(tmp_path, {"step": 3}, {"tp_degree": 2, "world_size": 2})


def test_dp2_x_tp2_matches_one_process(single, tmp_path):
    log = run_launcher("launchers/tp.py", flags() + ["--tp-degree", "2", "--results-dir", str(tmp_path)], nproc=4)
    assert max_rel(compare(single[1][0], log)) <= 1e-5


@pytest.mark.parametrize("over,degree,world,expect", [
    ({"model.num_heads": 3, "model.hidden_size": 48}, 2, 2, "model.num_heads=3 is not divisible by --tp-degree 2"),
    ({"model.hidden_size": 60, "model.num_heads": 2, "model.mlp_ratio": 1.05}, 2, 2,
     "the MLP's hidden width 63 (model.hidden_size x model.mlp_ratio) is not divisible by --tp-degree 2"),
    ({}, 2, 3, "world size 3 is not divisible by --tp-degree 2"),
])
def test_layout_checks(over, degree, world, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        check_tensor_parallel(load_config("configs/tiny.yaml", over).model, degree, world)
