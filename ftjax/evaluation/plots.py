"""The report's PNGs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def curves(path: str, curves: dict, primary: str, best_step: int | None) -> str | None:
  """Train vs eval loss over steps, and the primary metric at each periodic eval."""
  if "train/loss" not in curves:
    return None
  plt = _pyplot()
  extra = f"eval/{primary}" if f"eval/{primary}" in curves and primary != "loss" else None
  fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(11 if extra else 6, 4), squeeze=False)
  ax = axes[0][0]
  for key, style in (("train/loss", "-"), ("eval/loss", "o-")):
    if key in curves:
      steps, values = zip(*curves[key])
      ax.plot(steps, values, style, label=key)
  ax.set(xlabel="step", ylabel="loss (answer tokens)", title="train vs eval loss")
  if extra:
    steps, values = zip(*curves[extra])
    axes[0][1].plot(steps, values, "o-", color="tab:green", label=extra)
    axes[0][1].set(xlabel="step", ylabel=primary,
                   title=f"{primary} during training (first eval.periodic_examples)")
  for a in axes[0]:
    if best_step is not None:
      a.axvline(best_step, color="grey", linestyle="--", label=f"best step {best_step}")
    a.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.path.basename(path)


def comparison(path: str, systems: dict[str, dict], cis: dict[str, dict], metrics: list[str]) -> str:
  """Bars per metric, one per system (prompting baselines, fine-tuned), each with its bootstrap
  95% CI."""
  import numpy as np
  plt = _pyplot()
  names = list(systems)
  width = 0.8 / len(names)
  fig, ax = plt.subplots(figsize=(min(12, max(6, 0.5 * len(metrics) * len(names) + 2)), 4.5))
  x = np.arange(len(metrics))
  for k, name in enumerate(names):
    values = np.array([100 * systems[name][m] for m in metrics])
    err = np.array([[100 * systems[name][m] - 100 * cis[name][m][0] for m in metrics],
                    [100 * cis[name][m][1] - 100 * systems[name][m] for m in metrics]])
    pos = x + (k - (len(names) - 1) / 2) * width
    ax.bar(pos, values, width, yerr=np.maximum(err, 0), capsize=4, label=name,
           color="tab:green" if name == "fine-tuned" else None)
    for px, v, top in zip(pos, values, values + np.maximum(err[1], 0)):
      ax.text(px, top + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=8)  # above the CI bar
  ax.set_xticks(x, metrics)
  ax.set(ylabel="score (%)", ylim=(0, 110), title="prompting baselines vs fine-tuned, 95% bootstrap CI")
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.path.basename(path)


def forgetting(path: str, result: dict) -> str:
  """Perplexity on the general text before and after fine-tuning, and the flag threshold."""
  plt = _pyplot()
  before, after = result["perplexity_before"], result["perplexity_after"]
  fig, ax = plt.subplots(figsize=(4.5, 4))
  ax.bar(["base", "fine-tuned"], [before, after],
         color=["tab:blue", "tab:red" if result["flagged"] else "tab:green"])
  ax.axhline(before * (1 + result["threshold"]), color="grey", linestyle="--",
             label=f"flag above +{result['threshold']:.0%}")
  for i, v in enumerate((before, after)):
    ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
  ax.set(ylabel="perplexity", title=f"general text perplexity ({result['relative_change']:+.1%})")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.path.basename(path)


def rewards(path: str, curves: dict) -> str | None:
  """GRPO: the mean reward of each step's rollouts over steps, each reward function's mean
  beside it, and a moving average over a fifth of the steps (one step's mean is that of a few
  prompts, noisy)."""
  import numpy as np
  if "train/reward" not in curves:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  steps, values = (np.asarray(v) for v in zip(*curves["train/reward"]))
  ax.plot(steps, values, ".-", alpha=0.5, label="train/reward")
  window = max(1, len(values) // 5)
  if window > 1:
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, "-", linewidth=2.5, color="tab:blue",
            label=f"train/reward, mean of {window} steps")
  for key in sorted(k for k in curves if k.startswith("train/rewards/")):
    s, v = zip(*curves[key])
    ax.plot(s, v, "--", alpha=0.7, label=key)
  ax.set(xlabel="step", ylabel="mean reward of the step's completions", title="GRPO reward over steps")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.path.basename(path)


CONFUSION_TOP = 20  # classes drawn by name; the rest are summed into one "other" row / column
OTHER = "(other)"
UNMAPPED = "(unmapped)"


def confusion_classes(references: list[str], predictions: list[str], top: int = CONFUSION_TOP) -> list[str]:
  """The classes a confusion matrix names: all of them when they are at most `top`, else the
  `top` most confused (wrong answers as true or as predicted class), ties by name."""
  names = sorted(set(references) | set(predictions))
  if len(names) <= top:
    return names
  wrong = {}
  for r, p in zip(references, predictions):
    if r != p:
      wrong[r] = wrong.get(r, 0) + 1
      wrong[p] = wrong.get(p, 0) + 1
  return sorted(sorted(names, key=lambda n: (-wrong.get(n, 0), n))[:top])


def confusion_counts(references: list[str], predictions: list[str], classes: list[str]):
  """[n, n] counts (rows true, columns predicted) over `classes`, plus one row / column OTHER
  summing the rest when they are not every class."""
  import numpy as np
  rest = bool((set(references) | set(predictions)) - set(classes))
  labels = list(classes) + ([OTHER] if rest else [])
  index = {c: i for i, c in enumerate(classes)}
  counts = np.zeros((len(labels), len(labels)), np.int64)
  for r, p in zip(references, predictions):
    counts[index.get(r, len(classes)), index.get(p, len(classes))] += 1
  return labels, counts


def confusion_matrix(path: str, references: list[str], predictions: list[str],
                     title: str = "fine-tuned model", top: int = CONFUSION_TOP) -> str:
  """The confusion matrix of one system's labels (rows true, columns predicted), counts in the
  cells; with more than `top` classes, the `top` most confused and the rest summed."""
  plt = _pyplot()
  predictions = [p or UNMAPPED for p in predictions]  # "": an answer that named no class
  labels, counts = confusion_counts(references, predictions,
                                    confusion_classes(references, predictions, top))
  size = min(14, 3 + 0.45 * len(labels))
  fig, ax = plt.subplots(figsize=(size + 1, size))
  image = ax.imshow(counts, cmap="Blues")
  ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
  ax.set_yticks(range(len(labels)), labels, fontsize=8)
  for i in range(len(labels)):
    for j in range(len(labels)):
      if counts[i, j]:
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                color="white" if counts[i, j] > counts.max() / 2 else "black")
  shown = "" if OTHER not in labels else f", {top} most confused classes, the rest as {OTHER}"
  ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix, {title}{shown}")
  fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.path.basename(path)
