"""Hugging Face Accelerate: one training script for one CPU, many CPUs, one or many GPUs, and DeepSpeed.

    python launchers/accelerate.py --config configs/tiny.yaml --max-steps 200                   # one device
    torchrun --nproc_per_node 2 launchers/accelerate.py --config configs/tiny.yaml --device cpu  # gloo, CPUs
    accelerate launch --num_processes 2 launchers/accelerate.py --config configs/mnist.yaml      # GPUs, NCCL
    accelerate launch --config_file configs/accelerate_zero2.yaml launchers/accelerate.py --config configs/mnist.yaml

Unlike the other launchers this one writes its own loop, the way an Accelerate user would: the library owns
the data loader, accumulation, mixed precision, clipping and checkpoints. The model, the diffusion loss, the
optimizer, the schedule, the EMA and the batches of the determinism contract are the project's.
"""
import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

# Python puts this script's folder first on sys.path, where this file would shadow the `accelerate`
# package itself: take that entry out, then add the repository root (run from a clone without installing).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import (DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin,  # noqa: E402
                               InitProcessGroupKwargs)
from torch.utils.data import DataLoader  # noqa: E402

from dit_core.batch import GlobalBatchStream, stack_samples  # noqa: E402
from dit_core.checkpoint import (CheckpointError, check_finite, foreign, load_ema, publish, resume_point,  # noqa: E402
                                 starts_from_weights, write_failed, written_whole)
from dit_core.config import ConfigError  # noqa: E402
from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.data import check_data_fits  # noqa: E402
from dit_core.engine import EMA, apply_schedule, build_optimizer, use_tf32, weight_stats  # noqa: E402
from dit_core.errors import first_error  # noqa: E402
from dit_core.guard import DivergenceGuard  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from dit_core.parallel.dist import TIMEOUT, DistStrategy, check_batch_split, exit_process, watch_launcher  # noqa: E402
from dit_core.logs import JsonlLogger  # noqa: E402
from dit_core.sources import load_data  # noqa: E402
from dit_core.rundir import RunFolder  # noqa: E402
from dit_core.objective import Objective  # noqa: E402

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class Progress:
    """The step counter, saved and restored with Accelerate's state (register_for_checkpointing)."""

    def __init__(self):
        self.step, self.samples_seen = 0, 0

    def state_dict(self):
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, sd):
        self.step, self.samples_seen = int(sd["step"]), int(sd["samples_seen"])


def make_accelerator(cfg) -> Accelerator:
    t, device = cfg.train, cfg.run.device
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' but no CUDA GPU is visible; use --device cpu or --device auto.")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed:
        from dit_core.parallel.zero import skip_inference_kernel_build
        skip_inference_kernel_build()
    # Every collective is bounded by run.dist_timeout: a rank that stops answering ends the job.
    group = {"timeout": datetime.timedelta(seconds=cfg.run.dist_timeout)}
    TIMEOUT["seconds"] = cfg.run.dist_timeout
    return Accelerator(
        # Accelerate runs DeepSpeed only when cpu=False; on a CPU-only machine it then needs gloo named.
        cpu=cpu and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(**group, **({"backend": "gloo"} if cpu and deepspeed else {}))],
        mixed_precision=PRECISION[t.precision],
        # As a plugin, not `gradient_accumulation_steps=`: that one is overridden by the environment
        # `accelerate launch` sets from its config file.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum),
        # The loader yields one micro-step of *every* process (B/accum samples); split_batches cuts it into
        # contiguous per-process pieces. (The default, False, would give each process its own whole batch.)
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        step_scheduler_with_optimizer=True,
    )


def check_deepspeed_config(accelerator: Accelerator, cfg) -> None:
    """The DeepSpeed section of an Accelerate config must agree with the project config."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    want = {"gradient_accumulation_steps": cfg.train.grad_accum, "gradient_clipping": cfg.train.grad_clip}
    for key, value in want.items():
        got = ds.get(key, "auto")
        if got == "auto":
            ds[key] = value      # Accelerate would fill clipping "auto" with 1.0, whatever the project says
        elif float(got) != float(value):
            raise ConfigError(f"the Accelerate config's DeepSpeed {key}={got} disagrees with the project config "
                              f"({value}); set it to {value} or auto in the YAML.")


def save(accelerator, folder: Path, model, ema: EMA, progress: Progress, cfg, guard: dict) -> None:
    """checkpoint-<step>/: Accelerate's state (exact resume) plus the project's plain files, written
    into a temporary folder and renamed when every process is done; weights checked finite first."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    # a refused write (a full disk: OSError, or torch's or safetensors' own error) removes tmp: one sentence
    with written_whole(tmp, lambda e: write_failed(folder, e)):
        if accelerator.is_main_process:
            if folder.exists():
                raise CheckpointError(f"'{folder}' already exists; another run writes into '{folder.parent}': "
                                      f"give each run its own --results-dir.")
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))                # every process: its part
        weights = accelerator.get_state_dict(model)                    # gathered where sharded
        if accelerator.is_main_process:
            torch.save(check_finite(weights, tmp / "model.pt"), tmp / "model.pt")
            torch.save(check_finite(ema.state_dict(), tmp / "ema.pt"), tmp / "ema.pt")
            (tmp / "training_state.json").write_text(json.dumps(
                {**progress.state_dict(), "engine": "accelerate", "config": cfg.to_dict(), "guard": guard},
                indent=1))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish(tmp, folder)                   # every file's sha256 into the manifest, flushed, then renamed


class AccelerateRanks(DistStrategy):
    """rank 0's verdicts shared with every process (no-op for one process)."""

    def __init__(self, accelerator):
        self.rank, self.world_size, self.device = (accelerator.process_index, accelerator.num_processes,
                                                   accelerator.device)

    def agree(self, error):
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        super().agree(error)

    def all_reduce_sum(self, t):
        return t if self.world_size == 1 else super().all_reduce_sum(t)


def main(argv=None):
    args = launcher_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = config_from_args(args)
    tc = cfg.train
    if cfg.run.dump_grads:
        raise ConfigError("--dump-grads is written by dit_core's training loop, and launchers/accelerate.py runs "
                          "Accelerate's own loop; dump from launchers/ddp.py or launchers/zero.py, the same backends.")
    resume = resume_point(cfg)                    # the core's preflight: verified, checked, within max_steps
    start, changes, state = resume.start, resume.changes, resume.state
    if cfg.run.resume and (state.get("engine") != "accelerate" or not (Path(cfg.run.resume) / "accelerate").is_dir()):
        raise foreign(Path(cfg.run.resume), state, "launchers/accelerate.py")
    accelerator = make_accelerator(cfg)
    strategy = AccelerateRanks(accelerator)
    if accelerator.num_processes > 1:
        watch_launcher()
    check_batch_split(tc.global_batch_size, accelerator.num_processes, tc.grad_accum)
    Objective.check(cfg, strategy)             # a mixture-of-experts DiT: single.py or moe.py
    check_deepspeed_config(accelerator, cfg)
    folder = RunFolder(cfg)
    strategy.agree(first_error(folder.lock) if strategy.is_main else None)
    use_tf32(accelerator.device, tc.precision)        # fp32 parity runs compare exact float32 math

    torch.manual_seed(tc.seed)                        # same initial weights everywhere
    model = DiT(cfg.model)
    optimizer, scheduler = build_optimizer(model, cfg, accelerator.device)
    data = load_data(cfg, "train", "cpu")
    check_data_fits(cfg, data)
    stream = GlobalBatchStream(tc.seed, tc.global_batch_size, tc.max_steps, data, cfg.diffusion.timesteps,
                               cfg.diffusion.label_dropout, (cfg.model.in_channels, cfg.model.image_size,
                                                             cfg.model.image_size),
                               accelerator.num_processes, tc.grad_accum)
    loader = DataLoader(stream, batch_size=tc.global_batch_size // tc.grad_accum, collate_fn=stack_samples)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema, progress = EMA(accelerator.unwrap_model(model)), Progress()
    accelerator.register_for_checkpointing(ema, progress)
    results = Path(cfg.run.results_dir)
    guard = DivergenceGuard(cfg, results, start, DivergenceGuard.history(state), cfg.run.resume, changes,
                            accelerator.is_main_process)
    weights = lambda: strategy.all_reduce_sum(weight_stats(model.parameters())).tolist()   # noqa: E731
    guard.baseline(weights())                        # the freshly initialised weights' norm

    if starts_from_weights(cfg, state):              # run.init_from: weights only, step 0, a fresh optimizer
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(f"run.init_from='{cfg.run.init_from}' under Accelerate's DeepSpeed plugin would load the "
                              f"weights around DeepSpeed's own copies of them; start from them with deepspeed "
                              f"launchers/zero.py (ZeRO, the same init_from), or Accelerate without DeepSpeed.")
        init = Path(cfg.run.init_from)
        accelerator.unwrap_model(model).load_state_dict(load_ema(init, accelerator.device, name="model.pt"))
        ema.load_state_dict(load_ema(init, accelerator.device))         # every rank the same: replicas stay equal
        guard.check_loaded(weights(), cfg.run.init_from)
    if cfg.run.resume:
        accelerator.load_state(str(Path(cfg.run.resume) / "accelerate"))
        check_finite(accelerator.unwrap_model(model).state_dict(), Path(cfg.run.resume) / "accelerate")
        check_finite(ema.state_dict(), Path(cfg.run.resume) / "accelerate")
        guard.check_loaded(weights(), cfg.run.resume)
        apply_schedule(optimizer.optimizer, scheduler.scheduler, cfg, progress.step)
        loader = accelerator.skip_first_batches(loader, progress.step * tc.grad_accum)
    strategy.agree(first_error(folder.prepare, start) if strategy.is_main else None)
    logger = None
    if accelerator.is_main_process:
        if changes:
            print(f"[resume] from the command line: {'; '.join(changes)}; the schedule is recomputed at step "
                  f"{start} (lr now {scheduler.get_last_lr()[0]:.3g})", file=sys.stderr, flush=True)
        logger = JsonlLogger(folder.log, append=True)

    objective = Objective(cfg, accelerator.device)  # the loss of a micro-batch, as in dit_core's loop
    clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    t0 = time.perf_counter()
    for x0, y, tt, noise, drop in loader:
        with accelerator.accumulate(model):          # no gradient sync until the last micro-step
            if accelerator.sync_gradients:
                lr = scheduler.get_last_lr()[0]      # the rate this step uses (DeepSpeed steps it in backward)
            loss = objective(model, x0, y, tt, noise, drop)
            accelerator.backward(loss)               # divides by the accumulation steps
            if accelerator.sync_gradients:
                # Under DeepSpeed, backward has already clipped and stepped: this returns that step's norm.
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()                         # a no-op on the other micro-steps (and under DeepSpeed)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        if not accelerator.sync_gradients:
            continue
        ema.update(accelerator.unwrap_model(model), tc.ema_decay, progress.step)
        mean_loss = accelerator.reduce(loss_sum / tc.grad_accum, reduction="mean").item()
        loss_sum.zero_()
        progress.samples_seen += tc.global_batch_size
        if accelerator.is_main_process:
            logger.write({"step": progress.step, "loss": mean_loss, "grad_norm": float(grad_norm), "lr": lr,
                          "samples_seen": progress.samples_seen})
            if progress.step % tc.log_every == 0:
                accelerator.print(f"step {progress.step}: loss {mean_loss:.4f}")
        guard.step(progress.step, mean_loss, float(grad_norm), lr)
        guard.weights(weights(), progress.step, lr)
        progress.step += 1
        if tc.ckpt_every and progress.step % tc.ckpt_every == 0 and progress.step != tc.max_steps:
            save(accelerator, results / f"checkpoint-{progress.step}", model, ema, progress, cfg, guard.state())
    seconds = time.perf_counter() - t0
    if progress.step > start or not cfg.run.resume:
        save(accelerator, results / f"checkpoint-{progress.step}", model, ema, progress, cfg, guard.state())
    if logger is not None:
        logger.close()
    folder.release()
    accelerator.print(f"[accelerate, {accelerator.num_processes} x {accelerator.distributed_type.value}] trained to "
                      f"step {progress.step} in {seconds:.1f}s; checkpoint {results / f'checkpoint-{progress.step}'}")
    accelerator.end_training()
    if accelerator.num_processes > 1:
        exit_process(0)


if __name__ == "__main__":
    run_main(main)
