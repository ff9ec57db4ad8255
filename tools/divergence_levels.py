"""How far healthy and diverging runs move the two measures of the divergence guard (docs/results.md, issue 36).

    python tools/divergence_levels.py [--steps 2000] [--short 600] [--out levels.json]

For each run: the largest ratio of the weights' norm to its value at initialisation (read by a hook after every step)
and the largest ratio of a step's loss to the median of the 50 before it, from step 20 on (the guard's rule, with
train.diverge_loss and train.diverge_weights off so that nothing stops the runs). One thread, on the CPU.
"""
import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dit_core.config import load_config  # noqa: E402
from dit_core.strategy import TrainHooks  # noqa: E402
from dit_core.logs import read_jsonl  # noqa: E402
from dit_core.train import train  # noqa: E402

SMALL = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2}


class Norms(TrainHooks):
    def __init__(self):
        self.start, self.ratios = None, []

    @staticmethod
    def norm(engine) -> float:
        return math.sqrt(sum(float(p.detach().double().square().sum()) for p in engine.params))

    def step_begin(self, step, engine):
        if self.start is None:
            self.start = self.norm(engine)

    def step_end(self, step, engine):
        self.ratios.append(self.norm(engine) / self.start)


def loss_ratio(losses: list[float]) -> float | None:
    worst = [v / statistics.median(losses[max(0, i - 50):i]) for i, v in enumerate(losses) if i >= 20]
    return max(worst) if worst else None


def run(name: str, over: dict, folder: Path) -> dict:
    over = dict(over, **{"run.results_dir": str(folder / name), "run.device": "cpu", "train.tensorboard": False,
                         "train.diverge_loss": 0, "train.diverge_weights": 0})
    hook = Norms()
    train(load_config("configs/tiny.yaml", over), quiet=True, hooks=hook)
    losses = [r["loss"] for r in read_jsonl(folder / name / "log.jsonl")]
    out = {"run": name, "weights_ratio_max": max(hook.ratios), "loss_ratio_max": loss_ratio(losses),
           "loss_max": max(losses)}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="steps of the configs/tiny.yaml run")
    p.add_argument("--short", type=int, default=600, help="steps of each batch-1 and batch-2 run")
    p.add_argument("--out", help="write the rows here (JSON)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows.append(run("tiny", {"train.max_steps": a.steps}, folder))
        for warm in (8, 0):
            rows.append(run(f"lr0.1-warmup{warm}", dict(SMALL, **{
                "train.train_subset": 2048, "train.global_batch_size": 32, "train.max_steps": 24,
                "train.warmup_steps": warm, "train.lr": 0.1, "diffusion.objective": "eps"}), folder))
        rows.append(run("lr1e3", {"train.max_steps": 3, "train.warmup_steps": 0, "train.lr": 1e3}, folder))
        for batch in (1, 2):
            for obj in ("eps", "v", "x0", "flow"):
                rows.append(run(f"batch{batch}-{obj}", dict(SMALL, **{
                    "train.global_batch_size": batch, "train.max_steps": a.short, "diffusion.objective": obj,
                    "sample.sampler": "euler" if obj == "flow" else "ddim"}), folder))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
