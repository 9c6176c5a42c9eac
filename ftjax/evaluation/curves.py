"""Training curves from metrics.jsonl, the overfitting warning, and early stopping."""

from __future__ import annotations

import json
import os


def read_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{"train/loss": [(step, value), ...], "eval/loss": ..., ...} from WORKDIR/metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  curves: dict[str, list] = {}
  if not os.path.exists(path):
    return curves
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        for key, value in row.items():
          if key != "step":
            curves.setdefault(key, []).append((row["step"], value))
  return {k: sorted(v) for k, v in curves.items()}


def overfitting_warnings(train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> list[str]:
  """A warning at each eval where the eval loss rose and the eval - train gap grew since the
  previous eval: the model fits the train set better while generalising worse. The train loss
  at an eval is the last one logged at or before its step."""
  out, prev = [], None
  for step, eval_loss in evals:
    logged = [v for s, v in train if s <= step]
    if not logged:
      continue
    gap = eval_loss - logged[-1]
    if prev is not None and eval_loss > prev[1] and gap > prev[2]:
      out.append(f"step {step}: eval loss rose {prev[1]:.4f} -> {eval_loss:.4f} while the "
                 f"train/eval gap grew {prev[2]:.4f} -> {gap:.4f}: overfitting")
    prev = (step, eval_loss, gap)
  return out


class EarlyStopping:
  """Tracks the primary metric at each periodic eval: the best step, and whether `patience`
  evals in a row brought no improvement (patience 0: never stop)."""

  def __init__(self, higher_is_better: bool, patience: int = 0, best: float | None = None,
               best_step: int | None = None):
    self.higher_is_better, self.patience = higher_is_better, patience
    self.best, self.best_step, self.bad_evals = best, best_step, 0

  def update(self, step: int, value: float) -> bool:
    """Records `value`; True when it is a new best."""
    better = self.best is None or (value > self.best if self.higher_is_better else value < self.best)
    if better:
      self.best, self.best_step, self.bad_evals = value, step, 0
    else:
      self.bad_evals += 1
    return better

  @property
  def should_stop(self) -> bool:
    return bool(self.patience) and self.bad_evals >= self.patience
