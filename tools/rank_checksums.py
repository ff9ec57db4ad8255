"""Do the ranks of a data-parallel job hold the same weights after training? (chapter 17, "ranks that disagree")

    torchrun --nproc_per_node 2 tools/rank_checksums.py OUT.json \
        "launchers/ddp.py --config configs/tiny.yaml --device cpu --max-steps 10" \
        "launchers/ddp.py --config configs/tiny.yaml --device cpu --max-steps 10 --break broadcast"

Each quoted run is a launcher and its arguments; every rank runs them in order through the launcher's own main(argv)
(as `python -m dit_core.many` does, so a table of runs pays one start-up). After each run every rank hashes its own
parameters (sha256 of their bytes, in the model's order) and sums them (float64), and the ranks gather each other's
parameters, so rank 0 can also write the largest |weight on rank r - weight on rank 0|. OUT.json holds, per run, the
command and one entry per rank. For launchers whose main(argv) returns train()'s result and whose ranks each hold the
whole model (launchers/ddp.py); the sharding strategies' ranks hold different pieces by design.
"""
import gc
import hashlib
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dit_core.many import load  # noqa: E402


def fingerprint(model: torch.nn.Module) -> tuple[str, float, torch.Tensor]:
    """sha256 of every parameter's bytes in order, their float64 sum, and all of them flat (for the differences)."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])    # on the rank's device
    return hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest(), float(flat.double().sum()), flat


def main(argv=None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) < 2:
        raise SystemExit(__doc__)
    out, runs = Path(args[0]), args[1:]
    cache, table = {}, []
    for run in runs:
        script, *rest = shlex.split(run)
        result = load(str(ROOT / script), cache).main(rest)
        digest, total, flat = fingerprint(result.model)
        world = dist.get_world_size()
        flats = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(flats, flat)                    # every rank's weights (NCCL: on the GPU; a few MB here)
        info = [None] * world
        dist.all_gather_object(info, {"sha256": digest, "sum": total})
        table.append({"run": run, "ranks": [{**i, "max_abs_diff_to_rank0": float((f - flats[0]).abs().max())}
                                            for i, f in zip(info, flats)]})
        del result, flats
        gc.collect()
        dist.barrier()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    from dit_core.process import run_main
    from dit_core.parallel.dist import finish

    run_main(lambda argv: main(sys.argv[1:]))
    finish()
