"""Did fine-tuning pay off? Metrics fixed in the config, prompting baselines, forgetting,
overfitting, leakage, and the report (`python -m ftjax.evaluate`).

  metrics.py     the metric registry and the eval block's validation
  generation.py  EvalPlan: eval set + references + shots (checked), greedy answers, scores
  stats.py       paired bootstrap CIs and the verdict in words
  forgetting.py  general-text perplexity and general prompts, before / after
  harness.py     lm-evaluation-harness tasks (eval.lm_eval_tasks), base vs fine-tuned
  curves.py      metrics.jsonl curves, the overfitting warning, early stopping
  report.py      report.json, report.md and the PNGs (plots.py)
"""

from __future__ import annotations

import math

import numpy as np

from ftjax.data.quality import leakage
from ftjax.evaluation import forgetting, harness, metrics, report
from ftjax.evaluation.generation import EvalPlan, few_shot_prompt, split

__all__ = ["EvalPlan", "few_shot_prompt", "split", "metrics", "report", "forgetting", "harness",
           "run_baselines", "assemble", "leakage_summary", "loss_metrics", "model_loss"]


def run_baselines(plan: EvalPlan, base_model, tokenizer) -> dict:
  """{baseline name: {"scores", "predictions", "examples"}} of the base model, each prompting
  style on the same eval examples."""
  return {name: plan.run(base_model, tokenizer, name, build) for name, build in plan.systems().items()}


def loss_metrics(loss: float, token_accuracy: float) -> dict:
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": token_accuracy}


def model_loss(model, dataset, batch_size: int, loss_fn=None, means: bool = False) -> dict:
  """Loss metrics of any model (e.g. the base, adapters disabled) on a Dataset's batches.

  loss_fn: a step loss (ftjax.objectives; default the causal-LM loss); means=True returns every
  sum it reports divided by the count ("loss" for loss_sum) instead of SFT's loss metrics."""
  import functools
  from flax import nnx
  import jax
  import jax.numpy as jnp
  graphdef, state = nnx.split(model)
  sums_fn = forgetting._sums if loss_fn is None else jax.jit(functools.partial(_loss_sums, loss_fn), static_argnums=0)
  total: dict = {}
  for batch in dataset.batches(batch_size, shuffle=False, repeat=False):
    out = sums_fn(graphdef, state, jax.tree.map(jnp.asarray, batch))
    total = {k: total.get(k, 0.0) + float(v) for k, v in out.items()}
  count = max(total.pop("count", 0.0), 1.0)
  if means:
    out = {k: v / count for k, v in total.items()}
    out["loss"] = out.pop("loss_sum")
    return out
  return loss_metrics(total["loss_sum"] / count, total["accuracy"] / count)


def _loss_sums(loss_fn, graphdef, state, batch):
  from flax import nnx
  model = nnx.merge(graphdef, state)
  model.eval()
  return loss_fn(model, batch, None)


def leakage_summary(train_examples, eval_examples, threshold: float) -> dict:
  """ftjax.data.quality.leakage of train vs eval, counted as in data_report.json."""
  pairs = leakage(train_examples, eval_examples, threshold=threshold)
  return {"pairs": len(pairs), "exact": sum(p["kind"] == "exact" for p in pairs),
          "near": sum(p["kind"] == "near" for p in pairs),
          "eval_examples": len({p["eval"] for p in pairs}), "threshold": threshold,
          "listed": pairs[:20]}


def assemble(plan: EvalPlan | None, primary: str, baselines: dict, finetuned: dict | None = None, *,
             loss: dict | None = None, forgetting_result: dict | None = None,
             training: dict | None = None, leakage: dict | None = None, eval_cfg=None) -> dict:
  """The results a report is written from (eval_results.json); plan None: no generation."""
  cfg = plan.eval_cfg if plan is not None else eval_cfg
  out = {"primary": primary, "metric_names": metrics.split_names(cfg.metrics),
         "normalize": cfg.normalize, "examples": 0, "shots": [], "sources": [], "inputs": [],
         "references": [], "baselines": baselines, "finetuned": finetuned,
         "resamples": cfg.bootstrap, "loss": loss or {}, "forgetting": forgetting_result,
         "training": training or {}, "leakage": leakage, "ci95": {}, "finetuned_minus": {},
         "verdict": None}
  if plan is not None:
    out.update(examples=len(plan.references), shots=plan.shot_sources,
               sources=[ex.where for ex in plan.examples],
               inputs=[p[-1]["content"] for p in plan.prompts], references=plan.references)
    out.update(report.compare(plan, baselines, finetuned, primary, cfg.bootstrap))
    if {"label_accuracy", "macro_f1"} & set(plan.metrics):
      systems = dict(baselines, **({report.FINETUNED: finetuned} if finetuned else {}))
      out["confusion"] = {name: confusion_summary(r["predictions"], plan.references, plan.options)
                          for name, r in systems.items()}
  return _plain(out)


def confusion_summary(predictions, references, options, top: int = 10) -> dict:
  """Per-label recall (the `top` most frequent labels) and the `top` most frequent mistakes."""
  table = metrics.confusion(predictions, references, options)
  recall = {label: table["pairs"][(label, label)] / n for label, n in table["labels"].most_common(top)}
  mistakes = [[r, p, n] for (r, p), n in table["pairs"].most_common() if r != p][:top]
  return {"labels": len(table["labels"]), "recall": recall, "mistakes": mistakes}




def _plain(x):
  """numpy scalars -> Python numbers, for JSON."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x
