"""Fine-tuned vs each prompting baseline: paired bootstrap 95% CIs and the verdict in words.

Paired: every resample draws the same eval examples for both systems, so the interval is that of
the *difference* on this eval set, narrower than two independent intervals would suggest.
"""

from __future__ import annotations

import numpy as np

from ftjax.evaluation.metrics import Metric, Options


def paired_bootstrap(metric: Metric, predictions_a, predictions_b, references, options: Options,
                     resamples: int = 1000, seed: int = 0) -> dict:
  """score(a) - score(b) and its percentile 95% CI over `resamples` resamples of the examples."""
  n = len(references)
  idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
  diff = metric.score(predictions_a, references, options) - metric.score(predictions_b, references, options)
  if metric.corpus is None:  # a mean of per-example scores: vectorised
    a = metric.per_example_scores(predictions_a, references, options)
    b = metric.per_example_scores(predictions_b, references, options)
    diffs = (a - b)[idx].mean(axis=1)
  else:
    take = lambda xs, rows: [xs[i] for i in rows]
    diffs = np.array([metric.score(take(predictions_a, r), take(references, r), options)
                      - metric.score(take(predictions_b, r), take(references, r), options)
                      for r in idx])
  lo, hi = np.percentile(diffs, [2.5, 97.5])
  return {"difference": float(diff), "ci95": [float(lo), float(hi)], "resamples": resamples}


def verdict(primary: str, finetuned: float, baselines: dict[str, float], comparison: dict) -> dict:
  """The verdict on the primary metric against the best prompting baseline.

  comparison: {baseline name: paired_bootstrap result of fine-tuned minus that baseline}.
  "finetuning_pays_off": the CI lies above 0; "prompting_suffices": it includes 0 (prompting is
  within the interval and cheaper) or lies below (prompting is better).
  """
  best = max(baselines, key=baselines.get)
  c = comparison[best]
  lo, hi = c["ci95"]
  points = lambda x: f"{100 * x:+.1f}"
  ci = f"[{points(lo)}, {points(hi)}]"
  if lo > 0:
    kind = "finetuning_pays_off"
    text = (f"Fine-tuning adds {100 * c['difference']:.1f} points of {primary} over the best "
            f"prompting baseline ({best}, {baselines[best]:.1%}), 95% CI {ci}.")
  elif hi < 0:
    kind = "prompting_suffices"
    text = (f"Prompting suffices: the best prompting baseline ({best}, {baselines[best]:.1%}) "
            f"beats the fine-tuned model ({finetuned:.1%}) on {primary} by "
            f"{-100 * c['difference']:.1f} points, 95% CI of fine-tuned minus baseline {ci}.")
  else:
    kind = "prompting_suffices"
    text = (f"Prompting suffices: the best prompting baseline ({best}, {baselines[best]:.1%}) is "
            f"within the interval of the fine-tuned model ({finetuned:.1%}) on {primary} "
            f"(difference {points(c['difference'])} points, 95% CI {ci}) and is the cheaper choice.")
  return {"kind": kind, "best_baseline": best, "text": text}


def bootstrap_ci(metric: Metric, predictions, references, options: Options, resamples: int = 1000,
                 seed: int = 0) -> list[float]:
  """Percentile 95% CI of one system's score (the error bars of the report's bar chart)."""
  n = len(references)
  idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
  if metric.corpus is None:
    values = metric.per_example_scores(predictions, references, options)[idx].mean(axis=1)
  else:
    values = np.array([metric.score([predictions[i] for i in r], [references[i] for i in r], options)
                       for r in idx])
  return [float(v) for v in np.percentile(values, [2.5, 97.5])]
