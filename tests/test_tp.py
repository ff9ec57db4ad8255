"""Tensor parallelism with real processes: torchrun, gloo, on the CPU."""
import json

import pytest
import torch

from conftest import PARITY_STEPS as STEPS
from conftest import assert_parity, declare, job_dir, load_launcher, parity_flags, torchrun
from dit_core.checkpoint import CheckpointError, model_from_checkpoint
from dit_core.config import ConfigError, load_config
from dit_core.diffusion import Diffusion
from dit_core.parallel.tensor import check_tensor_parallel

# parity_flags: 4 heads and an MLP of 128 split over 2 ranks; clipping at 0.05 acts at every step, so the
# tensor-parallel gradient norm (slices summed over the group) is exercised too.
flags = parity_flags


# TP 2 with accumulation 1 and 2 (checkpoints every 10 steps), then a resume of the first from its step-10
# checkpoint (the suite's 2-process job); DP 2 x TP 2 (its 4-process job).
D = job_dir() / "tp"
for a in (1, 2):
    declare(2, f"tp a{a}", "launchers/tp.py", flags(**{"train.grad_accum": a, "train.ckpt_every": STEPS // 2}) + [
        "--tp-degree", "2", "--results-dir", D / f"a{a}"])
declare(2, "tp again", "launchers/tp.py", flags() + ["--tp-degree", "2", "--results-dir", D / "again",
                                                     "--resume", D / "a1" / f"checkpoint-{STEPS // 2}"])
declare(4, "tp dp2", "launchers/tp.py", flags() + ["--tp-degree", "2", "--results-dir", D / "dp2"])


@pytest.fixture(scope="module")
def tp_runs(jobs):
    j = jobs(2)
    return {1: (j["tp a1"], D / "a1"), 2: (j["tp a2"], D / "a2"), "again": j["tp again"]}


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
def test_two_ranks_sharing_every_layer_match_one_process(tp_runs, reference, tmp_path, accum):
    log, run_dir = tp_runs[accum]
    ref, ref_dir = reference(accum)
    assert_parity(ref, log)
    # The checkpoint holds gathered, single-process weights: it loads as a plain DiT and samples the same digits.
    ours, cfg = model_from_checkpoint(run_dir / f"checkpoint-{STEPS}")
    theirs, _ = model_from_checkpoint(ref_dir / f"checkpoint-{STEPS}")
    d = Diffusion(cfg.diffusion)
    labels = torch.arange(10)
    a = d.sample(ours, labels, cfg_scale=3.0, steps=10, seed=0)
    b = d.sample(theirs, labels, cfg_scale=3.0, steps=10, seed=0)
    assert (a - b).abs().max() <= 1e-4
    if accum == 1:
        # Resume from the step-10 checkpoint under the same layout: the same last 10 losses, bit for bit.
        # One process cannot resume it (its optimizer state is sliced per rank): one sentence says how.
        half, ckpt = STEPS // 2, run_dir / f"checkpoint-{STEPS // 2}"
        assert_parity(log[half:], tp_runs["again"], rtol=0.0, steps=STEPS - half)
        with pytest.raises(CheckpointError) as e:
            load_launcher("single").main(flags() + ["--results-dir", str(tmp_path / "s"), "--resume", str(ckpt)])
        assert "written by a tensor-parallel run" in str(e.value)
        assert "torchrun --nproc_per_node 2 launchers/tp.py --tp-degree 2" in str(e.value)


def test_tensor_parallel_layout_mismatch_is_one_sentence(tmp_path):
    """The one layout check every rank-files engine shares (dit_core.engine.RankFilesEngine.check_layout), as the
    tensor-parallel engine fills it in: its layout is state_info(), here a DP 2 x TP 2 job's."""
    from dit_core.parallel.tensor import TensorParallelEngine
    engine = TensorParallelEngine.__new__(TensorParallelEngine)
    engine.state_info = lambda: {"tp_degree": 2, "world_size": 4}
    engine.check_layout(tmp_path, {"tp_degree": 2, "world_size": 4})
    with pytest.raises(CheckpointError, match=r"--tp-degree 2 on 2 processes, not --tp-degree 2 on 4 processes; its "
                                              r"optimizer state is sliced per rank: resume with torchrun "
                                              r"--nproc_per_node 2 launchers/tp.py --tp-degree 2 \(its model.pt"):
        engine.check_layout(tmp_path, {"tp_degree": 2, "world_size": 2})
    with pytest.raises(CheckpointError, match="written by a torch run, which launchers/tp.py cannot resume"):
        engine.check_layout(tmp_path, {"step": 3})


def test_dp2_x_tp2_matches_one_process(reference, jobs):
    assert_parity(reference(1)[0], jobs(4)["tp dp2"])


@pytest.mark.parametrize("over,degree,world,expect", [
    ({"model.num_heads": 3, "model.hidden_size": 48}, 2, 2, "model.num_heads=3 is not divisible by --tp-degree 2"),
    ({"model.hidden_size": 60, "model.num_heads": 2, "model.mlp_ratio": 1.05}, 2, 2,
     "the MLP's hidden width 63 (model.hidden_size x model.mlp_ratio) is not divisible by --tp-degree 2"),
    ({}, 2, 3, "world size 3 is not divisible by --tp-degree 2"),
])
def test_layout_checks(over, degree, world, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        check_tensor_parallel(load_config("configs/tiny.yaml", over).model, degree, world)
