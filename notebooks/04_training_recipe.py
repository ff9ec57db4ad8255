# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The training recipe: accumulation, precision, clipping, schedule, EMA, resume
#
# Chapter 03 trained the DiT; this chapter takes its training loop (`dit_core.train`, the loop every launcher
# reuses) apart and proves each ingredient on its own: gradient accumulation (梯度累积) equals the large batch, what
# mixed precision (混合精度) changes, what clipping does, the schedule, the EMA, an exact resume, the TensorBoard logs
# and `torch.compile`. It ends with the recipe: the defaults and why.

# %%
import os, time, tempfile, copy
import torch
import matplotlib.pyplot as plt
from dit_core.config import load_config
from dit_core.parity import compare, max_rel, format_table
from dit_core.train import train, ema_decay

SMOKE = os.environ.get("DIT_WORKBOOK_SMOKE") == "1"
STEPS = 12 if SMOKE else 150
os.chdir("..")
SMALL = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "train.train_subset": 2048,
         "train.global_batch_size": 32, "train.max_steps": STEPS, "train.warmup_steps": max(2, STEPS // 10),
         "train.tensorboard": False, "run.device": "cpu"}

def run(**over):
    o = dict(SMALL, **{"run.results_dir": tempfile.mkdtemp(prefix="ch04-")})
    o.update({k.replace("__", "."): v for k, v in over.items()})
    cfg = load_config("configs/tiny.yaml", o)
    res = train(cfg, quiet=True)
    return [__import__("json").loads(l) for l in open(os.path.join(cfg.run.results_dir, "log.jsonl"))], res, cfg


# %% [markdown]
# ## 1. Gradient accumulation equals the large batch
#
# With accumulation A the global batch of 32 is processed as A micro-batches of 32/A, each loss divided by A, the
# gradients summed by autograd (chapter 01: `backward` adds), one optimizer step at the end. The gradient is the mean
# over the same 32 samples, so the run is the same run, with less activation memory.

# %%
acc = {a: run(train__grad_accum=a)[0] for a in (1, 2, 4)}
print(format_table(compare(acc[1], acc[4])[:5], "accum 1", "accum 4"))

# %%
# NBVAL_CHECK_OUTPUT
for a in (2, 4):
    r = max_rel(compare(acc[1], acc[a]))
    print(f"accumulation {a} vs one batch of 32: {'equal within 1e-5: PASS' if r <= 1e-5 else 'FAIL'}")

# %% [markdown]
# ## 2. fp32, bf16, fp16
#
# `train.precision` runs the forward under `torch.autocast` (matmuls in 16 bits, weights and optimizer in fp32);
# fp16 adds a `GradScaler` (chapter 01, section 8). The curves follow each other but are not equal: mixed precision is
# compared with a looser, stated tolerance (here 5% of the loss), never with the 1e-5 of the fp32 proofs.

# %%
prec = {p: run(train__precision=p)[0] for p in ("fp32", "bf16", "fp16")}
fig, ax = plt.subplots(figsize=(6, 3))
for p, log in prec.items():
    ax.plot([r["loss"] for r in log], label=p, lw=1.2)
ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(); ax.set_title("the same run in three precisions (CPU autocast)")
for p in ("bf16", "fp16"):
    print(f"{p}: max relative difference to fp32 {max_rel(compare(prec['fp32'], prec[p])):.1e}")

# %%
# NBVAL_CHECK_OUTPUT
for p in ("bf16", "fp16"):
    print(f"{p} follows fp32 within 5%:", max_rel(compare(prec["fp32"], prec[p])) <= 0.05,
          "| but is not bitwise fp32:", max_rel(compare(prec["fp32"], prec[p])) > 0)

# %% [markdown]
# ## 3. Gradient clipping
#
# `clip_grad_norm_` rescales the whole gradient when its norm exceeds the threshold and returns the norm *before*
# clipping, which is what the log's `grad_norm` holds. Early in training (and after a bad batch) the norm spikes;
# clipping caps the step those spikes take.

# %%
free, _, _ = run(train__grad_clip=0.0)
limit = sorted(r["grad_norm"] for r in free)[int(0.8 * len(free))]     # the unclipped run's 80th percentile
clipped, _, _ = run(train__grad_clip=limit)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([r["grad_norm"] for r in free], label="no clipping"); ax.plot([r["grad_norm"] for r in clipped], label=f"clip at {limit:.2f}")
ax.axhline(limit, color="k", ls=":"); ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("gradient norm (before clipping)"); ax.legend()
print(f"clipping at {limit:.3f} acted on {sum(r['grad_norm'] > limit for r in clipped)} of {len(clipped)} steps; "
      f"max relative loss difference to the unclipped run {max_rel(compare(free, clipped)):.1e}")

# %% [markdown]
# ## 4. Warmup and cosine, from the log
#
# The learning rate each step used is in the log. Warmup matters for Adam: its second-moment estimate starts from
# zero, so the first updates are large relative to the gradient; a ramp keeps them small while the estimate settles.

# %%
log = acc[1]
plt.figure(figsize=(6, 2.6)); plt.plot([r["lr"] for r in log]); plt.xlabel("step"); plt.ylabel("lr")
plt.title(f"warmup {SMALL['train.warmup_steps']} steps, cosine to 5%"); plt.grid(alpha=0.3)

# %% [markdown]
# ## 5. EMA: an average of the weights along the way
#
# After every step the EMA weights move a little toward the current ones: `ema = ema + (1 - d)(w - ema)`. The decay
# d is warmed up (`min(decay, (1 + n) / (10 + n))`) so a short run still averages trained weights, not the
# initialisation. Samples are drawn with the EMA weights (chapter 03 compares the two).

# %%
# NBVAL_CHECK_OUTPUT
n = torch.arange(0, 5000)
plt.figure(figsize=(6, 2.6)); plt.semilogx(n + 1, [ema_decay(0.999, int(k)) for k in n]); plt.xlabel("update"); plt.ylabel("decay")
plt.title("EMA decay: warmed up, then 0.999"); plt.grid(alpha=0.3)
_, res, _ = run()
w = dict(res.model.named_parameters())
moved = max((w[k].detach() - v).abs().max().item() for k, v in res.ema.module.named_parameters())
print("EMA weights differ from the last weights:", moved > 0, "| decay after 0, 10, 1000 updates:",
      [round(ema_decay(0.999, k), 4) for k in (0, 10, 1000)])

# %% [markdown]
# ## 6. Checkpoint and resume, proved exact
#
# Stop a run in the middle (as a job with a time limit would), resume from its checkpoint, and compare with the run
# that never stopped. Weights, Adam's moments, the scheduler, the EMA and the step counter are restored; the batches
# come from the step number (the determinism contract), so nothing else is needed.

# %%
# NBVAL_CHECK_OUTPUT
d = tempfile.mkdtemp(prefix="ch04-resume-")
cfg = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d}))
full = train(cfg, quiet=True)
cfg2 = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d + "/b"}))
train(cfg2, quiet=True, stop_at=STEPS // 2)
cfg3 = load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d + "/b", "run.resume": f"{d}/b/checkpoint-{STEPS // 2}"}))
rest = train(cfg3, quiet=True)
print("losses after the resume == the uninterrupted run's, bitwise:", rest.losses == full.losses[STEPS // 2:])
print("final weights equal:", all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), rest.model.state_dict().values())))

# %% [markdown]
# ### A real crash: `kill -9` in the middle, then `--resume`
#
# A job that is killed (out of memory, a pre-empted node, Ctrl-C twice) gets no chance to clean up. Here the real
# launcher runs in its own process with a checkpoint every 4 steps, and is killed with SIGKILL once a few steps are
# logged. A checkpoint is written into a hidden `.checkpoint-<step>.tmp/` and renamed when complete, so the kill can
# only cost the steps since the last checkpoint. Resuming from the latest one truncates the log to the steps before
# it (the killed run had logged a few more) and continues; the result is compared with a run that was never killed.
# The guarantees, and the tests that hold the code to them, are in `docs/faults.md`.

# %%
# NBVAL_CHECK_OUTPUT
import signal, subprocess, sys
from dit_core.logs import read_jsonl
N = 48                                      # steps of this demonstration, in CI and at full size
CLI = ["--config", "configs/tiny.yaml", "--device", "cpu", "--max-steps", str(N), "--global-batch-size", "32",
       "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
       "--set", "train.train_subset=2048", "--set", "train.tensorboard=false", "--set", "train.ckpt_every=4"]
d = tempfile.mkdtemp(prefix="ch04-crash-")
env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
quiet = dict(env=env, stdout=subprocess.DEVNULL)           # each run prints its summary line; not needed here
subprocess.run([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/whole"], check=True, **quiet)
job = subprocess.Popen([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/killed"], **quiet)
while not os.path.exists(f"{d}/killed/log.jsonl") or len(read_jsonl(f"{d}/killed/log.jsonl")) < N // 2:
    time.sleep(0.01)
job.send_signal(signal.SIGKILL); job.wait()
logged = len(read_jsonl(f"{d}/killed/log.jsonl"))
latest = max(int(p.split("-")[1]) for p in os.listdir(f"{d}/killed") if p.startswith("checkpoint-"))
subprocess.run([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/killed",
                "--resume", f"{d}/killed/checkpoint-{latest}"], check=True, **quiet)
whole, resumed = read_jsonl(f"{d}/whole/log.jsonl"), read_jsonl(f"{d}/killed/log.jsonl")
print(f"after the resume: one row per step: {[r['step'] for r in resumed] == list(range(N))}; "
      f"equal to the run never killed, bitwise: {resumed == whole}")

# %%
print(f"the killed run had logged {logged} steps; its latest complete checkpoint was checkpoint-{latest}; "
      f"hidden leftovers of an interrupted checkpoint now: {[p for p in os.listdir(f'{d}/killed') if p.startswith('.check')]}")

# %% [markdown]
# ### Divergence stops the run, and nothing diverged is saved
#
# A learning rate of 1000 blows the model up within a few steps. The loop checks every step's loss, gradient norm
# and (at every read-back) the weights; the first non-finite value stops the run with one sentence that quotes what
# was in use, and no checkpoint is written after it. In fp16 the loss scaler is allowed to skip up to
# `train.max_nonfinite_steps` overflowing steps in a row (that is its job) before the run stops.

# %%
# NBVAL_CHECK_OUTPUT
r = subprocess.run([sys.executable, "launchers/single.py", *CLI, "--results-dir", f"{d}/diverged",
                    "--set", "train.lr=1e3", "--set", "train.warmup_steps=0"], env=env, capture_output=True, text=True)
errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
saved = [torch.load(f"{d}/diverged/{c}/{f}") for c in os.listdir(f"{d}/diverged") if c.startswith("checkpoint-")
         for f in ("model.pt", "ema.pt")]
print("exit code:", r.returncode, "| one sentence:", len(errors) == 1,
      "| it names the rate in use and what to do:", "the rate at that step was" in errors[0] and "lower train.lr" in errors[0])
print("every checkpoint on disk holds finite weights:", all(torch.isfinite(v).all() for sd in saved for v in sd.values()))

# %%
print(errors[0])

# %% [markdown]
# ## 7. TensorBoard
#
# With `train.tensorboard: true` (the default) rank 0 writes `results/<run>/tb`. Open it with
# `tensorboard --logdir results`. The event file is readable from Python too:

# %%
# NBVAL_CHECK_OUTPUT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = tempfile.mkdtemp(prefix="ch04-tb-")
train(load_config("configs/tiny.yaml", dict(SMALL, **{"run.results_dir": d, "train.tensorboard": True, "train.log_every": 1})), quiet=True)
ev = EventAccumulator(os.path.join(d, "tb")); ev.Reload()
print("scalars:", sorted(ev.Tags()["scalars"]), "| points of train/loss:", len(ev.Scalars("train/loss")) == STEPS)

# %% [markdown]
# ## 8. `torch.compile`
#
# `torch.compile` traces the model into a graph once and generates fused kernels (Inductor). It must not change the
# numbers beyond float rounding. `train.compile: true` turns it on in the loop; here the model alone, forward and
# backward. (In CI the check uses the `aot_eager` backend, which traces the graph but skips code generation, to stay
# fast; the committed outputs use Inductor.)

# %%
from dit_core.model import DiT
torch.manual_seed(0)
m = DiT(load_config("configs/tiny.yaml").model)
with torch.no_grad():
    for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.02)        # leave adaLN-Zero so the output is not all zeros
x, t, y = torch.randn(64, 1, 28, 28), torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))
backend = "aot_eager" if SMOKE else "inductor"
cm = torch.compile(m, backend=backend)
t0 = time.perf_counter(); out_c = cm(x, t, y); first = time.perf_counter() - t0
out_e = m(x, t, y)
def per_step(f, reps=3 if SMOKE else 20):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter(); f(x, t, y).square().mean().backward(); best = min(best, time.perf_counter() - t0)
    return best
print(f"backend {backend}: first call (tracing + compiling) {first:.1f} s; forward+backward {per_step(m) * 1e3:.1f} ms eager, "
      f"{per_step(cm) * 1e3:.1f} ms compiled")

# %%
# NBVAL_CHECK_OUTPUT
print("compiled output equals eager within 1e-4:", torch.allclose(out_c, out_e, rtol=1e-4, atol=1e-5))

# %% [markdown]
# On a GPU the win is larger (fewer kernel launches, fused elementwise work); chapter 11 measures it.
#
# ## 9. The recipe
#
# | setting | default (`configs/mnist.yaml`) | why |
# |---|---|---|
# | optimizer | AdamW, betas (0.9, 0.999), weight decay 0 | as in the DiT paper (AdamW, no weight decay) |
# | learning rate | 2e-3 with 300 warmup steps, cosine to 5% (tiny: 3e-3) | warmup protects Adam's first steps; the tiny rate came from the sweep in `docs/results.md` |
# | global batch | 4096 (tiny: 32) | GPU throughput: a small model's step is host-bound at smaller batches (chapter 11); on a CPU the budget is images, and the sweep found more, smaller steps better |
# | gradient clipping | 1.0 | caps early spikes; inactive once training settles |
# | precision | bf16 on GPUs, fp32 for proofs | fp32's range, no loss scaler; proofs need exact fp32 |
# | EMA | 0.999 (tiny: 0.995), warmed up | smoother samples; short runs need the warm-up |
# | accumulation | 1 | only when the batch does not fit; section 1 proves it changes nothing else |
# | checkpoints | every 2000 steps, atomic rename | section 6: resume is exact |

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then run.** Section 1 proves accumulation 1 = 2. What maximum relative loss difference do you expect for accumulation 4 against 1 at the same global batch? Run `python launchers/single.py --config configs/tiny.yaml --device cpu --max-steps 20 --global-batch-size 16 --grad-accum 4` against `--grad-accum 1` and compare with `python -m dit_core.parity compare A/log.jsonl B/log.jsonl`.
# 2. **Break it.** Resume section 6's checkpoint with another `--seed`. What happens, and why must it?
#
# Solutions, with the numbers they were checked against: [docs/solutions.md](../docs/solutions.md#chapter-04).

# %% [markdown]
# ## 中文要点
#
# 梯度累积（gradient accumulation）与大批次等价：本章逐步证明损失相同。
#
# fp32、bf16、fp16 三种精度的对比；fp16 需要损失缩放，数值发散时训练会停止而不是保存坏的检查点。
#
# 梯度裁剪、学习率预热加余弦退火、EMA，都能从日志里看出来。
#
# 断点续训是精确的：中断后从检查点恢复，后续每一步的损失与不中断的运行逐位相同。
