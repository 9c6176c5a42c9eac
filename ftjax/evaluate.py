"""Evaluation of a run, and `python -m ftjax.evaluate`.

  python -m ftjax.evaluate --workdir DIR
      (re)writes DIR/report.md, report.json and PNGs from a training run's folder (training
      writes them at its end too).
  python -m ftjax.evaluate --model M --data eval.jsonl [--shots train.jsonl] --few-shot 3 --output DIR
      evaluates prompting alone (zero-shot, k-shot, optionally --template), before anyone trains,
      into the same report files.

The pieces live in ftjax/evaluation; this module joins them for train.py and the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from ftjax import config as config_lib
from ftjax import evaluation, export, objectives, peft
from ftjax.errors import FtjaxError, cli_errors, setup_logging
from ftjax.evaluation import baseline_cache, forgetting
from ftjax.evaluation.baseline_cache import baseline_matches  # noqa: F401 (train uses it)
from ftjax.evaluation.generation import EvalPlan, few_shot_prompt, split  # noqa: F401 (API)
from ftjax.files import write_json
from ftjax.lock import hold_workdir
from ftjax.models import load

log = logging.getLogger("ftjax.evaluate")


def plan_for_run(cfg) -> EvalPlan:
  """The run's EvalPlan: eval split, references and few-shot pool, checked (FtjaxError) before
  anything compiles."""
  return objectives.get(cfg).eval_plan()


def base_model_eval(run, plan: EvalPlan) -> dict:
  """The base model (adapters disabled), before training: each prompting baseline, the eval
  loss, and the forgetting probe; read from the baseline cache when an earlier run of the same
  model, data and eval config wrote it (ftjax/evaluation/baseline_cache.py)."""
  folder = baseline_cache.cache_dir()
  k = baseline_cache.key(run, plan) if folder else None
  if k is None:
    return _evaluate_base_model(run, plan)
  cached, path = baseline_cache.read(run, plan, k)
  if cached is not None:
    log.info("baseline from cache %s", path)
    return cached
  out = _evaluate_base_model(run, plan)
  baseline_cache.write(path, k, out)
  return out


def _evaluate_base_model(run, plan: EvalPlan) -> dict:
  cfg = run.config
  out = {}
  with peft.disable_adapters(run.model()) as base:
    out["systems"] = evaluation.run_baselines(plan, base, run.tokenizer)
    if run.eval_ds is not None:
      # The objective's own eval metrics of the base (a preference objective's reference is
      # the base itself: rewards and margins 0, measured here).
      means = evaluation.model_loss(base, run.eval_ds, cfg.train.batch_size // cfg.train.grad_accum,
                                    loss_fn=run.loss_fn, means=True)
      out["loss"] = run.objective.report_loss(means)
    if cfg.eval.forgetting:
      out["forgetting"] = forgetting.probe(base, run.tokenizer, cfg.eval, cfg.data.seq_len,
                                           "forgetting (base)")
  return out


def final_eval(loss, answer, plan: EvalPlan | None) -> dict:
  """The end-of-run evaluation of one state: {"eval": the eval loss over the whole eval split,
  "finetuned": the answers to every eval prompt (with a plan), "seconds"}. loss(max_batches)
  and answer(plan) are the run's own (train.py)."""
  t = time.perf_counter()
  out = {"eval": loss(0)}
  if plan is not None:
    out["finetuned"] = answer(plan)
  out["seconds"] = time.perf_counter() - t
  return out


def finetuned_answers(run, trainable, plan: EvalPlan) -> dict:
  """The answers of the model holding `trainable` to every eval prompt, from the model the end
  of a run generates with: the merged one, or base + adapter on a 4-bit base."""
  model = run.model(trainable)
  generator = model if run.quantised else export.merged_model(model)
  return plan.run(generator, run.tokenizer, evaluation.report.FINETUNED)


def periodic_from_final(final: dict, loss, plan: EvalPlan | None, primary: str, cfg) -> dict:
  """The periodic eval at the last step, which would repeat the final eval of the same state:
  its numbers taken from `final` instead (on the quickstart that saves a pass over the eval
  loss and 32 answers). The loss is computed again only when train.eval_batches limits it; the
  primary metric is scored on the first eval.periodic_examples of the final answers, the
  examples a periodic eval answers."""
  ev = loss(cfg.train.eval_batches) if cfg.train.eval_batches else dict(final["eval"] or {})
  if not ev:
    return {}
  if "accuracy" in ev:  # a next-token objective: perplexity and token accuracy too
    ev.update(evaluation.loss_metrics(ev["loss"], ev["accuracy"]))
  if plan is not None and primary in plan.metrics:
    ev.update(plan.score(final["finetuned"]["predictions"][: cfg.eval.periodic_examples]))
  return ev


def results_for_run(run, plan: EvalPlan | None, baseline: dict | None, end: dict) -> dict:
  """eval_results.json of a finished run (without eval.generate: loss, training and leakage)."""
  cfg = run.config
  baseline = baseline or {}
  loss = {}
  if baseline.get("loss"):
    loss["base"] = baseline["loss"]
  if end.get("eval"):
    loss["fine-tuned"] = run.objective.report_loss(end["eval"])
  forgot = None
  if baseline.get("forgetting") and end.get("forgetting"):
    forgot = forgetting.compare(baseline["forgetting"], end["forgetting"], cfg.eval.forgetting_threshold)
    forgot["text"] = cfg.eval.forgetting_text or "built-in sample"
  leak = None
  if cfg.data.eval:
    evals = plan.examples if plan is not None else run.objective.read_examples(cfg.data.eval)
    leak = evaluation.leakage_summary(run.objective.read_examples(cfg.data.train), evals,
                                      cfg.data.check.near_dup)
  common = dict(loss=loss, forgetting_result=forgot, training=end.get("training"), leakage=leak)
  primary = evaluation.metrics.primary(cfg.eval)
  if plan is None:
    out = evaluation.assemble(None, primary, {}, eval_cfg=cfg.eval, **common)
  else:
    out = evaluation.assemble(plan, primary, baseline["systems"], end.get("finetuned"), **common)
  out["lm_eval"] = end.get("lm_eval")  # eval.lm_eval_tasks: base vs fine-tuned (harness.py)
  return out


def evaluate_prompting(model_name: str, data: str, out_dir: str, *, shots: str = "",
                       few_shot: int = 3, template: str = "", metrics: str = "exact_match",
                       max_examples: int = 100, max_new_tokens: int = 64, batch_size: int = 0,
                       system_prompt: str = "", model=None, tokenizer=None) -> dict:
  """Prompting alone: the base model zero-shot, k-shot (shots from `shots`, never from `data`)
  and with `template`, each after `system_prompt` (data.system_prompt: give the one the training
  config uses, so these baselines are the run's); writes out_dir/{eval_results.json, report.md,
  report.json, PNGs}."""
  cfg = config_lib.base_config()
  cfg.unlock()
  cfg.model.name_or_path = model_name
  cfg.data.system_prompt = system_prompt
  e = cfg.eval
  e.generate, e.metrics, e.few_shot, e.prompt_template = True, metrics, few_shot, template
  e.max_examples, e.max_new_tokens, e.batch_size = max_examples, max_new_tokens, batch_size
  evaluation.metrics.validate(e)
  plan = EvalPlan.build(data, e, pool_path=shots, data_cfg=cfg.data, near_dup=cfg.data.check.near_dup)
  if model is None:
    model, tokenizer = load(model_name)
  baselines = evaluation.run_baselines(plan, model, tokenizer)
  results = evaluation.assemble(plan, evaluation.metrics.primary(e), baselines)
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, "config.json"), dict(cfg.to_dict(), data=dict(cfg.data.to_dict(), eval=data, train=shots)))
  write_json(os.path.join(out_dir, evaluation.report.RESULTS), results)
  evaluation.report.write(out_dir)
  return results


def fmt(scores: dict | None) -> str:
  if not scores:
    return "-"
  return ", ".join(f"{k} {v:.1%}" for k, v in scores.items() if isinstance(v, float))


def report(summary: dict) -> str:
  """The few lines printed at the end of training."""
  lines = [f"finished {summary['steps']} steps ({summary['method']}, "
           f"{summary['trainable_params']:,} trainable params)"]
  if summary.get("best_step") is not None:
    lines.append(f"best step {summary['best_step']}" + (" (stopped early)" if summary.get("stopped_early") else ""))
  if summary.get("eval"):
    ev = summary["eval"]
    lines.append(f"eval loss {ev['loss']:.4f}" + (f", token accuracy {ev['accuracy']:.1%}" if "accuracy" in ev else "")
                 + (f", reward accuracy {ev['rewards/accuracies']:.1%}" if "rewards/accuracies" in ev else ""))
  for name, scores in (summary.get("baseline") or {}).items():
    lines.append(f"base model, {name}: {fmt(scores)}")
  if summary.get("finetuned") is not None:
    lines.append(f"fine-tuned model: {fmt(summary['finetuned'])}")
  if summary.get("verdict"):
    lines.append(summary["verdict"])
  return "\n".join(lines)


@cli_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m ftjax.evaluate",
      description="Write report.md / report.json / PNGs for a training workdir, or evaluate "
                  "prompting alone (--model --data --output).")
  parser.add_argument("--workdir", help="a training run's folder: rewrite its report")
  parser.add_argument("--model", help="built-in name, HF directory, .gguf or Hub id")
  parser.add_argument("--data", help="eval JSONL (with reference answers)")
  parser.add_argument("--shots", default="", help="solved examples for the k-shot prompt (train data, never eval)")
  parser.add_argument("--few-shot", type=int, default=3)
  parser.add_argument("--template", default="", help="your own prompt; {input} stands for the user turn")
  parser.add_argument("--metrics", default="exact_match", help="comma-separated, as eval.metrics")
  parser.add_argument("--system-prompt", default="", help="as data.system_prompt of the training config")
  parser.add_argument("--max-examples", type=int, default=100)
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--output", help="output folder for --model")
  args = parser.parse_args(argv)
  setup_logging()
  if args.workdir:
    if not os.path.isdir(args.workdir):
      raise FtjaxError(f"--workdir {args.workdir}: no such folder")
    with hold_workdir(args.workdir, "evaluate"):  # not while a run writes it (ftjax/lock.py)
      evaluation.report.write(args.workdir)
    print(os.path.join(args.workdir, "report.md"))
    return
  if not (args.model and args.data and args.output):
    raise FtjaxError("give --workdir DIR, or --model M --data eval.jsonl --output DIR")
  if args.few_shot and not args.shots:
    raise FtjaxError(f"--few-shot {args.few_shot} needs --shots FILE (solved train examples; "
                     "never the eval set), or --few-shot 0")
  results = evaluate_prompting(args.model, args.data, args.output, shots=args.shots,
                               few_shot=args.few_shot, template=args.template, metrics=args.metrics,
                               max_examples=args.max_examples, max_new_tokens=args.max_new_tokens,
                               system_prompt=args.system_prompt)
  for name, r in results["baselines"].items():
    print(f"{name}: {fmt(r['scores'])}")
  print(os.path.join(args.output, "report.md"))


if __name__ == "__main__":
  main()
