"""The one-GPU fast path (dit_core.fast, train.fast) and the benchmark, checked on the CPU.

What a CPU can prove: the device-drawn batches keep the contract's promises (a pure function of
(seed, step), every image once per epoch), the fast loop's arithmetic is the reference loop's (only
the batch source differs), losses read back in groups are the same numbers, resume stays exact, and
the benchmark's rows run. CUDA graphs and compile speed are measured on a GPU (docs/results.md).
"""
import json

import pytest
import torch

import dit_core.train as train_mod
from dit_core.config import ConfigError
from dit_core.data import load_mnist
from dit_core.fast import DeviceBatches, fast_enabled
from dit_core.parity import read_jsonl
from dit_core.strategy import Strategy, TrainHooks
from dit_core.train import train

from conftest import run_py


@pytest.fixture(scope="module")
def small():
    return load_mnist("train", "cpu", subset=100)


def test_device_batches_are_a_pure_function_of_seed_and_step(small):
    a = DeviceBatches(small, seed=3, batch_size=32, timesteps=1000, label_dropout=0.1)
    b = DeviceBatches(small, seed=3, batch_size=32, timesteps=1000, label_dropout=0.1)
    late = b(7)                                  # drawn out of order, after another epoch's permutation
    for step in (0, 7):
        x, y = a(step), (late if step == 7 else b(step))
        for f in ("indices", "t", "noise", "drop"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f
    other = DeviceBatches(small, seed=4, batch_size=32, timesteps=1000, label_dropout=0.1)
    assert not torch.equal(a(0).noise, other(0).noise)
    assert not torch.equal(a(0).noise, a(1).noise)


def test_device_batches_see_every_image_once_per_epoch(small):
    d = DeviceBatches(small, seed=0, batch_size=40, timesteps=1000, label_dropout=0.1)
    stream = torch.cat([d(s).indices for s in range(5)])        # 200 = two epochs of 100, batches span them
    for epoch in (stream[:100], stream[100:]):
        assert sorted(epoch.tolist()) == list(range(100))
    assert not torch.equal(stream[:100], stream[100:])            # a new permutation each epoch
    b = d(0)
    assert b.t.min() >= 0 and b.t.max() < 1000 and b.noise.shape == (40, 1, 28, 28) and b.drop.dtype == torch.bool


def test_fast_path_is_on_only_for_one_process_on_a_gpu_in_mixed_precision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fast_enabled("auto", cuda, True, "bf16")
    assert not fast_enabled("auto", cuda, True, "fp32")      # fp32 runs are the parity proofs: the contract
    assert not fast_enabled("auto", cuda, False, "bf16")     # a parallel strategy, even on one process
    assert not fast_enabled("auto", cpu, True, "bf16")
    assert fast_enabled("on", cpu, True, "fp32") and not fast_enabled("off", cuda, True, "bf16")


def test_fast_on_with_a_parallel_strategy_is_refused(micro_cfg):
    class TwoRanks(Strategy):          # what every strategy of dit_core.parallel says (DistStrategy)
        world_size, one_process = 2, False
    with pytest.raises(ConfigError, match="one-process path.*--fast off"):
        train(micro_cfg(train__fast="on", train__max_steps=1), strategy=TwoRanks(), quiet=True)


class CountReads(TrainHooks):
    def __init__(self):
        self.groups = []

    def logged(self, records, ema, seconds):
        self.groups.append([r["step"] for r in records])


def test_fast_loop_is_the_reference_loop_but_for_the_batches(micro_cfg, tmp_path, monkeypatch):
    """Feed the fast loop the contract's batches: every logged number equals the reference run's,
    although the fast loop reads its losses back 4 steps at a time."""
    ref = train(micro_cfg(train__max_steps=10, train__fast="off", run__results_dir=str(tmp_path / "ref")),
                quiet=True)

    class ContractAsDevice:
        def __init__(self, data, seed, batch_size, timesteps, label_dropout, shape):
            self.n, self.args = len(data), (seed, batch_size, timesteps, label_dropout, shape)

        def __call__(self, step):
            seed, B, T, p, shape = self.args
            return train_mod.global_batch(seed, step, B, self.n, T, p, shape)

    monkeypatch.setattr(train_mod, "DeviceBatches", ContractAsDevice)
    hooks = CountReads()
    cfg = micro_cfg(train__max_steps=10, train__fast="on", train__compile_mode="none", train__log_every=4,
                    run__results_dir=str(tmp_path / "fast"))
    fast = train(cfg, quiet=True, hooks=hooks)
    assert hooks.groups == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]    # one wait for the GPU per group
    a, b = read_jsonl(tmp_path / "ref" / "log.jsonl"), read_jsonl(tmp_path / "fast" / "log.jsonl")
    assert [r["step"] for r in b] == list(range(10))                 # still one record per step
    for x, y in zip(a, b):
        assert x == y
    for e, f in zip(ref.ema.module.parameters(), fast.ema.module.parameters()):
        assert torch.equal(e, f)


def test_fast_path_trains_and_resumes_exactly(micro_cfg, tmp_path):
    base = {"train__fast": "on", "train__compile_mode": "none", "train__log_every": 3}
    full = train(micro_cfg(train__max_steps=8, run__results_dir=str(tmp_path / "full"), **base), quiet=True)
    train(micro_cfg(train__max_steps=8, run__results_dir=str(tmp_path / "part"), **base), quiet=True, stop_at=5)
    resumed = train(micro_cfg(train__max_steps=8, run__results_dir=str(tmp_path / "part"),
                              run__resume=str(tmp_path / "part" / "checkpoint-5"), **base), quiet=True)
    assert resumed.losses == full.losses[5:]
    contract = train(micro_cfg(train__max_steps=8, run__results_dir=str(tmp_path / "c"), train__fast="off"),
                     quiet=True)
    assert contract.losses != full.losses                       # other batches: the fast path is not the contract


def test_classifier_trains_on_given_images(small):
    from dit_core.evaluate import train_classifier
    data = load_mnist("train", "cpu", subset=3000)
    x, y = data.gather(torch.arange(3000))
    _, acc = train_classifier("cpu", epochs=2, verbose=False, images=x, labels=y)
    assert 0.5 < acc <= 1.0                  # real digits as the "generated" set: well above chance


def test_bench_runs_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    r = run_py(["-m", "dit_core.bench", "--quick", "--device", "cpu", "--config", "configs/tiny.yaml",
                "--rows", "ladder,project", "--ladder-batch", "32", "--json", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = [row["name"] for row in rows]
    assert names[:4] == ["course loop", "+ data on GPU", "+ bf16", "+ fused AdamW"]
    assert any(n.startswith("project, fast path") for n in names) and any("fast off" in n for n in names)
    assert all(row["images_per_s"] > 0 and row["steps"] == 3 for row in rows)
    assert "course loop" in r.stdout and "x course" in r.stdout
