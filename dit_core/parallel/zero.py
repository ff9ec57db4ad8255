"""ZeRO through DeepSpeed: the same training loop, with DeepSpeed's engine doing the optimizer side.

Data parallelism keeps a whole copy of everything on every rank. ZeRO (Zero Redundancy
Optimizer) removes the copies, stage by stage, for N data-parallel ranks and Ψ parameters:

    stage 0   nothing partitioned: plain data parallelism (all-reduce of the gradients)
    stage 1   optimizer state partitioned: each rank updates 1/N of the weights
    stage 2   ... and gradients: reduce-scatter instead of all-reduce, each rank keeps 1/N
    stage 3   ... and the parameters: all-gathered layer by layer for forward and backward

Nothing about the loss changes: every stage computes the same mean gradient of the same
global batch, so every stage must reproduce the single-process loss curve.

`ZeroStrategy` plugs into `dit_core.train.train` like the DDP strategy does; `DeepSpeedEngine`
gives DeepSpeed's engine the members `train` calls (backward, step, EMA, save, load).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config, ConfigError
from ..checkpoint import (CheckpointError, resume_instead, check_archives, foreign, read_training_state, torch_load,
                          write_plain)
from ..engine import EMA, Accumulating, apply_schedule, build_scheduler, ema_decay, weight_stats
from .dist import DistStrategy
from ..checkpoint import convert_main
from .dist import check_batch_split

STAGES = (0, 1, 2, 3)


def check_stage(stage: int) -> None:
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage} is not a ZeRO stage; use 0, 1, 2 or 3.")


# ---------------------------------------------------------------- the DeepSpeed config

def ds_config(cfg: Config, world_size: int, stage: int, persistence_threshold: int | None = None,
              bucket_elements: int | None = None) -> dict:
    """The DeepSpeed config that trains exactly the project config's run."""
    tc = cfg.train
    check_stage(stage)
    check_batch_split(tc.global_batch_size, world_size, tc.grad_accum)
    zero: dict = {"stage": stage}
    if bucket_elements:
        # DeepSpeed's default buckets hold 5e8 elements: 2 GB of fp32 per buffer, whatever the model.
        zero.update(reduce_bucket_size=bucket_elements, allgather_bucket_size=bucket_elements)
        if stage == 3:
            zero.update(stage3_prefetch_bucket_size=bucket_elements)
    if stage == 3 and persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    c = {
        "train_batch_size": tc.global_batch_size,
        "train_micro_batch_size_per_gpu": tc.global_batch_size // (world_size * tc.grad_accum),
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,   # torch AdamW as the client optimizer
        "steps_per_print": 2 ** 31,
    }
    if tc.precision == "bf16":
        c["bf16"] = {"enabled": True}
    elif tc.precision == "fp16":
        c["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return c


_AGREE = {  # DeepSpeed key -> (where it lives in the project config, how to read it from a DS config)
    "train_batch_size": ("train.global_batch_size", lambda c: c.get("train_batch_size")),
    "train_micro_batch_size_per_gpu": ("train.global_batch_size / (world size x train.grad_accum)",
                                       lambda c: c.get("train_micro_batch_size_per_gpu")),
    "gradient_accumulation_steps": ("train.grad_accum", lambda c: c.get("gradient_accumulation_steps")),
    "gradient_clipping": ("train.grad_clip", lambda c: c.get("gradient_clipping")),
    "zero_optimization.stage": ("--stage", lambda c: c.get("zero_optimization", {}).get("stage")),
    "bf16.enabled": ("train.precision", lambda c: c.get("bf16", {}).get("enabled")),
    "fp16.enabled": ("train.precision", lambda c: c.get("fp16", {}).get("enabled")),
}


def merge_user_config(built: dict, path: str | Path) -> dict:
    """A user's DeepSpeed JSON may add anything (buckets, offload, overlap), but the keys that
    decide the math must agree with the project config, or the run is not the run it claims."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config '{path}' does not exist; pass one of configs/ds_zero*.json.")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON ({e.msg} at line {e.lineno}); fix it.") from None
    for key, (ours, read) in _AGREE.items():
        theirs, want = read(user), read(built)
        if key.endswith(".enabled"):
            want = bool(want)    # absent from ours = off
        if theirs is None or theirs == "auto":
            continue
        if theirs != want:
            raise ConfigError(f"DeepSpeed config '{path}' sets {key}={theirs!r} but the project config gives "
                              f"{want!r} ({ours}); make them agree, or write \"auto\" in the JSON.")
    # The user's settings win over our defaults (buckets, offload, ...); "auto" takes ours.
    def merge(ours: dict, theirs: dict) -> dict:
        out = dict(ours)
        for k, v in theirs.items():
            if v == "auto":
                continue
            out[k] = merge(ours[k], v) if isinstance(v, dict) and isinstance(ours.get(k), dict) else v
        return out
    return merge(built, user)


# ---------------------------------------------------------------- EMA under ZeRO-3

class ShardedEMA:
    """Under ZeRO-3 a rank holds only its partition of each weight, so it keeps only that
    partition's moving average: the EMA is sharded like the optimizer state. Gathered for saving."""

    def __init__(self, model: nn.Module):
        self.named = list(model.named_parameters())
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.shadow = [p.ds_tensor.detach().float().clone() for _, p in self.named]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, num_updates: int) -> None:
        d = ema_decay(decay, num_updates)
        for e, (_, p) in zip(self.shadow, self.named):
            e.lerp_(p.ds_tensor.detach().float(), 1 - d)

    def state_dict(self) -> dict:
        """A collective: every rank must call it. Returns the full weights on every rank."""
        out = {}
        for e, (name, p) in zip(self.shadow, self.named):
            parts = [torch.empty_like(e) for _ in range(self.world)]
            dist.all_gather(parts, e)
            out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).clone()
        return out

    def load_state_dict(self, sd: dict) -> None:
        for i, (name, p) in enumerate(self.named):
            n = self.shadow[i].numel()
            full = sd[name].detach().float().flatten().to(self.shadow[i].device)
            full = torch.cat([full, full.new_zeros(n * self.world - full.numel())])
            self.shadow[i] = full[self.rank * n:(self.rank + 1) * n].clone()


# ---------------------------------------------------------------- the engine

def skip_inference_kernel_build() -> None:
    """On a CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce kernel
    (deepspeed_shm_comm) the first time it starts: about 90 s on a 2-core machine, once per machine,
    before the first step. Only DeepSpeed's *inference* all-reduce calls it; training collectives go
    through torch.distributed (gloo) either way. So the build is skipped; nothing else changes."""
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":
        import importlib
        # (by module name: the attribute deepspeed.comm.torch is PyTorch itself, imported by deepspeed.comm)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class DeepSpeedEngine(Accumulating):
    """The members `dit_core.train` calls, on top of `deepspeed.initialize`.

    DeepSpeed counts micro-batches itself: `engine.backward` scales the loss by 1/accumulation,
    and `engine.step()` is called after every micro-batch but only steps at the boundary.
    """

    name = "deepspeed"
    saves_on_every_rank = True
    autocast = "fp32"          # bf16/fp16: DeepSpeed casts the model itself (no autocast)

    def __init__(self, model: nn.Module, strategy: "ZeroStrategy", cfg: Config, device: torch.device):
        import deepspeed

        skip_inference_kernel_build()
        tc = cfg.train
        self.model, self.strategy, self.stage = model, strategy, strategy.stage
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                      weight_decay=tc.weight_decay)
        self.config = ds_config(cfg, strategy.world_size, strategy.stage, strategy.persistence_threshold, strategy.bucket_elements)
        if strategy.ds_config_path:
            self.config = merge_user_config(self.config, strategy.ds_config_path)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, dist_init_required=False,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg))
        self.forward = self.engine
        self.precision, self.cfg = tc.precision, cfg

    def micro_step(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.strategy.broken == "accum-twice":
            # (teaching) the loss divided by the accumulation count by hand, as in a plain PyTorch loop, although
            # engine.backward divides it again: every gradient is `accum` times too small
            loss = loss / self.cfg.train.grad_accum
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()       # only advances DeepSpeed's micro-step counter

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    gradients_are_whole = True       # safe_get_full_grad assembles each one from the partitions

    def named_gradients(self) -> dict:
        """Every parameter's whole fp32 gradient (ZeRO-3: a gather, so every rank calls it)."""
        from deepspeed.utils import safe_get_full_grad
        out = {}
        for n, p in self.model.named_parameters():
            g = safe_get_full_grad(p)
            out[n] = g if g is not None else torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        return out

    def step(self) -> torch.Tensor:
        if self.grad_probe is not None:
            self.grad_probe(self)
        own = None
        if self.stage == 0 and self.precision == "fp32":
            # DeepSpeed clips plain fp32 data parallelism without keeping the norm: take it here,
            # from the all-reduced gradients, as torch's clip_grad_norm_ would.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            own = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.engine.step()           # the boundary: clip, optimizer step, zero grads, LR step
        norm = own if own is not None else self.engine.get_global_grad_norm()
        # a 0-d tensor on the model's device, as every engine's (the loop reads it back with the loss); float64 keeps
        # the number DeepSpeed computed as it is
        return torch.tensor(float(norm) if norm is not None else float("nan"), dtype=torch.float64,
                            device=self.strategy.device)

    def make_ema(self):
        if self.stage == 3:
            return ShardedEMA(self.model)
        ema = EMA(self.model)
        ema.module.float()           # keep the average in fp32 even when the model runs in bf16
        return ema

    def update_ema(self, ema, decay: float, num_updates: int) -> None:
        ema.update(self.model, decay, num_updates)

    def state_info(self) -> dict:
        return {"zero_stage": self.stage, "world_size": self.strategy.world_size, "precision": self.precision}

    def save(self, folder: Path) -> None:
        # DeepSpeed writes folder/ds/: the module (stages 0-2) and one optimizer partition per rank.
        self.engine.save_checkpoint(str(folder), tag="ds")

    def weight_stats(self) -> torch.Tensor:
        """This rank's weights (its partition under ZeRO-3, the whole module otherwise): non-finite, sum of squares."""
        params = list(self.model.parameters())
        return weight_stats([self._owned(p) for p in params] if self.stage == 3 else params)

    @staticmethod
    def _owned(p: torch.Tensor) -> torch.Tensor:
        """The elements of a ZeRO-3 partition that hold weights. DeepSpeed pads every parameter to a multiple of the
        world size and allocates each partition with torch.empty: the last ranks' tails are uninitialised memory,
        which once read as a weight of 1e38 (its square inf) and stopped a healthy run (seen in CI)."""
        import torch.distributed as dist
        size = p.ds_tensor.ds_numel
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None)) if dist.is_initialized() else 0
        valid = max(0, min(size, p.ds_numel - rank * size))
        return p.ds_tensor.narrow(0, 0, valid)

    def load_weights(self, sd: dict) -> None:
        """Into the module (ZeRO-3: gathered, then partitioned again), then into the optimizer's fp32 copy of the
        weights, which DeepSpeed steps from (its partitions of the module's weights, or their masters in bf16/fp16).
        In bf16/fp16 the module is already cast, so the fp32 masters are refreshed from the rounded weights: a start
        about 2^-9 (bf16) away from the checkpoint's fp32 weights, where the other engines start from them exactly."""
        import deepspeed
        gathered = (deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0)
                    if self.stage == 3 else contextlib.nullcontext())
        with gathered, torch.no_grad():
            self.model.load_state_dict(sd)
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def load(self, folder: Path, device: torch.device) -> None:
        state = read_training_state(folder)
        if state.get("engine") != "deepspeed" or not (folder / "ds").is_dir():
            raise foreign(folder, state, "launchers/zero.py")
        want, have = self.state_info(), {k: state.get(k) for k in self.state_info()}
        if want != have:
            diff = "; ".join(f"{k}: checkpoint {have[k]!r} vs now {want[k]!r}" for k in want if want[k] != have[k])
            raise CheckpointError(f"Checkpoint '{folder}' was written by another ZeRO setup ({diff}); "
                                  f"resume with the same stage, world size and precision.")
        check_archives(folder, (folder / "ds").glob("*.pt"))      # every rank alike, before DeepSpeed reads its part
        path, _ = self.engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load '{folder / 'ds'}'; the checkpoint is incomplete.")
        apply_schedule(self.optimizer, self.scheduler, self.cfg, state["step"])


class ZeroStrategy(DistStrategy):
    # (teaching) accum-twice: the loss divided by train.grad_accum before engine.backward, which divides by it again
    BROKEN = ("accum-twice",)

    def __init__(self, env, stage: int, ds_config_path: str | None = None,
                 persistence_threshold: int | None = None, bucket_elements: int | None = None,
                 broken: str | None = None):
        check_stage(stage)
        if broken not in (None, *self.BROKEN):
            raise ConfigError(f"--break {broken} is not one of {', '.join(self.BROKEN)}.")
        self.broken = broken
        self.env, self.stage, self.ds_config_path = env, stage, ds_config_path
        self.persistence_threshold, self.bucket_elements = persistence_threshold, bucket_elements
        super().__init__(env)

    def make_engine(self, model: nn.Module, cfg: Config, device: torch.device) -> DeepSpeedEngine:
        if self.broken == "accum-twice" and cfg.train.grad_accum < 2:
            raise ConfigError("--break accum-twice divides by train.grad_accum=1, which changes nothing; add "
                              "--set train.grad_accum=2 to see it.")
        return DeepSpeedEngine(model, self, cfg, device)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().clone()
        dist.all_reduce(t)
        return t / self.world_size


# ---------------------------------------------------------------- plain weights from a ZeRO checkpoint

def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """A DeepSpeed checkpoint folder -> a plain one (model.pt, ema.pt, training_state.json)
    that `dit_core.evaluate` and sampling read. Stages 1-3 keep the fp32 weights in the
    optimizer partitions: DeepSpeed's own zero_to_fp32 merges them. Stage 0 stores the module."""
    src, dst = Path(src), Path(dst)
    state = read_training_state(src)
    if state.get("engine") != "deepspeed" or not (src / "ds").is_dir():
        raise CheckpointError(f"'{src}' is not a DeepSpeed checkpoint (no ds/ folder); it needs no conversion.")
    if dst.exists():
        raise CheckpointError(f"'{dst}' already exists; pass a new folder to write the plain checkpoint into.")
    check_archives(src, (src / "ds").glob("*.pt"))             # a file cut short (no manifest to tell): named
    try:
        if state.get("zero_stage", 0) == 0:
            sd = torch_load(src / "ds" / "mp_rank_00_model_states.pt", "cpu")["module"]
        else:
            import contextlib
            import io

            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            with contextlib.redirect_stderr(io.StringIO()):       # its progress bar: convert says what it did
                sd = get_fp32_state_dict_from_zero_checkpoint(str(src), tag="ds")
        sd = {k: v.float().contiguous() for k, v in sd.items()}
    except CheckpointError:
        raise
    except Exception as e:             # zero_to_fp32 on a folder missing a partition, or holding a damaged one
        text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        text = f": {text.replace(repr(str(src / 'ds')), 'it')[:150]}" if text else ""
        raise CheckpointError(f"DeepSpeed cannot merge the partitions in '{src / 'ds'}' "
                              f"({e.__class__.__name__}{text}); the checkpoint is incomplete or corrupt: "
                              f"{resume_instead(src)}.") from None
    return write_plain(src, dst, state, sd)


def main(argv=None) -> int:
    return convert_main("python -m dit_core.parallel.zero", "DeepSpeed", convert_checkpoint, argv)


if __name__ == "__main__":
    raise SystemExit(main())
