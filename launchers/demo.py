"""`make demo`: train the tiny DiT on one process, then draw and score its samples.

Writes results/demo/{samples.png, loss.png, log.jsonl, checkpoint-<step>/} for MNIST digits (configs/tiny.yaml,
configs/mnist.yaml); a config of another data source writes to its own run.results_dir (configs/fashion.yaml:
results/fashion). The samples are scored as `python -m dit_core.evaluate` scores them: by a classifier of the source
(MNIST, Fashion-MNIST), or by an Inception FID against the image folder.
"""
import sys
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from dit_core.cli import config_from_args, launcher_parser  # noqa: E402
from dit_core.process import run_main  # noqa: E402
from dit_core.evaluate import evaluate_checkpoint, format_report, grid_order  # noqa: E402
from dit_core.parity import read_jsonl  # noqa: E402
from dit_core.plots import loss_curve, sample_grid  # noqa: E402
from dit_core.rundir import RunFolder  # noqa: E402
from dit_core.train import resolve_device, train  # noqa: E402


def main(argv=None):
    p = launcher_parser(__doc__.splitlines()[0])
    p.add_argument("--n-per-class", type=int, default=100, help="samples per class scored by the classifier")
    args = p.parse_args(argv)
    if args.results_dir is None:                  # MNIST's demo folder, whatever the config says; other data: theirs
        peek = config_from_args(Namespace(**{**vars(args), "resume": None}))
        args.results_dir = "results/demo" if peek.data.source == "mnist" else peek.run.results_dir
    cfg = config_from_args(args)
    out = Path(cfg.run.results_dir)
    device = resolve_device(cfg.run.device)
    print(f"[demo] training {cfg.train.max_steps} steps of a DiT on {device} ({args.config}, data.source="
          f"{cfg.data.source})", flush=True)
    with RunFolder(cfg):                 # the folder stays this demo's while it samples and draws too
        demo(cfg, args, out, device)


def demo(cfg, args, out, device):
    result = train(cfg)
    t0 = time.perf_counter()
    scores, images, labels, _ = evaluate_checkpoint(result.last_checkpoint, args.n_per_class, device)
    sample_grid(images[grid_order(labels, cfg.model.num_classes)].cpu(), out / "samples.png",
                title=f"CFG {cfg.sample.cfg_scale}, EMA weights, {cfg.sample.sampler}")
    log = read_jsonl(cfg.run.log_jsonl or out / "log.jsonl")
    loss_curve({"single process": log}, out / "loss.png")
    print("\n=== demo summary ===")
    print(f"steps           {result.steps} (global batch {cfg.train.global_batch_size}), "
          f"training {result.seconds:.0f}s on {device}")
    print(f"final loss      {log[-1]['loss']:.4f} (mean of last 50 steps "
          f"{sum(r['loss'] for r in log[-50:]) / len(log[-50:]):.4f})")
    print(format_report(scores))
    print(f"evaluation      {time.perf_counter() - t0:.0f}s")
    print(f"files           {out / 'samples.png'}, {out / 'loss.png'}, {out / 'log.jsonl'}, "
          f"{result.last_checkpoint}")


if __name__ == "__main__":
    run_main(main)
