# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Collectives: how processes talk
#
# Every distributed strategy in this workbook is built from a handful of **collective operations**: calls that every
# rank of a process group makes together. Data parallelism (数据并行) needs all-reduce; ZeRO needs reduce-scatter
# and all-gather; Ulysses sequence parallelism (序列并行) needs all-to-all; tensor parallelism (张量并行) needs
# all-reduce inside each layer. This chapter runs all five for real: four processes are spawned from the notebook,
# talk over **gloo** (the CPU backend; on GPUs the same calls go through NCCL), and report what they held before and
# after. Then it opens the hand-written ring all-reduce, adds the point-to-point messages (点对点通信) that the ring
# and pipeline parallelism are built from, and measures what each call costs against its message size.
#
# Each rank starts with `[10r, 10r+1, 10r+2, 10r+3]`: the tens digit says which rank a number came from.

# %%
import os
import matplotlib.pyplot as plt
from dit_core.parallel.collectives import run_all, expected, bytes_sent_per_rank, COLLECTIVES
from dit_core.parity import SUM_ORDER
from dit_core.plots import collective_diagrams

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"   # CI: fewer and smaller messages in the timing section
WORLD = 4   # four processes, even on a 2-core machine: gloo does not need a core each
results = run_all(WORLD)
for r in range(WORLD):
    print(f"rank {r} before: {results[r]['before']}")

# %% [markdown]
# ## What each collective does
#
# | collective | after it, rank r holds | used by |
# |---|---|---|
# | broadcast | rank 0's tensor | DDP start: every replica begins from rank 0's weights |
# | all-reduce | the element-wise sum over ranks | DDP gradients; tensor-parallel layer outputs |
# | reduce-scatter | piece r of that sum | ZeRO-2/3 gradients: each rank keeps the part it updates |
# | all-gather | every rank's tensor, concatenated | ZeRO-3 weights before a layer runs |
# | all-to-all | piece r of every rank's tensor (a transpose of who-holds-what) | Ulysses: from a slice of the sequence to a slice of the heads |
#
# The proof: each rank's result equals what the definition gives, computed on one process.

# %%
# NBVAL_CHECK_OUTPUT
for name in COLLECTIVES:
    ok = all(results[r][name] == expected(name, WORLD)[r] for r in range(WORLD))
    print(f"{name:15s} {'matches its definition on every rank' if ok else 'WRONG'}")

# %%
collective_diagrams(results, COLLECTIVES);

# %% [markdown]
# **What to notice.** Colours are the ranks a number came from; grey cells are sums of all ranks. Broadcast copies
# rank 0's colour everywhere. All-reduce makes every row the same grey row. Reduce-scatter leaves each rank *one* grey
# cell: a quarter of the all-reduce's result. All-gather gives every rank every colour. All-to-all turns rows into
# columns: rank r ends with the r-th element of every rank.
#
# ## Communication volume
#
# With the bandwidth-optimal ring algorithm, for a tensor of S bytes on each of N ranks, each rank sends:
#
# | collective | bytes sent per rank |
# |---|---|
# | reduce-scatter | (N-1)/N · S |
# | all-gather | (N-1)/N · S (S = the gathered size) |
# | all-reduce | 2(N-1)/N · S (= reduce-scatter + all-gather) |
# | all-to-all | (N-1)/N · S |
#
# So an all-reduce costs about twice the data, *whatever the number of ranks*: this is why data parallelism scales.
# And reduce-scatter + all-gather is exactly an all-reduce, which is why ZeRO-2 communicates as much as DDP.
# `ring_all_reduce` in `dit_core/parallel/collectives.py` writes the ring with point-to-point messages and counts the
# bytes it sends; each rank ran it on a 16 KiB tensor above (its code is opened in the next section). The ring adds
# the four contributions to each chunk in another order than gloo's own all-reduce, so the two may differ by float32
# rounding: the check uses the tolerance ladder's (`dit_core.parity.LADDER`) *sum order* rung, `SUM_ORDER` = 1e-5.

# %%
# NBVAL_CHECK_OUTPUT
ring = results[0]["ring"]
ratio = ring["bytes_sent"] / ring["tensor_bytes"]
print(f"hand-written ring all-reduce equals dist.all_reduce within SUM_ORDER: "
      f"{ring['max_abs_diff_vs_all_reduce'] <= SUM_ORDER}")
print(f"bytes sent / tensor bytes = {ratio:.3f}; formula 2(N-1)/N = {2 * (WORLD - 1) / WORLD:.3f}")

# %%
ns = range(2, 17)
fig, ax = plt.subplots(figsize=(6, 3))
for name in ("all_reduce", "reduce_scatter", "all_to_all"):
    ax.plot(ns, [bytes_sent_per_rank(name, 1.0, n) for n in ns], "o-", ms=3, label=name)
ax.axhline(2, color="k", ls=":", lw=0.8)
ax.set_xlabel("ranks N"); ax.set_ylabel("bytes sent per rank / S"); ax.set_title("ring algorithms: volume per rank")
ax.legend(); ax.grid(alpha=0.3); plt.tight_layout()

# %% [markdown]
# **What to notice:** the curves flatten. Doubling the GPUs does not double what each one must send; the cost that
# grows with N is latency (2(N-1) message steps in a ring), which is why real libraries switch to trees for small
# messages and why DDP packs gradients into buckets.

# %% [markdown]
# ## Inside the hand-written ring
#
# Here is the whole of `ring_all_reduce`, the function each rank ran above, straight from the library:

# %%
import inspect
from IPython.display import Code
from dit_core.parallel.collectives import ring_all_reduce

Code(inspect.getsource(ring_all_reduce), language="python")

# %% [markdown]
# Read it with N = 4 ranks in mind (libraries often write P for the number of ranks):
#
# * **Chunks.** `x.clone().chunk(n)` cuts the tensor into N chunks of S/N bytes. Every message in the ring is one
#   chunk, never the whole tensor.
# * **Neighbours.** Rank r only ever sends to `right` = r+1 and receives from `left` = r-1 (mod N). At every step all
#   N links carry one chunk at the same time, so no link sits idle and no rank talks to more than two others.
# * **Phase 1, reduce-scatter (归约散射), N-1 steps.** At step s rank r sends chunk (r-s) mod N and receives chunk
#   (r-s-1) mod N, which it *adds* to its own copy. The chunk a rank receives is exactly the one its left neighbour
#   sends: (left - s) = (r - s - 1). Each chunk collects one more contribution per step, so after N-1 steps rank r
#   holds the full sum of chunk (r+1) mod N. This phase alone *is* a reduce-scatter (with the pieces shifted by one).
# * **Phase 2, all-gather (全收集), N-1 steps.** At step s rank r sends chunk (r+1-s) mod N (at s = 0 the finished
#   one) and receives chunk (r-s) mod N, which it *overwrites*: what arrives is already the full sum. After N-1
#   steps every rank holds every finished chunk.
# * **Both directions at once.** Each step posts `isend` to the right and `irecv` from the left before it waits for
#   either. If every rank instead began with a blocking send, all of them would wait for a receive that nobody has
#   posted yet (the next section shows this deadlock, 死锁, happening).
# * **The count.** 2(N-1) steps, each sending S/N bytes: 2(N-1)/N · S per rank, the 1.500 measured above for N = 4.
#   The price of this bandwidth-optimal schedule is the number of steps: each one pays a message's fixed cost (the
#   latency, measured at the end of this chapter), and there are 2(N-1) of them.
#
# The picture below follows the same index rule step by step: each cell is one chunk on one rank, labelled with the
# ranks whose contributions it already holds.

# %%
import matplotlib.patches as mpatches


def ring_steps(n: int) -> list[tuple[str, list[list[frozenset]], dict[int, int]]]:
    """Who has been added into each chunk, on each rank, after each step of ring_all_reduce's index rule."""
    have = [[frozenset([r]) for _ in range(n)] for r in range(n)]   # have[r][c]: contributions in chunk c on rank r
    frames = [("start", have, {})]
    for phase in ("reduce", "gather"):
        for step in range(n - 1):
            send = {r: (r - step) % n if phase == "reduce" else (r + 1 - step) % n for r in range(n)}
            recv = {r: (r - step - 1) % n if phase == "reduce" else (r - step) % n for r in range(n)}
            assert all(recv[r] == send[(r - 1) % n] for r in range(n))   # each receive is the left neighbour's send
            old, have = have, [row[:] for row in have]
            for r in range(n):
                c, got = recv[r], old[(r - 1) % n][recv[r]]
                have[r][c] = old[r][c] | got if phase == "reduce" else got
            frames.append((f"{'reduce-scatter' if phase == 'reduce' else 'all-gather'} step {step + 1}", have, recv))
    return frames


def draw_ring(frames, n):
    """All panels on one pair of axes, side by side (one axes draws much faster than seven)."""
    cmap = plt.get_cmap("tab10")     # a rank's own colour, as in the diagrams above; sums are grey
    fig, ax = plt.subplots(figsize=(1.9 * len(frames), 2.4))
    for k, (title, have, recv) in enumerate(frames):
        x0 = k * (n + 0.8)
        ax.text(x0 + n / 2, n + 0.15, title, ha="center", fontsize=8)
        for r in range(n):
            for c in range(n):
                who = have[r][c]
                colour = cmap(next(iter(who))) if len(who) == 1 else str(0.85 - 0.45 * (len(who) - 1) / (n - 1))
                ax.add_patch(mpatches.Rectangle((x0 + c, n - 1 - r), 0.92, 0.88, color=colour, alpha=0.6,
                                                lw=1.6 if recv.get(r) == c else 0, ec="k"))
                label = "Σ" if len(who) == n else "+".join(str(i) for i in sorted(who))
                ax.text(x0 + c + 0.46, n - 1 - r + 0.44, label, ha="center", va="center", fontsize=7)
            ax.text(x0 + r + 0.46, -0.3, f"c{r}", ha="center", fontsize=6)     # chunk names under each panel
    for r in range(n):
        ax.text(-0.15, n - 1 - r + 0.44, f"rank {r}", ha="right", va="center", fontsize=7)
    ax.set_xlim(-1.2, len(frames) * (n + 0.8)); ax.set_ylim(-0.5, n + 0.5); ax.axis("off")
    fig.tight_layout()
    return fig


frames = ring_steps(WORLD)
draw_ring(frames, WORLD);

# %% [markdown]
# **Notice:** in each panel after the first, every rank has a black frame on exactly one cell: the one chunk it
# received in that step. Colours merge into darker greys during the reduce-scatter; after step 3 each rank holds one
# Σ (the full sum), rank r in chunk r+1. The all-gather steps only copy: the Σ cells spread until every cell is Σ.
# The check:

# %%
# NBVAL_CHECK_OUTPUT
full = frozenset(range(WORLD))
after_rs, after_ag = frames[WORLD - 1][1], frames[-1][1]
print("steps:", len(frames) - 1, "= 2(N-1):", len(frames) - 1 == 2 * (WORLD - 1))
print("each step, each rank receives one chunk (1/N of the tensor):", all(len(f[2]) == WORLD for f in frames[1:]))
print("after the reduce-scatter phase rank r holds the full sum of chunk r+1, and only of it:",
      all([c for c in range(WORLD) if after_rs[r][c] == full] == [(r + 1) % WORLD] for r in range(WORLD)))
print("after the all-gather phase every rank holds every full sum:", all(x == full for row in after_ag for x in row))

# %% [markdown]
# ## Point-to-point: send and recv
#
# A collective involves every rank of a group. A **point-to-point** message (点对点通信) involves two: one rank sends
# a tensor, one other rank receives it into a tensor of the same shape and dtype that it allocated in advance.
# The ring above is built from them, and so is pipeline parallelism (chapter 12: each stage sends its activations to
# the next stage and its gradients to the previous one).
#
# | call | returns | what blocks |
# |---|---|---|
# | `dist.send(t, dst)` | when the send is complete | the caller; on gloo until `dst` has posted the matching receive |
# | `dist.recv(t, src)` | when `t` holds the message | the caller, until the message has arrived |
# | `dist.isend(t, dst)`, `dist.irecv(t, src)` | at once, a `Work` handle | nothing; `work.wait()` blocks, `work.is_completed()` asks. Do not change `t` before `wait()` (a send may still read it, a receive may still write it) |
# | `dist.batch_isend_irecv([dist.P2POp(dist.isend, t, dst), dist.P2POp(dist.irecv, u, src), ...])` | at once, a list of handles | nothing; on NCCL the list is issued as one group so its sends and receives progress together; on gloo it is the same `isend`/`irecv` calls one by one |
#
# `dist.send` is `dist.isend(...).wait()`. **Matching order.** The k-th message rank 0 sends to rank 1 lands in the
# k-th receive rank 1 posts from rank 0 (per tag: chapter 12 gives each kind of message its own tag). A send only
# completes against its receive, so the two ranks must post them in an order that lets each side progress. Two
# blocking sends facing each other wait forever: each waits for a receive that the other will post only after its own
# send returns. Gloo makes every send wait for the receiver, even for 4 floats (shown below). Backends that buffer small
# messages (MPI's *eager* protocol) hide the bug until the tensor grows; on NCCL a send and a receive that must progress
# together have to be in one group (`ncclGroupStart`/`ncclGroupEnd`), which is what `batch_isend_irecv` does there.
# With `isend` and `irecv` both ranks post both sides first and wait afterwards, so nothing depends on the order.
#
# The job below starts two processes itself, with the four variables a launcher sets (`RANK`, `WORLD_SIZE`,
# `MASTER_ADDR`, `MASTER_PORT`: `init_process_group` reads them). `torchrun --nproc_per_node 2 p2p_and_costs.py
# SIZES DIR` runs the same file; starting the two ranks directly saves torchrun's own process, which imports torch
# too (about 4 s of a 2-core machine). One job runs the point-to-point demonstrations *and* the timings of the next
# section: process start-up costs more than everything the job measures.

# %%
import json, subprocess, sys
from pathlib import Path
from dit_core.parallel.dist import free_port
from dit_core.parity import ROOT
from dit_core.scratch import scratch_dir

JOB = r'''"""Two ranks over gloo: point-to-point messages, then the time of each operation against message size."""
import datetime, json, os, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
from dit_core.parallel.dist import exit_process

sizes, out = json.loads(sys.argv[1]), Path(sys.argv[2])   # message sizes in bytes; where rank{r}.json goes
smoke = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
torch.set_num_threads(1)
dist.init_process_group("gloo")                           # reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
rank, P = dist.get_rank(), dist.get_world_size()
peer = 1 - rank                                           # two ranks
res = {}

# 1. Blocking calls in matching order: 0 sends while 1 receives, then 1 sends while 0 receives.
msg = torch.randn(1000, generator=torch.Generator().manual_seed(0))   # both ranks can rebuild it to check
if rank == 0:
    dist.send(msg, dst=1)
    back = torch.empty(1000)
    dist.recv(back, src=1)
    res["matched"] = torch.equal(back, 2 * msg)           # what came back is exactly twice what left
else:
    got = torch.empty(1000)
    dist.recv(got, src=0)
    res["matched"] = torch.equal(got, msg)                # arrived bit for bit
    dist.send(2 * got, dst=0)

# 2. Both ranks send first. dist.send(t, peer) is dist.isend(t, peer).wait(); the wait gets a 0.5 s limit here so
#    that the deadlock reports itself instead of hanging. A timed-out wait closes that group's connections, so this
#    runs in a group of its own, left unused afterwards.
g = dist.new_group()
try:
    dist.isend(torch.ones(4), dst=peer, group=g).wait(timeout=datetime.timedelta(seconds=0.5))
    res["send_first_deadlocks"] = False
except RuntimeError:                                      # "Timed out waiting 500ms for send operation to complete"
    res["send_first_deadlocks"] = True

# 3. The same order with isend: it returns at once, and its send completes once the peer posts the receive.
mine, theirs = torch.full((4,), 10.0 * rank), torch.empty(4)
s = dist.isend(mine, dst=peer)
time.sleep(0.05)
pending = not s.is_completed()                            # the peer has posted no receive: it waits at the barrier
dist.barrier()
r = dist.irecv(theirs, src=peer)
s.wait(); r.wait()
res["isend_pending_until_recv"] = pending and s.is_completed()
res["isend_exchange"] = torch.equal(theirs, torch.full((4,), 10.0 * peer))

# 4. batch_isend_irecv: sends and receives issued together (one group on NCCL); a shift around the ring.
got = torch.empty(4)
ops = [dist.P2POp(dist.isend, mine, (rank + 1) % P), dist.P2POp(dist.irecv, got, (rank - 1) % P)]
for w in dist.batch_isend_irecv(ops):
    w.wait()
res["batch_shift"] = torch.equal(got, torch.full((4,), 10.0 * ((rank - 1) % P)))

# 5. Seconds per call against the message size S in bytes. S follows nccl-tests: the tensor for all-reduce,
#    broadcast and send/recv; the gathered output for all-gather; the input for reduce-scatter.
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)   # newer name first
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def calls(n_bytes):
    full, piece = torch.zeros(n_bytes // 4), torch.zeros(n_bytes // 4 // P)   # zeros: repeated sums stay finite

    def send_recv():                                      # a round trip 0 -> 1 -> 0, reported as half (one way)
        if rank == 0:
            dist.send(full, 1); dist.recv(full, 1)
        else:
            dist.recv(full, 0); dist.send(full, 0)
    return {"all_reduce": lambda: dist.all_reduce(full), "all_gather": lambda: all_gather(full, piece),
            "reduce_scatter": lambda: reduce_scatter(piece, full), "broadcast": lambda: dist.broadcast(full, 0),
            "send_recv": send_recv}


def seconds_per_call(fn, reps):
    fn()                                                  # warm-up: first-call setup, buffers
    dist.barrier()                                        # both ranks start together
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]                 # the median call: one descheduled call does not count


names = list(calls(16))
best = torch.full((len(names), len(sizes)), float("inf"), dtype=torch.float64)
for trial in range(2 if smoke else 5):                    # the best of a few trials, spread in time: other work
    for j, n in enumerate(sizes):                         # shares these cores and slows some stretches of time
        reps = max(3, min(20, (64 << 10) // n)) if smoke else max(3, min(100, (1 << 20) // n))
        for i, fn in enumerate(calls(n).values()):
            best[i, j] = min(best[i, j].item(), seconds_per_call(fn, reps))
dist.all_reduce(best, op=dist.ReduceOp.MAX)               # a call lasts until its slowest rank is done
best[names.index("send_recv")] /= 2                       # one way = half the round trip
res["sizes"], res["seconds"] = sizes, dict(zip(names, best.tolist()))
(out / f"rank{rank}.json").write_text(json.dumps(res))
dist.barrier()
exit_process(0)
'''

# 16 B to 64 MiB in steps of 4 (SMOKE: 16 B to 16 MiB, fewer sizes); every size splits into 2 float32 halves
SIZES = [16, 256, 4096, 65536, 1 << 20, 16 << 20] if SMOKE else [16 * 4 ** k for k in range(12)]
work = scratch_dir("ch05-")
(work / "p2p_and_costs.py").write_text(JOB)
env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
           MASTER_PORT=str(free_port()))
procs = [subprocess.Popen([sys.executable, str(work / "p2p_and_costs.py"), json.dumps(SIZES), str(work)],
                          env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=open(work / f"rank{r}.err", "w"))
         for r in range(2)]
codes = [p.wait(timeout=900) for p in procs]
if any(codes):
    raise RuntimeError(f"exit codes {codes}:\n" + (work / "rank0.err").read_text()[-3000:])
runs = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]

# %%
# NBVAL_CHECK_OUTPUT
def both(key):
    return all(run[key] for run in runs)


print("blocking send/recv in matching order: rank 1 received the tensor exactly, rank 0 got exactly twice it back:",
      both("matched"))
print("both ranks send first with a blocking send: neither send completes (a deadlock, caught by a 0.5 s limit):",
      both("send_first_deadlocks"))
print("isend returns at once; its send stays pending until the peer posts the matching irecv:",
      both("isend_pending_until_recv"))
print("isend + irecv, both ranks sending first: each received the other's tensor exactly:", both("isend_exchange"))
print("batch_isend_irecv shift around the ring: each received its left neighbour's tensor exactly:",
      both("batch_shift"))

# %% [markdown]
# **Notice** the second and third lines together: a send on gloo does not finish until the other side has posted its
# receive, even for a 16-byte message. That is why two blocking sends facing each other never return, and why the ring
# and chapter 12's pipeline post their sends and receives together and wait afterwards. A message is copied, never
# computed on, so "exactly" here is the tolerance ladder's bitwise rung (`torch.equal`).
#
# ## What a call costs: latency and bandwidth
#
# The same job timed every operation between the two CPU processes, from 16 bytes to the largest size: for each, the
# median of repeated calls after a warm-up, the best of a few such trials spread over the run. The simplest model of a
# call is the **alpha-beta model** (α-β 模型): t(S) = α + S·β. α is the **latency** (延迟), the fixed cost of any call
# however small; 1/β is the **bandwidth** (带宽), the bytes per second a large message moves. Small messages measure
# α; large ones measure β. The table reads both off the curve: α is the fastest time among the messages up to 1 KiB,
# β the slope between the two largest messages. α/β is the size at which the two terms are equal: below it a message
# is mostly latency.
#
# Two bandwidths are reported, in the convention of NVIDIA's nccl-tests: the **algorithm bandwidth** (算法带宽)
# algbw = S / t, and the **bus bandwidth** (总线带宽) busbw = algbw × factor, the factor turning it into what each
# rank's link carried in a ring (the volume table above): 2(N-1)/N for all-reduce, (N-1)/N for all-gather and
# reduce-scatter, 1 for broadcast and send/recv. Bus bandwidth is comparable across operations and numbers of ranks;
# with N = 2 the all-reduce factor is exactly 1. The GPU row under the table is the project's own 2 x H200 run: a
# 256 MiB all-reduce timed by `tools/bench_ddp.py`, in `docs/measurements/2xh200-2026-11-24/ddp.log` (main at commit
# 406e6c2).

# %%
import numpy as np

P2 = 2
BUS = {"all_reduce": 2 * (P2 - 1) / P2, "all_gather": (P2 - 1) / P2, "reduce_scatter": (P2 - 1) / P2,
       "broadcast": 1.0, "send_recv": 1.0}
S = np.array(runs[0]["sizes"], dtype=float)
T = {name: np.array(t) for name, t in runs[0]["seconds"].items()}


def alpha_beta(S, t):
    """Read the model off the curve: alpha = the fastest of the messages up to 1 KiB (all latency; other work on
    the cores only ever adds time), beta = the slope between the two largest messages (alpha cancels there)."""
    return float(t[S <= 1024].min()), float((t[-1] - t[-2]) / (S[-1] - S[-2]))


# docs/measurements/2xh200-2026-11-24/ddp.log (main at commit 406e6c2): `tools/bench_ddp.py --allreduce-mb 256`
# on 2 x H200 (NVLink, NCCL), its last line
gpu_log = ROOT / "docs/measurements/2xh200-2026-11-24/ddp.log"
gpu = [json.loads(line) for line in gpu_log.read_text().splitlines() if line.startswith('{"allreduce_mb"')][0]
gpu_S, gpu_t = gpu["allreduce_mb"] * 2 ** 20, gpu["time_ms"] / 1e3

fit = {name: alpha_beta(S, t) for name, t in T.items()}   # (alpha, beta) of each operation
print(f"2 CPU processes, gloo; largest message {S[-1] / 2**20:g} MiB. GB = 1e9 bytes.")
print(f"{'operation':15s} {'t(16 B)':>9s} {'t(largest)':>11s} {'algbw':>9s} {'busbw':>9s}  |  {'alpha':>7s} "
      f"{'1/beta':>9s} {'alpha/beta':>10s}")
for name, t in T.items():
    a, b = fit[name]
    print(f"{name:15s} {t[0] * 1e6:7.0f} us {t[-1] * 1e3:8.2f} ms {S[-1] / t[-1] / 1e9:5.2f} GB/s "
          f"{BUS[name] * S[-1] / t[-1] / 1e9:5.2f} GB/s  |  {a * 1e6:4.0f} us {1 / b / 1e9:4.2f} GB/s "
          f"{a / b / 2**10:6.0f} KiB")
gpu_bus = BUS["all_reduce"] * gpu_S / gpu_t
print(f"all_reduce on 2 x H200, NCCL (ddp.log): {gpu_S / 2**20:g} MiB in {gpu_t * 1e3:.3f} ms, algbw "
      f"{gpu_S / gpu_t / 1e9:.0f} GB/s, busbw {gpu_bus / 1e9:.0f} GB/s (the file's busbw_GBps: "
      f"{gpu['busbw_GBps']:.0f}): {gpu_bus / (BUS['all_reduce'] * S[-1] / T['all_reduce'][-1]):.0f}x gloo's all-reduce "
      f"busbw at its largest size")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
fine = np.geomspace(S[0], S[-1], 100)
for k, (name, t) in enumerate(T.items()):
    ax1.loglog(S, t * 1e6, "o-", ms=3, color=f"C{k}", label=name)
    ax2.loglog(S, BUS[name] * S / t / 1e9, "o-", ms=3, color=f"C{k}", label=name)
a, b = fit["all_reduce"]
ax1.loglog(fine, (a + fine * b) * 1e6, "k--", lw=0.9, label="all_reduce: α + S·β")
ax1.axhline(a * 1e6, color="k", ls=":", lw=0.7)
ax1.text(S[0], a * 1e6 * 0.65, f"α ≈ {a * 1e6:.0f} µs", fontsize=8)
ax1.set_xlabel("message size S (bytes)"); ax1.set_ylabel("time per call (µs)")
ax1.set_title("gloo, 2 CPU processes: time per call"); ax1.legend(fontsize=7); ax1.grid(alpha=0.3)
ax2.loglog([gpu_S], [BUS["all_reduce"] * gpu_S / gpu_t / 1e9], "k*", ms=11, label="all_reduce, 2 x H200 NCCL")
ax2.set_xlabel("message size S (bytes)"); ax2.set_ylabel("bus bandwidth (GB/s)")
ax2.set_title("bus bandwidth (nccl-tests convention)"); ax2.legend(fontsize=7); ax2.grid(alpha=0.3)
plt.tight_layout()

# %% [markdown]
# **Notice** the two regimes on the left. Below about α/β (the table's last column) the lines are nearly flat: every
# call costs about α whatever it carries, and a 16-byte message uses almost none of the bandwidth. Above it they climb
# with slope 1 on log-log axes: time is proportional to S, and the bus bandwidth on the right stops growing. The pair
# of H200s (the star: NVLink between two GPUs, NCCL) moves a large all-reduce hundreds of times faster than gloo between
# two CPU processes (the ratio is printed above), so read the gloo numbers for the shape of the curve, not for what a GPU
# does. Gloo's all-gather and reduce-scatter move half the bytes of its all-reduce, yet here they are not faster: the
# ring volumes are what a library *can* reach, not what each one does.
#
# These outputs are timings on a shared machine and are not checked. What is checked are two facts that hold under
# any load:

# %%
# NBVAL_CHECK_OUTPUT
k4 = list(S).index(4096)
print("every operation: the largest message takes longer than the 4 KiB one:", all(t[-1] > t[k4] for t in T.values()))
ratio = (S[-1] / T["all_reduce"][-1]) / (S[0] / T["all_reduce"][0])
print("all-reduce: bytes per second at the largest size more than 100x those at 16 B:", bool(ratio > 100))

# %% [markdown]
# **Why DDP packs gradients into buckets.** The hand-written DDP (`dit_core/parallel/ddp.py`) and torch's DDP
# all-reduce gradients in buckets of about 25 MiB (`DDPStrategy`'s `bucket_cap_mb`, which the 2 x H200 training
# benchmarks in that log used too). With the α and β read off above, here is one bucket against the same bytes cut
# into a thousand small all-reduces (the naive loop of chapter 06 sends one per parameter tensor):

# %%
from dit_core.parallel.ddp import DDPStrategy

bucket = inspect.signature(DDPStrategy).parameters["bucket_cap_mb"].default * 2 ** 20
a, b = fit["all_reduce"]
print(f"bucket {bucket / 2**20:g} MiB; gloo all-reduce model alpha = {a * 1e6:.0f} us, 1/beta = {1 / b / 1e9:.2f} GB/s")
print(f"one all-reduce of the bucket:       {(a + bucket * b) * 1e3:7.1f} ms")
print(f"1000 all-reduces of a 1000th of it: {(1000 * a + bucket * b) * 1e3:7.1f} ms")
print(f"2 x H200 at the measured {gpu_S / gpu_t / 1e9:.0f} GB/s: one bucket's bytes take "
      f"{bucket / (gpu_S / gpu_t) * 1e6:.0f} us plus NCCL's latency (ddp.log has one size only, so no alpha on the GPU)")

# %% [markdown]
# **Notice:** a thousand small messages pay α a thousand times; one bucket pays it once. The byte term is the same in
# both. Buckets also let the all-reduce of early buckets run while the backward computes the later gradients
# (chapter 06).

# %% [markdown]
# ## Exercises
#
# 1. **Predict.** In a ring all-reduce of a 1 MB tensor over 4 processes, how many bytes does each process send? Over 64 processes?
# 2. **Predict.** Why is all-reduce = reduce-scatter + all-gather, and which later strategy uses the two halves separately?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-05).

# %% [markdown]
# ## 中文要点
#
# 集合通信（collective communication）是分布式训练的基本动作：broadcast、all-reduce、reduce-scatter、all-gather、all-to-all，本章在四个真实进程之间逐一演示。
#
# all-reduce = reduce-scatter + all-gather；手写的环形全归约中，每个进程发送约 2(N−1)/N 倍的数据量，与进程数几乎无关。
#
# 点对点通信（send/recv）：gloo 上一次 send 要等对方发出匹配的 recv 才完成，两个进程都先用阻塞的 send 就会死锁；isend/irecv（或 batch_isend_irecv）先把收和发都挂上、再等待，顺序就不再重要。第 12 章的流水线并行靠它传递激活和梯度。
#
# α-β 模型：t = α + S·β。小消息的时间约等于延迟 α，大消息由带宽 1/β 决定；总线带宽按 nccl-tests 的约定换算（all-reduce 乘 2(N−1)/N）。所以 DDP 把梯度打包成约 25 MiB 的桶，只付一次延迟。
#
# 后面每一章的通信量都用这里的公式来算。
