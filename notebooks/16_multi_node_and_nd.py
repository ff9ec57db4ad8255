# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 16 · Many machines (多机多卡) and N-D parallelism (多维并行): one mesh of DP x PP x CP x TP
#
# **The idea.** Every chapter so far ran its processes on one machine. Two steps remain before a real job. First,
# **many machines**: the same script started once per machine (节点, a *node*), each told its node rank and the
# first machine's address. The processes find each other at a **rendezvous** (会合): a small key-value store on
# one machine where every rank leaves its address and reads the others'. Nothing in the training code changes. The
# ranks and the world size arrive in the environment, and `dit_core.parallel.dist.init_from_env` reads them.
# Second, **many axes at once**: real jobs combine the strategies of chapters 06-14. Megatron-LM's "3-D
# parallelism" (Narayanan et al., 2021) is data x pipeline x tensor; picotron and torchtitan add context
# parallelism for 4-D. The ranks form a **device mesh** (设备网格): a grid with one axis per strategy, and each
# rank takes part in one group along every axis.
#
# The code: `launchers/rendezvous.py` (a connectivity check for multi-machine launches), `dit_core/multinode.py`
# (the launch command of every launcher on machine R), `dit_core/parallel/nd.py` (~300 lines: the mesh, the
# strategy that composes the project's own tensor-parallel, context-parallel and pipeline pieces, and the checks)
# and `dit_core/parallel/plan.py` (which axes to use first):
#
#     torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT launchers/rendezvous.py
#     torchrun --nproc_per_node 8 launchers/nd.py --dp 2 --pp 2 --tp 2 --device cpu
#     torchrun --nproc_per_node 8 launchers/nd.py --pp 2 --cp 2 --tp 2 --device cpu

# %%
import os, json
import numpy as np
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch
from dit_core.multinode import run_nodes, command
from dit_core.parallel.nd import AXES, Layout, mesh_picture
from dit_core.parallel.plan import Job, plan, block_seconds, tp_seconds, cp_seconds, zero3_seconds, step_compute_seconds
from dit_core.parity import run_mixed, run_here, read_jsonl, compare, max_rel
from dit_core.plots import parity_curves

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 8 if SMOKE else 30
# The parity DiT of chapters 09-15: hidden 32, depth 2, 4 heads, 16 tokens at patch 7. Clipping at 0.05 is below
# its gradient norm (about 0.5): it acts at every step, so the gradient norm must be the whole model's at every step.
SMALL = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(STEPS), "--global-batch-size", "16",
         "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=4",
         "--set", "train.train_subset=2048", "--set", "train.warmup_steps=5", "--set", "train.tensorboard=false",
         "--set", "train.grad_clip=0.05",
         "--overwrite"]   # the /tmp/ch16 folders are scratch: a re-run replaces them
os.chdir("..")  # launchers are run from the repository root
os.makedirs("/tmp/ch16", exist_ok=True)

# %% [markdown]
# ## 1. The rendezvous: who waits for whom, and what the store holds
#
# On each machine one **agent** (the `torchrun` process) starts that machine's workers (one per GPU). There are two
# ways the agents meet:
#
# * **Elastic, `--rdzv-backend c10d --rdzv-endpoint HOST:PORT`.** The same command on every machine. The agent on the
#   machine named HOST hosts the store (the others connect to it); every agent registers there and **waits until `--nnodes` agents have
#   joined**, or `join_timeout` seconds have passed (600 by default). Then the rendezvous numbers the machines (their
#   *group rank*: you do not choose it), each agent computes its workers' global ranks, exports `RANK`, `WORLD_SIZE`,
#   `MASTER_ADDR`, `MASTER_PORT` and starts them.
# * **Static, `--node-rank R --master-addr HOST --master-port PORT`.** Machine 0 hosts the store on its own port, and
#   the others dial it until the rendezvous `timeout`. You number the machines yourself, and two machines given the
#   same number is an error you can make (docs/multinode.md says what it looks like).
#
# Then the workers meet again, inside `init_process_group`. Every rank writes its own address into the store
# (for gloo: the address and port its pairs listen on; for NCCL: rank 0 writes a unique id that the others read), and
# waits until it can read every other rank's. After that the store is used when new groups are created (each
# `new_group` meets there) and by the agents; collectives, `all_gather_object` included, go through gloo or NCCL,
# never through the store. `launchers/rendezvous.py` is a check to run before a real
# job. Each rank reports where it runs, one all-reduce of ones proves that every rank answers, and rank 0 lists the
# store's keys. Here it runs as two "machines" on this host (two torchrun agents over 127.0.0.1), with two workers
# each, once per rendezvous kind:

# %%
rdzv = {}
for kind in ("torchrun-c10d", "torchrun-static"):
    out = f"/tmp/ch16/rdzv-{kind}.json"
    res = run_nodes(kind, "launchers/rendezvous.py", ["--device", "cpu", "--out", out], nodes=2, per_node=2)
    assert all(rc == 0 for rc, _, _ in res), [err[-1500:] for _, _, err in res]
    rdzv[kind] = json.load(open(out))
    print(f"{kind}: both machines exited 0 after {max(s for _, s, _ in res):.1f} s")
    for r in rdzv[kind]["ranks"]:
        print(f"  rank {r['RANK']} = node {r['GROUP_RANK']} x {r['LOCAL_WORLD_SIZE']} + local {r['LOCAL_RANK']}, "
              f"pid {r['pid']}, store at {r['MASTER_ADDR']}:{r['MASTER_PORT']}")
    for k, n in rdzv[kind]["keys"].items():
        print(f"  store key {k!r}: {n} bytes")

# %%
# NBVAL_CHECK_OUTPUT
for kind, d in rdzv.items():
    ranks = sorted(int(r["RANK"]) for r in d["ranks"])
    formula = all(int(r["RANK"]) == int(r["GROUP_RANK"]) * int(r["LOCAL_WORLD_SIZE"]) + int(r["LOCAL_RANK"])
                  for r in d["ranks"])
    addresses = all(any(k.endswith(f"/{i}") and "cpu" in k for k in d["keys"]) for i in ranks)
    print(f"{kind}: all-reduce of ones = world size 4: {d['sum'] == 4}; rank = node x 2 + local rank: {formula}; "
          f"every rank's address in the store: {addresses}")

# %%
d = rdzv["torchrun-static"]
fig, ax = plt.subplots(figsize=(10, 3.4))
for node in range(2):
    x0 = 0.2 + node * 5
    ax.add_patch(FancyBboxPatch((x0, 0.2), 4.4, 2.6, boxstyle="round,pad=0.05", fc="#f4f4f4", ec="gray"))
    ax.text(x0 + 2.2, 2.6, f"machine {node} (node rank {node})", ha="center", fontsize=9)
    ax.add_patch(FancyBboxPatch((x0 + 0.3, 1.6), 1.6, 0.6, boxstyle="round,pad=0.03", fc="#cde", ec="k"))
    ax.text(x0 + 1.1, 1.9, "torchrun agent", ha="center", va="center", fontsize=8)
    for j, r in enumerate(x for x in d["ranks"] if int(x["GROUP_RANK"]) == node):
        ax.add_patch(FancyBboxPatch((x0 + 0.3 + 2.0 * j, 0.4), 1.6, 0.7, boxstyle="round,pad=0.03", fc="#fd9", ec="k"))
        ax.text(x0 + 1.1 + 2.0 * j, 0.75, f"worker: rank {r['RANK']}\nlocal rank {r['LOCAL_RANK']}", ha="center",
                va="center", fontsize=7)
        ax.annotate("", xy=(x0 + 1.1 + 2.0 * j, 1.1), xytext=(x0 + 1.1, 1.6), arrowprops=dict(arrowstyle="->"))
ax.add_patch(FancyBboxPatch((2.7, 1.55), 1.7, 0.7, boxstyle="round,pad=0.03", fc="#9d9", ec="k"))
ax.text(3.55, 1.9, f"store\n{len(d['keys'])} keys", ha="center", va="center", fontsize=8)
for a, b in ((1.9, 2.7), (5.5, 4.4)):          # each machine's agent <-> the store on machine 0
    ax.annotate("", xy=(b, 1.9), xytext=(a, 1.9), arrowprops=dict(arrowstyle="<->", color="green"))
ax.text(5.0, 3.05, "every agent and every worker dials the store on machine 0; the workers then connect pairwise "
        "(gloo) or through NCCL's own bootstrap", ha="center", fontsize=8)
ax.set_xlim(0, 10); ax.set_ylim(0, 3.3); ax.axis("off"); plt.tight_layout()

# %% [markdown]
# **What to notice.** The global rank is arithmetic: node rank x processes per node + local rank, so ranks 0 and 1
# share machine 0. That is why every mesh below puts its most talkative axis on *consecutive* ranks. Under a static
# launch the workers use the agents' own store: it also holds the agents' role information and the ranks they were
# assigned (`torchelastic/...`). Under c10d the workers get a fresh store of their own (another port). In both cases
# each rank's address is one key of about 186 bytes. That is all the store carries; gradients never go through it.
#
# **A machine that never comes.** The rendezvous waits, but not forever. Start only machine 0 of 2, with
# `join_timeout` lowered from its default of 600 s to 5 s:

# %%
(rc, seconds, err), = run_nodes("torchrun-c10d", "launchers/ddp.py", SMALL + ["--results-dir", "/tmp/ch16/alone"],
                                start=[0], join_timeout=5, timeout=120)
print(f"machine 0 alone: exit code {rc} after {seconds:.1f} s;",
      [line for line in err.splitlines() if "RendezvousTimeoutError" in line][-1].strip()[:160])

# %%
# NBVAL_CHECK_OUTPUT
print("a 2-machine job with one machine missing ends with RendezvousTimeoutError, within 60 s, having written "
      "nothing:", rc != 0 and seconds < 60 and "RendezvousTimeoutError" in err and not os.path.exists("/tmp/ch16/alone"))

# %% [markdown]
# The timeouts, and how to change them: `--rdzv-conf join_timeout=S` (c10d: agents waiting for each other),
# `--rdzv-conf timeout=S` (static: machines dialling machine 0), and after the start `run.dist_timeout` (300 s by
# default: every collective, `docs/faults.md`). A wrong address stops a static launch after its timeout, with the
# address it tried in the message.
#
# ## 2. Two machines train the single-process curve
#
# The launch commands for machine R of 2, as `dit_core.multinode.command` writes them (HOST is machine 0's address):

# %%
for kind in ("torchrun-c10d", "torchrun-static", "deepspeed", "accelerate"):
    script = {"deepspeed": "launchers/zero.py", "accelerate": "launchers/accelerate.py"}.get(kind, "launchers/ddp.py")
    cmd = command(kind, script, 1, 2, 8, "HOST", 29500, workdir="/tmp/ch16")
    print(f"{kind:15s}", " ".join(["python"] + cmd[1:]).replace(os.getcwd() + "/", ""))

# %% [markdown]
# (DeepSpeed without `--no_ssh` is started once, on machine 0, and reaches the others over pdsh/ssh. Started once per
# machine, as here, it needs no ssh at all. `launchers/slurm/train.sbatch` does the same under SLURM: `srun` starts
# one torchrun agent per node, and the rendezvous address comes from `SLURM_JOB_NODELIST`.) Each command, run as two
# "machines" of one process each, against one process on the same batches:

# %%
kinds = [("torchrun-c10d", "launchers/ddp.py", [])] + ([] if SMOKE else [
    ("torchrun-static", "launchers/ddp.py", []), ("accelerate", "launchers/accelerate.py", []),
    ("deepspeed", "launchers/zero.py", ["--stage", "2"])])
single = run_here("launchers/single.py", [SMALL + ["--results-dir", "/tmp/ch16/single"]])[0]
machines = {}
for kind, script, extra in kinds:
    log = f"/tmp/ch16/two-{kind}.jsonl"
    res = run_nodes(kind, script, SMALL + extra + ["--results-dir", f"/tmp/ch16/two-{kind}", "--log-jsonl", log],
                    workdir="/tmp/ch16")
    assert all(rc == 0 for rc, _, _ in res), [e[-1500:] for _, _, e in res]
    machines[kind] = read_jsonl(log)
    print(f"{kind:15s} ({script}): max relative loss difference to one process "
          f"{max_rel(compare(single, machines[kind])):.1e} over {len(machines[kind])} steps")

# %%
# NBVAL_CHECK_OUTPUT
print("two machines (torchrun, c10d rendezvous) == one process (<= 1e-5 every step):",
      len(machines["torchrun-c10d"]) == STEPS and max_rel(compare(single, machines["torchrun-c10d"])) <= 1e-5)

# %%
parity_curves(single, machines["torchrun-c10d"], names=("one process", "two machines x one process (c10d)"));

# %% [markdown]
# ## 3. The mesh: four axes, and which sit on consecutive ranks
#
# `launchers/nd.py --dp D --pp P --cp C --tp T` lays the D·P·C·T ranks out as a grid of shape (D, P, C, T):
#
#     rank = ((d·P + p)·C + c)·T + t
#
# The last axis varies fastest, so **tensor parallelism takes consecutive ranks**. It talks the most: an all-reduce
# of the whole activation twice per block in forward and twice in backward (chapter 10), on the critical path.
# With 8 processes per machine its group then stays inside one machine, on NVLink. **Context parallelism** comes
# next. Its ring passes K and V once per attention layer and can overlap with the attention it feeds (chapter 14).
# The **pipeline** follows. It sends one activation per micro-batch and stage boundary, point to point (chapter 12),
# so its stages may sit on different machines. **Data parallelism** is outermost: one all-reduce of the gradients
# per step, overlapped with backward (chapter 06). picotron uses this very order (dp, pp, cp, tp);
# Megatron-LM and torchtitan also keep tensor parallelism innermost, inside a node, but put the pipeline outermost
# (data parallelism inside it), so that pipeline stages rather than replicas span the slowest links.
#
# Each rank takes part in one group along each axis: the ranks that differ from it only in that coordinate.
# `Layout.lines` computes them (a permute and a reshape of the grid), and every rank creates every group in the
# same order (`new_group` is a collective). torch's `DeviceMesh` is then built *from* those groups
# (`DeviceMesh.from_group`), so that `mesh["tp"]` and the project's code name the same communicators. Two
# 8-process layouts on two machines of 4 GPUs each:

# %%
def draw_mesh(ax, L: Layout, per_node: int, title: str):
    cmap = plt.get_cmap("tab20")
    W = L.world_size
    for r in range(W):
        c = L.coords(r)
        x, y = r % per_node, r // per_node
        replica = c["dp"] * L.pp + c["pp"]                     # which (dp, pp) block of cp x tp ranks
        ax.add_patch(plt.Rectangle((x, -y * 1.4), 0.92, 0.92, color=cmap(2 * replica % 20), alpha=0.6))
        ax.text(x + 0.46, -y * 1.4 + 0.62, f"rank {r}", ha="center", fontsize=8, weight="bold")
        ax.text(x + 0.46, -y * 1.4 + 0.22, f"dp{c['dp']} pp{c['pp']}\ncp{c['cp']} tp{c['tp']}", ha="center", fontsize=7)
    for n in range(W // per_node):
        ax.add_patch(plt.Rectangle((-0.08, -n * 1.4 - 0.08), per_node + 0.08, 1.08, fill=False, ec="k", lw=1.2))
        ax.text(-0.2, -n * 1.4 + 0.46, f"machine {n}", ha="right", va="center", fontsize=8)
    ax.set_xlim(-1.4, per_node + 0.1); ax.set_ylim(-(W // per_node - 1) * 1.4 - 0.2, 1.1)
    ax.set_title(title, fontsize=9); ax.axis("off")

fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
L3, L4 = Layout(2, 2, 1, 2), Layout(1, 2, 2, 2)
draw_mesh(axes[0], L3, 4, f"{L3}\n(a colour = one stage of one replica; its tp ranks side by side)")
draw_mesh(axes[1], L4, 4, f"{L4}\n(a colour = one stage: its cp x tp ranks share its blocks)")
plt.tight_layout()
for L in (L3, L4):
    print(mesh_picture(L))
    for a in AXES:
        print(f"  {a} groups: {L.lines(a)}")

# %% [markdown]
# **What to notice.** In both layouts every tp group is two neighbours on one machine. In the DP 2 x PP 2 x TP 2
# layout the pipeline's two stages sit on the same machine and the data-parallel replicas on different machines:
# the slowest link carries only the gradient all-reduce. In the PP 2 x CP 2 x TP 2 layout the cp pairs are ranks
# {0, 2} and {1, 3}, still inside machine 0 and one step further apart than tp, and the pipeline is the axis that
# crosses to machine 1: one activation per micro-batch goes over the slow link.
#
# ## 4. What each rank does, and why the reductions are what they are
#
# `NDStrategy` is the pipeline strategy of chapter 12 with three changes. It composes the other chapters' code and
# copies none of it:
#
# * **What a stage holds.** Stage p (its blocks from `split_blocks`) of the DiT, after `tensor.parallelize` has
#   swapped its four big linear layers for this rank's slices (tp group), with `ContextAttention` (ring attention
#   over the cp group) in every block, on this rank's slice of every image's tokens (`token_slice`, coordinate c).
#   The pipeline's executor sends the packed activations of those tokens along the pp group.
# * **The loss.** With C > 1 the last stage holds only its tokens of the prediction. Its share of a micro-batch's loss
#   is its tokens' error divided by the *whole* micro-batch's element count (`ulysses.token_loss`, chapter 09), so the
#   C shares add up to the mean.
# * **The reductions.** After the schedule, one all-reduce of the gradients over the **dp x cp** group, divided by
#   D. The cp ranks hold partial gradients of the same images (*summed*); the dp ranks hold gradients of different
#   images (*averaged*). The gradient norm for clipping is one all-reduce over the **pp x tp** group. Every stage's
#   squares count, the tp slices on every tp rank, but a parameter every tp rank holds whole (adaLN, embeddings,
#   the final layer) is counted once. The logged loss is summed over the last stage's cp ranks, counted once per
#   tp group, and divided by D.
#
# Each of those is a choice that a plausible alternative gets wrong. `--break` runs two of them, each a one-line
# change: `cp-average` divides the dp x cp sum by D x C (an average, as if the cp ranks were data-parallel), and
# `norm-every-tp-rank` counts the replicated parameters' squares on every tp rank. The 8-process runs, one job of
# five runs, each against the single process:

# %%
ND = {"DP 2 x PP 2 x TP 2": ["--dp", "2", "--pp", "2", "--tp", "2"],
      "PP 2 x CP 2 x TP 2": ["--pp", "2", "--cp", "2", "--tp", "2"],
      "DP 2 x CP 2 x TP 2 (no pipeline)": ["--dp", "2", "--cp", "2", "--tp", "2"],
      "broken: cp-average": ["--pp", "2", "--cp", "2", "--tp", "2", "--break", "cp-average"],
      "broken: norm-every-tp-rank": ["--dp", "2", "--pp", "2", "--tp", "2", "--break", "norm-every-tp-rank"]}
dirs = {name: f"/tmp/ch16/nd{i}" for i, name in enumerate(ND)}
logs = dict(zip(ND, run_mixed([("launchers/nd.py", SMALL + flags + ["--results-dir", dirs[name]])
                               for name, flags in ND.items()], nproc=8)))
norm_ratio = lambda log: max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(log, single))
for name, log in logs.items():
    print(f"{name:34s}: max rel loss diff {max_rel(compare(single, log)):.1e}, "
          f"max rel grad-norm diff {norm_ratio(log):.1e}")
for r, a in zip(single, logs["broken: cp-average"]):
    if r["step"] % 5 == 0 or a["grad_norm"] <= 0.05:
        print(f"  cp-average step {r['step']:2d}: grad norm {r['grad_norm']:.4f} (one process) vs {a['grad_norm']:.4f}, "
              f"loss rel diff {abs(a['loss'] / r['loss'] - 1):.1e}")

# %%
# NBVAL_CHECK_OUTPUT
for name, log in list(logs.items())[:3]:
    ok = len(log) == STEPS and max_rel(compare(single, log)) <= 1e-5 and norm_ratio(log) <= 1e-5
    print(f"{name:34s} (8 processes): loss and gradient norm == one process (<= 1e-5): {'PASS' if ok else 'FAIL'}")
cpa, nrm = logs["broken: cp-average"], logs["broken: norm-every-tp-rank"]
CLIP = 0.05
# the first step whose halved gradient is *not* clipped (none in the short CI run): its update differs, and so does
# every loss after it
free = next((r["step"] for r in cpa if r["grad_norm"] <= CLIP), STEPS)
rows = compare(single, cpa)
print("cp-average: the loss matches (<= 1e-5) at every step until the first whose halved norm is below the clip:",
      max(r["rel"] for r in rows if r["step"] <= free) <= 1e-5,
      "| the gradient norm is half at step 0 (within 1e-4):", abs(cpa[0]["grad_norm"] / single[0]["grad_norm"] - 0.5) < 1e-4)
print("norm-every-tp-rank: the loss leaves the curve (> 1e-5):", max_rel(compare(single, nrm)) > 1e-5)
mesh = json.load(open(f"{dirs['PP 2 x CP 2 x TP 2']}/mesh.json"))
print("DeviceMesh coordinates and groups == the rank formula, every rank:",
      all(m["coords"] == L4.coords(m["rank"]) and
          all(m["groups"][a] == next(g for g in L4.lines(a) if m["rank"] in g) for a in AXES) for m in mesh))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
steps = [r["step"] for r in single]
axes[0].plot(steps, [r["loss"] for r in single], lw=3, alpha=0.5, label="one process")
for name in ("DP 2 x PP 2 x TP 2", "PP 2 x CP 2 x TP 2", "broken: norm-every-tp-rank"):
    axes[0].plot(steps, [r["loss"] for r in logs[name]], "--", lw=1.2, label=name)
axes[0].set_xlabel("step"); axes[0].set_ylabel("loss"); axes[0].legend(fontsize=7)
for name in ("PP 2 x CP 2 x TP 2", "broken: cp-average", "broken: norm-every-tp-rank"):
    axes[1].plot(steps, [a["grad_norm"] / b["grad_norm"] for a, b in zip(logs[name], single)], ".-", label=name)
axes[1].set_xlabel("step"); axes[1].set_ylabel("logged grad norm / one process's"); axes[1].legend(fontsize=7)
plt.tight_layout()

# %% [markdown]
# **What to notice.** All three layouts follow the single process to float rounding (about 1e-7), and so does their
# gradient norm. `cp-average` is the instructive failure. Its gradient norm is exactly half from the first step, yet
# its loss curve is *indistinguishable* from the right one for as long as every step is clipped: a clipped gradient,
# g·0.05/|g|, does not depend on a constant factor in g. In the full 30-step run the one-process norm falls to 0.098
# at step 20, the halved one to 0.049, below the clip threshold. The right run's gradient is clipped to norm 0.05,
# the broken one enters AdamW unclipped at 0.049 (2% smaller, and pointing the same way), and from step 21 on the
# curves part slightly (up to 6e-4). In the short CI run that step never comes: the bug
# would pass a loss-only test. (AdamW would hide most of it even unclipped, since m/√v does not change when every
# gradient is scaled, up to ε; exercise 2.) That is why every parity test of this workbook also compares the logged
# gradient norm. `norm-every-tp-rank` counts the replicated parameters' squares on both tp ranks. They hold most of
# this small model's gradient (adaLN, embeddings, the final layer), so the logged norm is about √2 too large at the first
# step (0.41 above the right one; the later maximum of 0.5 comes after the curves have parted), every step is clipped
# harder, and the loss curve leaves the single process.
#
# The same proof with every CPU test: `pytest tests/test_nd.py` (also the DeviceMesh coordinates, a checkpoint that
# loads as one plain DiT, an exact resume, another layout's checkpoint refused in one sentence, and each bad layout
# stopped in one sentence that names the axis, e.g. `--tp 8` with 4 heads, `--cp 2` with 49 tokens, `--pp 8` with 2
# blocks).
#
# ## 5. Which axes first: a planning table
#
# `dit_core.parallel.plan` orders the axes by the published rules of thumb and checks each against arithmetic:
#
# 1. **Data parallelism first**, with the model states sharded (ZeRO-3 / FSDP, chapters 07 and 13) once the 16 bytes
#    per parameter of mixed-precision Adam (Rajbhandari et al., 2020) do not fit. torchtitan starts every layout
#    from FSDP.
# 2. **Tensor parallelism inside a machine**, never across it (Narayanan et al., 2021). Only when a block computes
#    for longer than its all-reduces take. The project measured the counter-case: on 2 x H200 `configs/bench.yaml`
#    (hidden 384, 196 tokens) ran slower with TP 2 than on one GPU, 8.6 s against 7.3 s for 100 steps
#    (`docs/results.md`, tensor parallelism; `docs/measurements/2xh200-2026-11-24/tp.log`, commit 406e6c2). It is also added when ZeRO-3's gathers across machines would take longer than the step computes.
# 3. **Context parallelism for long sequences.** Its traffic grows with the tokens, attention with their square. On
#    2 x H200 Ulysses (all-to-all; hidden 384) was 0.52x one GPU at 196 tokens and 1.42x at 3136 (same measurements,
#    `ulysses.log`). The planner models the ring (`ring_attention_elements`), which sends twice Ulysses' bytes.
# 4. **Pipeline parallelism across machines** when the states still do not fit. It sends the least of all (one
#    activation per micro-batch and boundary) at the price of the bubble (P - 1)/(M + P - 1).
#
# Memory per GPU: states / (tp·pp, and ·dp under ZeRO-3) + activations of one sample, 34 bytes per token per hidden
# unit per layer with flash attention (Korthikanti et al., 2022), / (tp·cp). The division by tp assumes Megatron's
# sequence parallelism beside TP (LayerNorms and dropout on token slices), which this workbook's chapter 10 does not
# implement: with plain TP the activations are s·h·(10 + 24/t) bytes per layer, and the 80 GB plan below would not fit. The byte counts per layer are the
# project's formulas that its tests check against counted bytes (`tp_allreduce_elements`,
# `ring_attention_elements`); the bandwidths are 297 GB/s inside a machine (measured all-reduce bus bandwidth on
# 2 x H200, chapter 05) and 50 GB/s per GPU across machines (one 400 Gb/s InfiniBand link, a specification), with
# H200's 989 dense bf16 TFLOPS at 50% utilisation.

# %%
H200, GB80 = 141e9 / 2 ** 30, 80e9 / 2 ** 30          # 141 GB and 80 GB, in GiB (the planner's unit)
jobs = [Job("this DiT, configs/mnist.yaml", 1.28e6, 4, 128, 4, 16, H200, 2, 1, 4096),
        Job("DiT-XL/2, 256 px (256 tokens)", 675e6, 28, 1152, 16, 256, H200, 8, 1, 256),
        Job("DiT-XL/2, 512 px (1024 tokens)", 675e6, 28, 1152, 16, 1024, H200, 8, 1, 256),
        Job("70B, 4k tokens, 8 x 8 H200", 70e9, 80, 8192, 64, 4096, H200, 8, 8, 1024),
        Job("70B, 4k tokens, 8 x 8 GPUs of 80 GB", 70e9, 80, 8192, 64, 4096, GB80, 8, 8, 1024),
        Job("13B video DiT, 256k tokens, 4 x 8 H200", 13e9, 40, 5120, 40, 262144, H200, 8, 4, 32)]
plans = [plan(j) for j in jobs]
print(f"{'job':40s} | {'layout':34s} | states | activ. | ZeRO-3 s / compute s per step | why")
for p in plans:
    z = f"{zero3_seconds(p):.2f} / {step_compute_seconds(p.job):.2f}" if p.zero3 else "-"
    print(f"{p.job.name:40s} | {p.layout():34s} | {p.states_gib():5.1f}G | {p.activations_gib():5.1f}G | {z:>29s} | "
          + "; ".join(p.reasons))

# %%
# NBVAL_CHECK_OUTPUT
print("every plan fits 90% of its GPU's memory:", all(p.memory_gib() <= 0.9 * p.job.gpu_gib for p in plans))
print("tensor parallelism never leaves a machine:", all(p.tp <= p.job.gpus_per_node for p in plans))
bench = Job("configs/bench.yaml", 32.5e6, 12, 384, 6, 196, H200, 2, 1)
print("configs/bench.yaml under TP 2: compute / all-reduce time below 1.5 (marginal; measured, TP 2 lost):",
      block_seconds(bench, 2) / tp_seconds(bench, 2) < 1.5)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
names = [p.job.name.split(",")[0] + ("\n" + p.job.name.split(",", 1)[1].strip() if "," in p.job.name else "")
         for p in plans]
y = np.arange(len(plans))
axes[0].barh(y, [p.states_gib() for p in plans], label="model states")
axes[0].barh(y, [p.activations_gib() for p in plans], left=[p.states_gib() for p in plans], label="activations")
axes[0].scatter([p.job.gpu_gib for p in plans], y, marker="|", s=300, color="k", label="GPU memory")
axes[0].set_yticks(y, names, fontsize=7); axes[0].invert_yaxis(); axes[0].set_xlabel("GiB per GPU (planned)")
axes[0].legend(fontsize=7, loc="lower right")
toks = np.array([64, 256, 1024, 4096, 16384, 65536])
for h in (256, 1152, 5120):
    j = lambda s: Job("", 1e9, 1, h, 8, int(s), 141, 8, 1)
    axes[1].loglog(toks, [block_seconds(j(s), 1, 2) / cp_seconds(j(s), 2) for s in toks], "o-", label=f"CP 2, hidden {h}")
    axes[1].loglog(toks, [block_seconds(j(s), 2) / tp_seconds(j(s), 2) for s in toks], "x--", label=f"TP 2, hidden {h}")
axes[1].axhline(1, color="k", lw=0.8); axes[1].set_xlabel("tokens per sample"); axes[1].set_ylabel("compute / communication")
axes[1].legend(fontsize=6, ncol=2); plt.tight_layout()

# %% [markdown]
# **What to notice.** Left: the workbook's own DiT and DiT-XL/2 are pure data parallelism. Their states take 10 GiB or
# less, and the planner adds an axis only when memory or the slow link forces one. The 70B model shards its states
# first and takes TP inside the machine only when 80 GB GPUs leave no room for a sample's activations. The
# 256k-token video DiT needs all of tensor parallelism inside the machine, and context parallelism across machines
# on top (CP 4 x TP 8 with one replica). Right: tensor parallelism's ratio grows with the hidden size and is flat in the sequence length while the
# linear layers dominate (their compute and the all-reduced bytes both grow with the tokens). It rises only where
# attention's quadratic term takes over. Context parallelism's ratio grows with the tokens (attention is quadratic,
# the ring linear). This is arithmetic, an upper bound, not a measurement. At hidden 384 it gives TP 2 a ratio of
# 1.1 at 196 tokens and the ring more, yet on 2 x H200 TP 2 lost and Ulysses paid only at 3136 tokens (1.42x) and
# lost at 196 (0.52x): at small shapes
# kernels run far below 50% of peak and each message's latency, not its bytes, sets its time. That is why the planner
# adds an axis only when memory forces it, and why the GPU measurements are its check. torchtitan and the Hugging
# Face "Ultra-Scale Playbook" (2025) give the same order of decisions in more detail.
#
# ## Exercises
#
# 1. **Predict.** With `--dp 2 --pp 2 --cp 2 --tp 2` on 16 ranks, what are rank 13's coordinates and the ranks of
#    its tp, cp, pp and dp groups? Check with `Layout(2, 2, 2, 2).coords(13)` and `.lines(axis)`.
# 2. **Break it, then predict.** Section 4's `cp-average` passes the loss comparison because clipping rescales
#    every step. Predict its verdict with `--set train.grad_clip=1.0` (a norm of about 0.6, so hardly any step is
#    clipped), then run it against `launchers/single.py` with the same flag.
# 3. **Plan.** DiT-XL/2 at 1024 px (4096 tokens) on one machine of 8 H200: which layout does `plan` choose, and
#    how much memory per GPU does it plan? At what sequence length does it first need a second axis, and which?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-16).

# %% [markdown]
# ## 中文要点
#
# 多机多卡：每台机器运行同一条命令，只是节点编号（node rank）不同；各进程在会合（rendezvous）处相遇，会合点是第一台机器上的一个键值存储，每个 rank 在其中写下自己的地址并读取其他 rank 的地址，梯度从不经过它。
#
# c10d 弹性会合：所有机器命令相同，等待 `--nnodes` 台机器加入，最多 `join_timeout` 秒；静态方式：0 号机器托管存储，其他机器拨号直到超时。缺席的机器会在超时后让作业以明确的错误结束，而不是无限等待。
#
# 设备网格（device mesh）：rank = ((d·P + p)·C + c)·T + t，张量并行在最内层（相邻 rank，同一台机器），然后是上下文并行、流水线并行，数据并行在最外层。
#
# 多维并行（N-D parallelism）：8 个进程的 DP×PP×TP、PP×CP×TP 与 DP×CP×TP 的损失和梯度范数都与单进程一致（约 1e-7）。上下文并行的部分梯度要求和、数据并行的梯度要求平均；把前者也平均，损失曲线看不出来，只有梯度范数会暴露问题。
#
# 先用哪个维度：先数据并行（状态放不下时用 ZeRO-3/FSDP），再在机内用张量并行（前提是计算量大于通信量），长序列用上下文并行，最后跨机器用流水线并行。
