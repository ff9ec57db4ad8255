"""Pipeline checks inside one torchrun job of 2 ranks (CPU, gloo), written to a JSON file for
tests/test_pipeline.py: the gradients of one step under GPipe and 1F1B by hand, under torch's
PipelineStage schedules, and of the single-process DiT, all on the same batch; per schedule and stage, the
micro-batches in flight (the executor's count), the bytes autograd saved for backward (measured) and the bytes sent."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import PARITY, launcher_flags, perturbed_dit  # noqa: E402
from dit_core.batch import global_batch, shard  # noqa: E402
from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.data import load_mnist  # noqa: E402
from dit_core.diffusion import Diffusion  # noqa: E402
from dit_core.objective import MicroBatchLoss, Objective  # noqa: E402
from dit_core.parallel.dist import finish, init_from_env  # noqa: E402
from dit_core.parallel.pipeline_train import PipelineEngine, PipelineStrategy, TorchPipelineEngine  # noqa: E402
from dit_core.train import TrainHooks  # noqa: E402

M = 4


perturbed = perturbed_dit


def grads_of(engine) -> dict:
    return {engine.stage.global_name(n): p.grad.clone() for n, p in engine.stage.named_parameters()}


def main(out: str) -> None:
    env = init_from_env("cpu")
    args = launcher_parser("checks").parse_args(launcher_flags(1, **PARITY) + ["--results-dir", "/tmp/unused"])
    cfg = config_from_args(args)
    data = load_mnist("train", "cpu", cfg.train.train_subset)
    gb = global_batch(0, 0, 16, len(data), cfg.diffusion.timesteps, cfg.diffusion.label_dropout, (1, 28, 28))
    b = shard(gb, 0, 1, 0, 1)
    x0, y = data.gather(b.indices)
    diffusion = Diffusion(cfg.diffusion)
    result = {}

    deep = config_from_args(launcher_parser("checks").parse_args(launcher_flags(1, **PARITY, **{"model.depth": 4}) +
                                                                 ["--results-dir", "/tmp/unused"]))
    refs = {}
    for chunks, c in ((1, cfg), (2, deep)):                 # the single-process gradient of the same batch
        full = perturbed(c)
        diffusion.loss(full, x0, y, b.t, b.noise, b.drop).backward()
        refs[chunks] = {n: p.grad for n, p in full.named_parameters()}
    result["smallest_gradient_norm"] = min(g.norm().item() for r in refs.values() for g in r.values())

    for impl in ("hand", "torch"):
        for name, chunks in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
            c = cfg if chunks == 1 else deep
            strategy = PipelineStrategy(env, 2, M, name, chunks=chunks)
            model = perturbed(c)
            engine = (TorchPipelineEngine if impl == "torch" else PipelineEngine)(model, strategy, c, torch.device("cpu"))
            # the loss the loop hands every engine: the pipeline's stages use its objective's pieces
            engine.run_step(0, [(x0, y, b)], MicroBatchLoss(strategy, Objective(c, "cpu"), engine.forward), TrainHooks())
            g = grads_of(engine)
            ref = refs[chunks]
            ex = engine.executor
            mine = {"worst_vs_single": max((g[k] - ref[k]).abs().max().item() for k in g), "params": sorted(g),
                    "peak_in_flight": ex.peak_in_flight, "peak_saved_bytes": ex.peak_saved_bytes,
                    "bytes_sent": ex.bytes_sent}
            parts = [None, None]
            dist.all_gather_object(parts, mine)            # one entry per stage
            result[f"{impl}_{name}"] = parts
    result["all_params"] = sorted(refs[1])
    result["all_params_deep"] = sorted(refs[2])
    if env.rank == 0:
        result["rank"] = 0
        Path(out).write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    finish()
