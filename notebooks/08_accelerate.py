# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Hugging Face Accelerate: one script, any hardware, the same loss
#
# **The idea.** Chapters 06 and 07 changed *how the model is wrapped*; the training loop stayed the project's. Hugging
# Face Accelerate turns this around: you keep writing your own loop, and one object, `Accelerator`, makes it run on one
# CPU, many CPUs (gloo), one GPU, many GPUs (NCCL, data parallelism 数据并行), with mixed precision (混合精度) or under
# DeepSpeed, chosen by how you *launch* it, not by the code:
#
#     python launchers/accelerate.py --config configs/tiny.yaml                                    # one device
#     torchrun --nproc_per_node 2 launchers/accelerate.py --config configs/tiny.yaml --device cpu   # 2 CPU processes
#     accelerate launch --num_processes 2 launchers/accelerate.py --config configs/mnist.yaml       # 2 GPUs
#     accelerate launch --config_file configs/accelerate_zero2.yaml launchers/accelerate.py        # DeepSpeed ZeRO-2
#
# Accelerate owns the data loader, so this chapter has one extra job: make the loader still deliver the determinism
# contract (each process its slice of the same global batch), or parity is lost.

# %%
import os, json, inspect, difflib
import torch
import matplotlib.pyplot as plt
from IPython.display import HTML
from dit_core.parity import run_launcher, run_launchers, run_here, parity, format_table
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--overwrite"]   # the /tmp/ch08 folders are scratch: a re-run replaces them
os.chdir("..")  # launchers are run from the repository root


# %% [markdown]
# ## 1. The diff: the project's loop and the Accelerate loop, side by side
#
# Left: the loop inside `dit_core.train.train`, which every other launcher (`single.py`, `ddp.py`, `zero.py`,
# `ulysses.py`) calls. Right: the loop of `launchers/accelerate.py`. Both train the same DiT on the same batches.

# %%
def between(path, start, stop):
    lines = open(path).read().splitlines()
    i = next(n for n, l in enumerate(lines) if start in l)
    j = next(n for n, l in enumerate(lines) if n > i and stop in l)
    return [l[4:] for l in lines[i:j]]

ours = between("dit_core/train.py", "for step in range(start, end):", "out.seconds =")
theirs = between("launchers/accelerate.py", "for x0, y, tt, noise, drop in loader:", "if logger is not None:")
HTML(difflib.HtmlDiff(wrapcolumn=70).make_table(ours, theirs, "dit_core/train.py (loop)", "launchers/accelerate.py (loop)"))

# %% [markdown]
# **What to notice.** The steps correspond: batch, micro-steps, forward and loss, backward, clip, step, EMA, the
# all-ranks mean of the loss for the log, checkpoint. Where the project calls `engine.run_step` (forward, loss and
# backward of every micro-batch, inside it), `engine.step` (clip and step) and `strategy.all_reduce_mean`, Accelerate has
# `accelerator.accumulate`/`accelerator.backward`, `clip_grad_norm_`/`optimizer.step`, and `accelerator.reduce`. The
# batch is no longer computed from the step in the loop: it comes out of a data loader that
# Accelerate has prepared.
#
# ## 2. What `prepare` does to each object
#
# Here in one process (the notebook): the same four objects the launcher prepares.

# %%
from torch.utils.data import DataLoader
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from dit_core.batch import GlobalBatchStream, stack_samples, global_batch, shard
from dit_core.config import load_config
from dit_core.data import load_mnist
from dit_core.model import DiT
from dit_core.train import build_optimizer

cfg = load_config("configs/tiny.yaml", {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2})
data = load_mnist("train", subset=2048)
acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
model = DiT(cfg.model)
opt, sched = build_optimizer(model, cfg, torch.device("cpu"))
loader = DataLoader(GlobalBatchStream(0, 16, 4, data, 1000, 0.1, (1, 28, 28), 1, 1), batch_size=16, collate_fn=stack_samples)
before = [type(o).__name__ for o in (model, opt, loader, sched)]
prepared = acc.prepare(model, opt, loader, sched)
for name, b, o in zip(("model", "optimizer", "data loader", "scheduler"), before, prepared):
    print(f"{name:12s} {b:22s} -> {type(o).__name__}")

# %% [markdown]
# In this one process `cpu=True` changes nothing about the number of processes: the distributed type is `NO`, the
# device is the CPU, and there is one process. Section 6 starts two.

# %%
# NBVAL_CHECK_OUTPUT
from accelerate.utils import DistributedType
from accelerate.state import AcceleratorState, GradientState
print("distributed_type:", acc.distributed_type.value, "| device:", acc.device, "| num_processes:", acc.num_processes)
print("one process with cpu=True is NO, on the CPU, 1 process:",
      acc.distributed_type == DistributedType.NO and acc.device.type == "cpu" and acc.num_processes == 1)
# An Accelerator's state is one shared object per process (AcceleratorState is a singleton): clear it, so nothing
# below meets this one.
del acc, prepared
AcceleratorState._reset_state(True); GradientState._reset_state()

# %% [markdown]
# | object | after `prepare` | on N processes |
# |---|---|---|
# | model | moved to the device; wrapped in `DistributedDataParallel` when N > 1; forward runs under autocast for bf16/fp16 | gradients all-reduced in backward, as in chapter 06 |
# | optimizer | `AcceleratedOptimizer`: `step()` is skipped on micro-steps that do not sync, and when fp16 overflowed | each process steps its full copy |
# | data loader | `DataLoaderShard` over a sharded batch sampler; batches moved to the device | **each process gets a different part**: see below |
# | scheduler | `AcceleratedScheduler`: steps only when the optimizer really stepped | **steps N times per call unless `split_batches=True`** |
#
# ## 3. Keeping the determinism contract through `prepare`
#
# Accelerate shards a data loader in one of two ways. With `split_batches=False` (the default) every process draws
# *whole* batches: process 0 gets batches 0, 2, 4, ..., process 1 gets 1, 3, 5, ... So one optimizer step of two
# processes sees *two* loader batches, and Accelerate compensates by stepping the learning-rate scheduler N times per
# call. With `split_batches=True` each loader batch is the *global* batch, cut into N contiguous pieces. Which
# indices does each process get? Ask Accelerate's own batch sampler:

# %%
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler
base = BatchSampler(SequentialSampler(range(32)), batch_size=8, drop_last=False)
for split in (False, True):
    print(f"split_batches={split}:")
    for r in range(2):
        print(f"   process {r}:", [b for b in BatchSamplerShard(base, num_processes=2, process_index=r, split_batches=split)])

# %% [markdown]
# `launchers/accelerate.py` chooses `split_batches=True` and a loader whose batch is one micro-step of *all*
# processes (B/accumulation samples). `GlobalBatchStream` orders the samples so that piece r of micro-batch m is exactly
# `shard(global_batch(step), r, N, m, accumulation)`, the slice `ddp.py` trains on. The check, for N = 2 and
# accumulation (梯度累积) 2:

# %%
# NBVAL_CHECK_OUTPUT
B, N, A = 16, 2, 2
stream = GlobalBatchStream(0, B, 3, data, 1000, 0.1, (1, 28, 28), N, A)
ok = True
for n, (x0, y, t, noise, drop) in enumerate(DataLoader(stream, batch_size=B // A, collate_fn=stack_samples)):
    step, micro = divmod(n, A)
    gb = global_batch(0, step, B, len(data), 1000, 0.1, (1, 28, 28))
    for r in range(N):
        piece = slice(r * B // (N * A), (r + 1) * B // (N * A))
        ok &= torch.equal(noise[piece], shard(gb, r, N, micro, A).noise)
print("every process's piece of every micro-batch == its shard of the global batch:", ok)

# %% [markdown]
# ## 4. The proof: the same loss, three ways to launch
#
# Single process (`launchers/single.py`) against `launchers/accelerate.py` under `torchrun` (2 CPU processes, gloo),
# with gradient accumulation 1 and 2, and under `accelerate launch --config_file configs/accelerate_zero2.yaml`
# (DeepSpeed ZeRO-2, chapter 07's engine, chosen by the config file alone; the script is unchanged).

# %%
# (the single-process references run in this kernel, run_here: launchers/single.py's config and train call, one
# thread, bitwise the subprocess; the Accelerate runs each get their own launch: an Accelerator holds state for
# the whole process)
single = run_here("launchers/single.py", [SMALL + ["--grad-accum", str(a), "--results-dir", f"/tmp/ch08/s{a}"]
                                               for a in (1, 2)])
runs = {}
for a in (1, 2):
    extra = ["--set", f"train.grad_accum={a}"]
    runs[("single", a)] = single[a - 1]
    runs[("accelerate, torchrun x2", a)] = run_launcher("launchers/accelerate.py", SMALL + extra + ["--results-dir", f"/tmp/ch08/t{a}"], nproc=2)
runs[("accelerate + ZeRO-2 x2", 2)] = run_launcher("launchers/accelerate.py", SMALL + ["--set", "train.grad_accum=2", "--results-dir", "/tmp/ch08/z"],
                                                   nproc=2, launcher="accelerate", launch_args=["--config_file", "configs/accelerate_zero2.yaml"])
print(format_table(runs[("single", 1)], runs[("accelerate, torchrun x2", 1)], "single", "accelerate", limit=6))

# %% [markdown]
# The tolerance comes from the tolerance ladder (容差阶梯, `dit_core.parity.LADDER`, chapter 04). All these runs are
# fp32, and only the order of the sums changes (two halves all-reduced, two micro-batches accumulated, or ZeRO-2's
# reduce-scatter, against one sum over 16 samples), so the rung is "sum order (fp32)", `SUM_ORDER`. `parity` holds
# each run to it at every step on two numbers: the loss and the gradient norm before clipping (the norm
# `accelerator.clip_grad_norm_` returns; under DeepSpeed, the norm DeepSpeed took when it clipped).

# %%
# NBVAL_CHECK_OUTPUT
from dit_core.parity import LADDER, SUM_ORDER
rung = next(k for k, v in LADDER.items() if v == SUM_ORDER)
verdict = {(name, a): parity(runs[("single", a)], log, SUM_ORDER) for (name, a), log in runs.items() if name != "single"}
for (name, a), v in verdict.items():
    ref, log = runs[("single", a)], runs[(name, a)]
    print(f"{name:24s} accumulation {a}: loss and gradient norm within the {rung!r} rung ({SUM_ORDER:.0e}): "
          f"{'PASS' if v.ok else 'FAIL'}, same learning rates: {[x['lr'] for x in log] == [x['lr'] for x in ref]}")

# %%
for (name, a), v in verdict.items():      # the measured maxima (this 2-core CPU, gloo)
    print(f"{name:24s} accumulation {a}: {v}")
parity_curves(runs[("single", 2)], runs[("accelerate + ZeRO-2 x2", 2)], names=("single process", "Accelerate + DeepSpeed ZeRO-2, 2 processes"));

# %% [markdown]
# **What to notice.** All three match to float rounding, the loss and the gradient norm alike (at most 2.0e-7, far
# inside the rung), and the learning rates are identical step by step: the scheduler stepped once per optimizer step (the `split_batches=True` branch of
# `AcceleratedScheduler.step`).
#
# ## 5. The same script under DeepSpeed, by config alone

# %%
print(open("configs/accelerate_zero2.yaml").read())

# %% [markdown]
# Five things this chapter had to choose, each one a way a correct-looking Accelerate script loses parity or breaks:
#
# 1. **`split_batches=True`**, with a loader of global micro-batches, so each process gets its contiguous slice and
#    the scheduler steps once per step (section 3).
# 2. **`cpu=True` on a CPU-only machine.** Started by `torchrun` without it, Accelerate finds no GPU and sets the
#    distributed type to `NO`: every process calls itself process 0 of 1, trains alone on the whole batch, and nothing
#    is all-reduced (section 6 shows it in a real 2-process job). The launcher
#    passes `cpu=True` whenever the device is the CPU (and, for DeepSpeed on a CPU, names the gloo backend instead,
#    because Accelerate only starts DeepSpeed when `cpu=False`).
# 3. **Accumulation as a `GradientAccumulationPlugin`.** The plain `gradient_accumulation_steps=` argument is
#    silently replaced by the value `accelerate launch` exports from its config file.
# 4. **DeepSpeed's clipping.** A config value of `auto` is filled by Accelerate with 1.0, whatever the script
#    clips at; the launcher fills `auto` from the project config and stops, in one sentence, if a number disagrees.
#    Under DeepSpeed, `accelerator.backward` already clipped and stepped, so `clip_grad_norm_` returns that step's
#    norm (it is logged, not applied twice).
# 5. **The file name.** A script called `accelerate.py` is first on `sys.path` and shadows the `accelerate` package;
#    the launcher removes its own folder from the path before importing it. (Accelerate's DeepSpeed plugin also
#    imports `transformers`, so the project's `accelerate` extra installs it.)
#
# Resume is exact: `accelerator.save_state` stores model, optimizer, scheduler, RNG states and the registered EMA and
# step counter; `load_state` plus `skip_first_batches` continues bit for bit (proved in `tests/test_accelerate.py`,
# not run here). The
# checkpoint folder also holds the project's plain `model.pt` and `ema.pt`, so `python -m dit_core.evaluate` reads it
# like any other.

# %% [markdown]
# ## 6. Inside a launched job: `cpu=True`, and two bugs of the seed course's tutorial
#
# The Accelerate tutorial of the seed course (the course this workbook grew from) has two bugs that show only with
# more than one process:
#
# **(a) `mp.spawn` and a manual `dist.init_process_group` beside `Accelerator()`.** The tutorial wraps its training
# function in `torch.multiprocessing.spawn` (`mp.spawn`), calls `init_process_group` itself, builds `Accelerator()`,
# and is started with `accelerate launch`. That does the same job twice. The launcher has *already* started the N
# processes and given each its `RANK` and `WORLD_SIZE`; `mp.spawn(nprocs=N)` in each of them starts N more, N x N
# workers for N devices. And `Accelerator()` makes the process group (进程组) itself, from the launcher's variables: a
# manual init after it is a second init of the default group, which torch refuses; a manual init before it wins (an
# Accelerator reuses a group that exists), so the ranks and world size are the tutorial's spawn numbers, not the
# launcher's. **The fix:** no `mp.spawn`, no `init_process_group`. Write a plain `main()` that builds `Accelerator()`
# first, read the rank and world from `accelerator.process_index` and `accelerator.num_processes`, and start it with
# `accelerate launch --num_processes N script.py` (or `torchrun --nproc_per_node N`). That is what
# `launchers/accelerate.py` does.
#
# **(b) Accuracy as `correct / len(dataset)` over a prepared loader.** After `prepare`, each process's loader gives
# only its shard of the test set, so each process counts only its shard's right answers, then divides by the size of
# the *whole* set: on a large test set every rank reports about 1/N of the accuracy. Gathering the predictions with
# `accelerator.gather` is not enough either. To give every process the same number of batches, Accelerate pads the last batch with
# samples from the start of the set (`even_batches=True`, the default), and those would be counted twice.
# **The fix:** `accelerator.gather_for_metrics`, called inside the loop: it gathers every process's predictions and
# labels and drops the padded repeats from the last batch.
#
# One launch of 2 CPU processes (`torchrun`, gloo) answers everything at once, because starting the processes costs
# more than all the checks together. The script is written here, then started. Its data set is tiny on purpose: 10
# samples in batches of 3 give 4 batches, so with 2 processes the last batch is padded.

# %%
import subprocess, sys, textwrap, importlib.util
from fractions import Fraction
os.makedirs("/tmp/ch08", exist_ok=True)
PROBE = textwrap.dedent('''
    """What Accelerate sees inside a torchrun job of 2 CPU processes, and one accuracy computed four ways."""
    import json, os, sys
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    def fake_set():
        """10 samples, 3 classes; the labels are a fixed model's own answers with 3 of them changed: 7 of 10 right."""
        torch.manual_seed(0)
        model, x = torch.nn.Linear(4, 3), torch.randn(10, 4)
        with torch.no_grad():
            y = model(x).argmax(1)
        y[[2, 5, 9]] = (y[[2, 5, 9]] + 1) % 3
        return model, TensorDataset(x, y)

    def right(p, y):
        return int((p == y).sum())

    def add(pair, p, y):                               # [right, seen] += this batch
        return [pair[0] + right(p, y), pair[1] + len(y)]

    if __name__ == "__main__":
        import torch.distributed as dist
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        seen = {"launcher": [int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])],   # set before our code ran
                "group before": dist.is_initialized()}                                  # torchrun makes none
        acc = Accelerator(cpu=True)
        seen["group"] = [dist.is_initialized(), dist.get_world_size()]                   # made by Accelerator()
        try:                                           # bug (a): the tutorial's manual init, now a second one
            dist.init_process_group("gloo")
            seen["second init"] = "accepted"
        except (RuntimeError, ValueError) as e:
            seen["second init"] = type(e).__name__
        model, data = fake_set()
        loader = acc.prepare(DataLoader(data, batch_size=3))   # (the model needs no DDP to be evaluated)
        buggy, gathered, metrics, answers = 0, [0, 0], [0, 0], []
        with torch.no_grad():
            for x, y in loader:                        # this process's shard: 2 batches of 3
                p = model(x).argmax(1)
                buggy += right(p, y)                   # bug (b): this shard's right answers ...
                gathered = add(gathered, *acc.gather((p, y)))             # every process's, repeats included
                metrics = add(metrics, *acc.gather_for_metrics((p, y)))   # the fix: repeats dropped
                answers.append((p, y))
        late = [0, 0]
        for p, y in answers:                           # the fix called after the loop: it no longer knows the end
            late = add(late, *acc.gather_for_metrics((p, y)))
        seen["cpu=True"] = {"type": acc.distributed_type.value, "num_processes": acc.num_processes,
                            "process_index": acc.process_index, "samples": sum(len(y) for _, y in loader),
                            "reduce": int(acc.reduce(torch.tensor(acc.process_index + 1), "sum"))}   # 1 + 2
        seen["accuracy"] = {"buggy": [buggy, len(loader.dataset)],   # ... over the size of the whole set
                            "gather": gathered, "gather_for_metrics": metrics, "gather_for_metrics after": late}
        # The same calls without cpu=True: a fresh Accelerator (its state is one shared object per process)
        AcceleratorState._reset_state(True); GradientState._reset_state()
        acc = Accelerator(cpu=False)
        loader = acc.prepare(DataLoader(data, batch_size=3))
        rank = dist.get_rank()                         # the group is there; Accelerate does not use it
        seen["cpu=False"] = {"type": acc.distributed_type.value, "num_processes": acc.num_processes,
                             "process_index": acc.process_index, "samples": sum(len(y) for _, y in loader),
                             "reduce": int(acc.reduce(torch.tensor(rank + 1), "sum"))}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, seen)
        if dist.get_rank() == 0:
            json.dump(everyone, open(sys.argv[1], "w"), indent=1)
        dist.destroy_process_group()
''')
open("/tmp/ch08/probe.py", "w").write(PROBE)
r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "/tmp/ch08/probe.py", "/tmp/ch08/probe.json"], capture_output=True, text=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
assert r.returncode == 0, r.stderr[-3000:]
ranks = json.load(open("/tmp/ch08/probe.json"))

# The truth: the same model on the whole set, in this one process, without Accelerate.
spec = importlib.util.spec_from_file_location("probe", "/tmp/ch08/probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
net, testset = probe.fake_set()
with torch.no_grad():
    truth = [probe.right(net(testset.tensors[0]).argmax(1), testset.tensors[1]), len(testset)]

for cpu in ("cpu=False", "cpu=True"):
    for rank, s in enumerate(ranks):
        v = s[cpu]
        print(f"torchrun x2, {cpu:9s} rank {rank}: {v['type']:9s} process {v['process_index']} of {v['num_processes']}, "
              f"{v['samples']:2d} samples from the loader, reduce(rank + 1, sum) = {v['reduce']}")
frac = lambda pair: f"{pair[0]}/{pair[1]} = {pair[0] / pair[1]:.2f}"
print(f"\naccuracy, one process, no Accelerate (the truth): {frac(truth)}")
for rank, s in enumerate(ranks):
    print(f"rank {rank}: " + " | ".join(f"{k} {frac(v)}" for k, v in s["accuracy"].items()))

# %%
# NBVAL_CHECK_OUTPUT
on, off = [s["cpu=True"] for s in ranks], [s["cpu=False"] for s in ranks]
acc_of = lambda s, k: Fraction(*s["accuracy"][k])
print("cpu=True : MULTI_CPU on both ranks, processes 0 and 1 of 2, the loader sharded, reduce sums over both:",
      all(v["type"] == "MULTI_CPU" and v["num_processes"] == 2 and v["reduce"] == 3 for v in on)
      and [v["process_index"] for v in on] == [0, 1] and sum(v["samples"] for v in on) == 12)
print("cpu=False: NO on both ranks, each 'process 0 of 1', every sample on each rank, reduce a no-op:",
      all(v["type"] == "NO" and v["num_processes"] == 1 and v["process_index"] == 0 and v["samples"] == len(testset)
          for v in off) and [v["reduce"] for v in off] == [1, 2])
print("(a) the launcher set RANK and WORLD_SIZE, Accelerator() made the group of 2, a second init is refused:",
      [s["launcher"] for s in ranks] == [[0, 2], [1, 2]] and all(not s["group before"] and s["group"] == [True, 2] for s in ranks)
      and all(s["second init"] == "ValueError" for s in ranks))
print("(b) buggy correct / len(dataset) != the truth, on every rank:", all(acc_of(s, "buggy") != Fraction(*truth) for s in ranks))
print("    gather alone counts the 2 padded repeats (12 samples) and != the truth:",
      all(s["accuracy"]["gather"][1] == 12 and acc_of(s, "gather") != Fraction(*truth) for s in ranks))
print("    gather_for_metrics after the loop keeps the repeats too:",
      all(s["accuracy"]["gather_for_metrics after"][1] == 12 for s in ranks))
print("    fixed: gather_for_metrics inside the loop == the truth (10 samples), on every rank:",
      all(s["accuracy"]["gather_for_metrics"] == truth for s in ranks))

# %% [markdown]
# **Notice:** without `cpu=True` both processes call themselves process 0 of 1, each reads all 10 samples, and
# `accelerator.reduce` hands each its own number back (1 and 2, not their sum 3): two independent trainings, not one.
# With it, the two halves plus 2 padded repeats make 12 samples, and the reduce sums over both. The buggy accuracy
# is 0.50 on rank 0 and 0.40 on rank 1, against a truth of 0.70; even their sum (0.90) is wrong, because samples 0
# and 1 are counted twice. `gather_for_metrics` gives 7/10 on every rank, but only inside the loop: after it, the
# loader is finished, Accelerate no longer knows which batch was the last, and nothing is dropped.

# %% [markdown]
# ## On two GPUs
#
# Measured once with the project's own tool on 2 x H200 of one host (NVLink), at commit 406e6c2, 2026-11-24
# (`docs/measurements/2xh200-2026-11-24/`; a shared machine, so read the times as ratios inside one log).
# `NPROC=2 bash tools/gpu_accelerate.sh OUT`: `accelerate launch --num_processes 2 launchers/accelerate.py`
# (MULTI_GPU) against one GPU, fp32, 30 steps: max relative loss difference 1.20e-7, inside the same sum-order rung
# (that tool compared the loss only; the gradient norm was not compared on the GPUs).
# 300 bf16 steps at `configs/mnist.yaml`: Accelerate 15.7 s and 15.0 s, `launchers/ddp.py --impl torch` 15.4 s and
# 15.3 s (two rounds).
# The same speed, as it should be: Accelerate wraps the model in the same torch DDP.

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** `python launchers/accelerate.py --config configs/tiny.yaml --device cpu --max-steps 20` against `python launchers/single.py` with the same flags: what max relative difference do you expect, and would it be the same under `torchrun --nproc_per_node 2`?
# 2. **Break it.** Start 3 processes (`torchrun --nproc_per_node 3 launchers/accelerate.py --device cpu --config configs/tiny.yaml --global-batch-size 16`). Predict the outcome.
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-08).

# %% [markdown]
# ## 中文要点
#
# Accelerate：同一份训练脚本，单卡、多卡、DeepSpeed 都能跑，只需换启动命令或配置文件。
#
# `prepare` 会包装模型、优化器和数据加载器；本章说明怎样在 `prepare` 之后仍然保持全局批次不变（确定性约定）。
#
# 三种启动方式与单进程相比，每一步的损失和裁剪前的梯度范数都在容差阶梯的“求和顺序”一级 `SUM_ORDER`（1e-5）之内（CPU 上实测约 1e-7 到 2e-7）；只改配置文件就能切换到 DeepSpeed ZeRO-2。两张 H200 上，它与 torch DDP 速度相同，因为底层就是同一个 DDP。
#
# 纯 CPU 机器上用 `torchrun` 启动时必须写 `Accelerator(cpu=True)`（分布式类型 `MULTI_CPU`）；不写的话每个进程都以为自己是唯一的进程（`DistributedType.NO`），各自独立训练。
#
# 种子课程教程的两个错误：其一，`accelerate launch` 已经启动了进程、`Accelerator()` 已经建立了进程组，不要再用 `mp.spawn` 和手动 `init_process_group`；其二，评估时用本进程的正确数除以整个数据集大小，只得到约 1/N 的准确率，应在循环内用 `accelerator.gather_for_metrics` 汇总各进程的预测，它还会去掉为凑齐最后一批而重复的样本。
