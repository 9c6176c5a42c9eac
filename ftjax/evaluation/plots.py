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
    axes[0][1].set(xlabel="step", ylabel=primary, title=f"{primary} on eval during training")
  for a in axes[0]:
    if best_step is not None:
      a.axvline(best_step, color="grey", linestyle="--", label=f"best step {best_step}")
    a.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.path.basename(path)


def comparison(path: str, systems: dict[str, float], cis: dict[str, list[float]], metric: str) -> str:
  """One bar per system (prompting baselines, fine-tuned) with its bootstrap 95% CI."""
  plt = _pyplot()
  names = list(systems)
  values = [100 * systems[n] for n in names]
  lower = [100 * (systems[n] - cis[n][0]) for n in names]
  upper = [100 * (cis[n][1] - systems[n]) for n in names]
  fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
  colors = ["tab:green" if n == "fine-tuned" else "tab:blue" for n in names]
  ax.bar(names, values, yerr=[lower, upper], capsize=6, color=colors)
  for i, v in enumerate(values):
    ax.text(i, v + 1, f"{v:.1f}", ha="center", va="bottom")
  ax.set(ylabel=f"{metric} (%)", ylim=(0, 105), title=f"{metric} on the eval set, 95% bootstrap CI")
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
