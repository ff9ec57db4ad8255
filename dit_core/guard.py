"""The divergence guard: a run that diverges stops before anything is saved from it, and says which checkpoint is
still safe (non-finite losses, gradients or weights; a loss far above its running level; weights far from their norm at
initialisation). Used by the loop (`train.py`) and by Accelerate's own loop (`launchers/accelerate.py`)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .checkpoint import CheckpointError, checkpoint_steps, read_training_state, resume_instead
from .config import Config
from .errors import DivergenceError


class DivergenceGuard:
    """Stops a diverging run before anything is saved from it, and says which checkpoint is still safe.

    Non-finite: fp32 and bf16 stop at the first non-finite loss or gradient norm (the step it produced would put
    NaN into the weights). fp16: the loss scaler skips a step whose gradients overflow and halves its scale, so a
    few skipped steps are the scaler working; `train.max_nonfinite_steps` skipped steps in a row mean no scale
    helps any more. Any non-finite weight stops every precision.

    Finite but diverged, as users meet it: a loss above `train.diverge_loss` times its running level (the median
    of the last WINDOW finite losses, checked once SETTLE are known, so the first steps' fall is not judged), or
    weights whose norm is above `train.diverge_weights` times their norm at initialisation.

    Where it began: walking back from the step that stopped the run while the loss stays above CLIMB x the level
    gives the first step of the climb, s. The loss at step s was computed with checkpoint-s's weights, so the
    checkpoints from s on are unsafe: they are renamed diverged-checkpoint-N (kept for a look, never resumed by
    --resume auto) and the message names the last one before s. The last WINDOW losses travel in each checkpoint
    (training_state.json), so a resumed run judges its first steps against the level before it."""

    WINDOW, SETTLE, CLIMB = 50, 20, 2.0

    def __init__(self, cfg: Config, results_dir: Path, start: int = 0, history=(), resumed: str = "",
                 changes=(), is_main: bool = True):
        self.tc, self.results = cfg.train, Path(results_dir)
        self.allowed = self.tc.max_nonfinite_steps if self.tc.precision == "fp16" else 1
        self.run_of: list[int] = []
        self.losses: list[tuple[int, float]] = [(int(s), float(v)) for s, v in history][-self.WINDOW:]
        self.start, self.resumed, self.is_main = start, resumed, is_main
        self.lr_changed = any(c.startswith(("train.lr ", "train.warmup_steps ")) for c in changes)
        self.norm0 = None                # the weights' norm at initialisation (all ranks' pieces)

    # ---------------------------------------------------------------- what a checkpoint carries
    def state(self) -> dict:
        return {"recent_losses": [[s, v] for s, v in self.losses[-self.WINDOW:]]}

    @staticmethod
    def history(training_state: dict) -> list:
        got = (training_state.get("guard") or {}).get("recent_losses") or []
        return [(s, v) for s, v in got if isinstance(s, int) and isinstance(v, (int, float))]

    # ---------------------------------------------------------------- the weights
    def baseline(self, stats) -> None:
        """`stats`: weight_stats of the freshly initialised model, summed over ranks."""
        sq = float(stats[1])
        self.norm0 = math.sqrt(sq) if sq > 0 else None

    def ratio(self, stats) -> float | None:
        if self.norm0 is None:
            return None
        return math.sqrt(max(float(stats[1]), 0.0)) / self.norm0 if math.isfinite(float(stats[1])) else math.inf

    def check_loaded(self, stats, path: str) -> None:
        """A checkpoint whose weights are non-finite, or far from any healthy run's, is refused before training."""
        folder = Path(path)
        earlier = [n for n in checkpoint_steps(folder.parent) if n < read_training_state(folder)["step"]]

        def instead() -> str:
            return (f"resume from the checkpoint before it, '{folder.parent / f'checkpoint-{earlier[-1]}'}'" if earlier
                    else f"no earlier checkpoint is in '{folder.parent}': start the run again, with a lower train.lr")
        if float(stats[0]) > 0:
            raise CheckpointError(f"Checkpoint '{path}' holds {int(float(stats[0]))} non-finite weights: the run "
                                  f"that wrote it had diverged (or the file was damaged); {instead()}.")
        r, k = self.ratio(stats), self.tc.diverge_weights
        if k and r is not None and r > k:
            raise CheckpointError(f"Checkpoint '{path}' holds weights whose norm is {r:.3g} x a freshly initialised "
                                  f"model's (train.diverge_weights={k:g}; healthy runs stay within a few times): the "
                                  f"run that wrote it had diverged; {instead()}.")

    def weights(self, stats, step: int, lr: float) -> None:
        bad = float(stats[0])
        if bad > 0:
            raise self._stop(f"{int(bad)} weights became non-finite by step {step}", step + 1, lr, finite=False)
        r, k = self.ratio(stats), self.tc.diverge_weights
        if k and r is not None and r > k:
            raise self._stop(f"the weights' norm grew to {r:.3g} x its value at initialisation by step {step} "
                             f"(train.diverge_weights={k:g})", step + 1, lr)

    # ---------------------------------------------------------------- the loss
    def step(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.run_of.append(step)
            if len(self.run_of) >= self.allowed:
                what = (f"the {'loss' if not math.isfinite(loss) else 'gradient norm'} became "
                        f"{loss if not math.isfinite(loss) else grad_norm} at step {step}" if self.allowed == 1 else
                        f"the fp16 loss scaler skipped {len(self.run_of)} steps in a row (non-finite loss or "
                        f"gradients at steps {self.run_of[0]}-{step}; train.max_nonfinite_steps={self.allowed})")
                raise self._stop(what, self.run_of[0], lr, finite=False)
            return
        self.run_of.clear()
        k = self.tc.diverge_loss
        if k and len(self.losses) >= self.SETTLE:
            level = self._level()
            if level > 0 and loss > k * level:
                raise self._stop(f"the loss was {loss:.3g} at step {step}, {loss / level:.3g} x its running level "
                                 f"{level:.3g} (the median of the last {min(len(self.losses), self.WINDOW)} steps; "
                                 f"train.diverge_loss={k:g})", step, lr)
        self.losses.append((step, loss))
        del self.losses[:-4 * self.WINDOW]      # enough to walk back a climb; a checkpoint keeps WINDOW

    def _level(self, upto: int | None = None) -> float:
        """The running level: the median of the last WINDOW finite losses (before index `upto`)."""
        past = self.losses[:upto] if upto is not None else self.losses
        return statistics.median(v for _, v in past[-self.WINDOW:])

    def _onset(self, first_bad: int) -> int:
        """The first step of the climb that ends at `first_bad`: walking back, each loss above CLIMB x the level
        of the steps before it belongs to the climb. Without SETTLE steps before it, a step is not judged."""
        onset = first_bad
        for i in range(len(self.losses) - 1, self.SETTLE - 1, -1):
            s, v = self.losses[i]
            if s >= first_bad:
                continue
            if v > self.CLIMB * self._level(i):
                onset = s
            else:
                break
        return onset

    # ---------------------------------------------------------------- the sentence
    def _stop(self, what: str, first_bad: int, lr: float, finite: bool = True) -> DivergenceError:
        """`first_bad`: the lowest checkpoint index whose weights are known bad (a loss at step s used
        checkpoint-s's weights; weights wrong after step s are checkpoint-(s+1)'s)."""
        tc = self.tc
        onset = self._onset(first_bad)
        unsafe = [n for n in _steps(self.results, "checkpoint-", "diverged-checkpoint-") if n >= onset]
        if self.is_main:
            _set_aside(self.results, unsafe)
        kept = [n for n in checkpoint_steps(self.results) if n < onset]
        began = f"the loss began to climb at step {onset}" if onset < first_bad else f"step {first_bad}"
        if kept:
            after = f"resume from {self.results / f'checkpoint-{kept[-1]}'}, the last written before {began}"
        else:
            after = f"start again: no checkpoint was written before {began}"
        if unsafe:
            after += (f" (checkpoint-{', checkpoint-'.join(map(str, unsafe))}, written after it, "
                      f"{'is' if len(unsafe) == 1 else 'are'} renamed diverged-checkpoint-N and never resumed)")
        if not finite and self.resumed and first_bad <= self.start + 1 and not self.lr_changed:
            # the same rate trained this run healthily up to the checkpoint: the checkpoint is the suspect
            return DivergenceError(f"{what}, the first step after resuming from '{self.resumed}' at the rate that "
                                   f"run trained with, so that checkpoint (its weights or optimizer state) is the "
                                   f"likely cause, not the learning rate; {resume_instead(Path(self.resumed))}.")
        fix = (f"lower train.lr (the rate at that step was {lr:.3g}, train.lr={tc.lr:g})" if tc.grad_clip > 0 else
               f"turn on clipping (train.grad_clip=0 now, e.g. --set train.grad_clip=1.0) or lower train.lr "
               f"(the rate at that step was {lr:.3g})")
        return DivergenceError(f"{what}, in {tc.precision} with train.grad_clip={tc.grad_clip:g}; the run stopped and "
                               f"saved nothing from it: {fix}, then {after}.")


def _steps(results: Path, *prefixes: str) -> list[int]:
    """The steps of the folders in `results` named <prefix><step>."""
    if not results.is_dir():
        return []
    return sorted({int(p.name[len(pre):]) for p in results.iterdir() for pre in prefixes
                   if p.is_dir() and p.name.startswith(pre) and p.name[len(pre):].isdigit()})


def _set_aside(results: Path, steps: list[int]) -> None:
    """Rename checkpoint-N to diverged-checkpoint-N (rank 0, holding the folder's lock): kept for a look, never
    picked by --resume auto nor mistaken for a healthy state."""
    for n in steps:
        try:
            (results / f"checkpoint-{n}").rename(results / f"diverged-checkpoint-{n}")
        except OSError:
            pass                        # gone already, or a read-only folder: the sentence still names them
