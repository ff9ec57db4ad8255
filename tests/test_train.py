import json
import os

import pytest
import torch

from dit_core.config import ConfigError
from dit_core.parity import read_jsonl
from dit_core.checkpoint import CheckpointError, model_from_checkpoint
from dit_core.train import lr_factor, train


def losses(path):
    return [r["loss"] for r in read_jsonl(path)]


def test_log_has_the_contract_keys(micro_cfg, tmp_path):
    cfg = micro_cfg(train__max_steps=3)
    res = train(cfg, quiet=True)
    rows = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"step", "loss", "grad_norm", "lr", "samples_seen"}
    assert rows[-1]["samples_seen"] == 48 and res.last_checkpoint.name == "checkpoint-3"
    assert sorted(os.listdir(res.last_checkpoint)) == ["ema.pt", "manifest.json", "model.pt", "optimizer.pt",
                                                        "training_state.json"]
    # no temporary leftovers; .lock is the folder's lock file (dit_core.rundir), released, kept
    assert [p for p in os.listdir(tmp_path / "run") if p.startswith(".")] == [".lock"]


def test_a_measurement_run_leaves_its_log_and_no_checkpoint(micro_cfg, tmp_path):
    res = train(micro_cfg(train__max_steps=3, run__save_final=False), quiet=True)
    assert res.last_checkpoint is None and len(read_jsonl(tmp_path / "run" / "log.jsonl")) == 3
    assert not [p for p in os.listdir(tmp_path / "run") if "checkpoint" in p]


def test_loss_goes_down(micro_cfg):
    res = train(micro_cfg(train__max_steps=60, train__lr=3e-3), quiet=True)
    first, last = sum(res.losses[:10]) / 10, sum(res.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_accumulation_2_logs_the_same_losses_as_1(micro_cfg, tmp_path):
    a = train(micro_cfg(train__max_steps=12, run__log_jsonl=str(tmp_path / "a1.jsonl"),
                        run__results_dir=str(tmp_path / "a1")), quiet=True)
    b = train(micro_cfg(train__max_steps=12, train__grad_accum=2, run__log_jsonl=str(tmp_path / "a2.jsonl"),
                        run__results_dir=str(tmp_path / "a2")), quiet=True)
    la, lb = torch.tensor(a.losses), torch.tensor(b.losses)
    assert len(la) == 12
    rel = ((la - lb).abs() / la.abs()).max().item()
    assert rel <= 1e-5, rel
    # a negative check: a different seed is a different run
    c = train(micro_cfg(train__max_steps=12, train__seed=1, run__results_dir=str(tmp_path / "c")), quiet=True)
    assert ((torch.tensor(c.losses) - la).abs() / la).max().item() > 1e-3


def test_resume_is_exact(micro_cfg, tmp_path):
    full = micro_cfg(train__max_steps=10, run__results_dir=str(tmp_path / "full"))
    train(full, quiet=True)
    half = micro_cfg(train__max_steps=10, run__results_dir=str(tmp_path / "half"))
    train(half, quiet=True, stop_at=5)            # a job stopped after 5 of its 10 steps
    resumed = micro_cfg(train__max_steps=10, run__results_dir=str(tmp_path / "half"),
                        run__resume=str(tmp_path / "half" / "checkpoint-5"))
    train(resumed, quiet=True)
    one_run = losses(tmp_path / "full" / "log.jsonl")
    two_runs = losses(tmp_path / "half" / "log.jsonl")          # truncated to step 5, then appended
    assert len(one_run) == len(two_runs) == 10
    assert one_run == two_runs                                  # bitwise
    a = torch.load(tmp_path / "full" / "checkpoint-10" / "ema.pt")
    b = torch.load(tmp_path / "half" / "checkpoint-10" / "ema.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_factor(55, 10, 100, 0.1) < 1.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(micro_cfg, precision):
    res = train(micro_cfg(train__max_steps=4, train__precision=precision), quiet=True)
    assert all(torch.isfinite(torch.tensor(res.losses)))


def test_bad_checkpoints_are_clear_errors(micro_cfg, tmp_path):
    res = train(micro_cfg(train__max_steps=2), quiet=True)
    ckpt = res.last_checkpoint
    with pytest.raises(CheckpointError, match="different model.*model.hidden_size: checkpoint 32 vs config 64"):
        train(micro_cfg(train__max_steps=4, model__hidden_size=64, run__resume=str(ckpt)), quiet=True)
    with pytest.raises(CheckpointError, match="not a folder"):
        train(micro_cfg(train__max_steps=4, run__resume=str(tmp_path / "nope")), quiet=True)
    with pytest.raises(ConfigError, match="past train.max_steps"):
        train(micro_cfg(train__max_steps=1, run__resume=str(ckpt)), quiet=True)
    data = (ckpt / "model.pt").read_bytes()
    (ckpt / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.pt' is not the file written with this checkpoint"):
        train(micro_cfg(train__max_steps=4, run__resume=str(ckpt)), quiet=True)
    (ckpt / "ema.pt").unlink()
    with pytest.raises(CheckpointError, match="lacks ema.pt, which its manifest lists"):
        model_from_checkpoint(ckpt)
    # a checkpoint written before manifests existed is read as before, and still refused when unreadable
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="lacks ema.pt"):
        model_from_checkpoint(ckpt)
    (ckpt / "ema.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(micro_cfg(train__max_steps=4, run__resume=str(ckpt)), quiet=True)


def test_model_from_checkpoint_rebuilds_the_ema_model(micro_cfg):
    res = train(micro_cfg(train__max_steps=3), quiet=True)
    model, cfg = model_from_checkpoint(res.last_checkpoint)
    assert cfg.model.hidden_size == 32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), res.ema.state_dict().values()))
    state = json.loads((res.last_checkpoint / "training_state.json").read_text())
    assert state["step"] == 3 and state["samples_seen"] == 48


def test_batch_not_divisible_by_world_and_accum_is_refused(micro_cfg):
    from dit_core.strategy import Strategy

    class Three(Strategy):
        world_size = 3

    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        train(micro_cfg(train__max_steps=1), strategy=Three(), quiet=True)
