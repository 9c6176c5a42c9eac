"""report.json, report.md and the PNGs of one evaluation: from the eval results a run (or
`python -m ftjax.evaluate --model ...`) wrote, plus whatever the folder holds -- metrics.jsonl
(curves), config.json, summary.json, data_report.json (data and cost figures).
"""

from __future__ import annotations

import json
import os

from ftjax.data import lr_plan
from ftjax.data.report import markdown as data_markdown
from ftjax.evaluation import curves as curves_lib
from ftjax.evaluation import metrics as metrics_lib
from ftjax.evaluation import plots, stats
from ftjax.evaluation.harness import table
from ftjax.files import write_json

RESULTS = "eval_results.json"
FINETUNED = "fine-tuned"


def compare(plan, baselines: dict, finetuned: dict | None, primary: str, resamples: int = 1000) -> dict:
  """The comparison part of the results: per-system CIs, fine-tuned minus each baseline with a
  paired bootstrap CI for every generation metric, and the verdict on the primary metric (or on
  the first generation metric when the primary is a loss metric)."""
  refs = plan.references
  systems = dict(baselines, **({FINETUNED: finetuned} if finetuned else {}))
  out = {"ci95": {name: {m: stats.bootstrap_ci(metric, r["predictions"], refs[:r["examples"]],
                                               plan.options, resamples)
                         for m, metric in plan.metrics.items()} for name, r in systems.items()},
         "finetuned_minus": {}, "verdict": None}
  if not finetuned or not baselines or not plan.metrics:
    return out
  for m, metric in plan.metrics.items():
    out["finetuned_minus"][m] = {
        name: stats.paired_bootstrap(metric, finetuned["predictions"], r["predictions"], refs,
                                     plan.options, resamples) for name, r in baselines.items()}
  decide = primary if primary in plan.metrics else next(iter(plan.metrics))
  out["verdict"] = stats.verdict(decide, finetuned["scores"][decide],
                                 {n: r["scores"][decide] for n, r in baselines.items()},
                                 out["finetuned_minus"][decide])
  out["verdict"]["metric"] = decide
  return out


def _read_json(folder, name):
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _pct(x):
  return "-" if x is None else f"{100 * x:.1f}"


def write(folder: str, results: dict | None = None) -> dict:
  """Writes folder/report.{json,md} and PNGs; `results` defaults to folder/eval_results.json."""
  results = results if results is not None else (_read_json(folder, RESULTS) or {})
  config = _read_json(folder, "config.json")
  summary = _read_json(folder, "summary.json")
  data_report = _read_json(folder, "data_report.json")
  curves = curves_lib.read_curves(folder)
  if "metric_names" not in results and config and "metrics" in config.get("eval", {}):
    # a run from before eval_results.json existed: its declared metrics are in config.json
    from ml_collections import ConfigDict
    e = ConfigDict(config["eval"])
    results = dict(results, metric_names=metrics_lib.split_names(e.metrics),
                   primary=metrics_lib.primary(e), normalize=e.normalize)
  primary = results.get("primary", "loss")
  training = results.get("training", {})
  warnings = curves_lib.overfitting_warnings(curves.get("train/loss", []), curves.get("eval/loss", []))
  report = {"results": results, "overfitting_warnings": warnings, "config": config,
            "summary": summary, "data_report": data_report, "plots": {},
            "auto": _read_json(folder, "auto.json")}

  p = report["plots"]
  if curves:
    p["curves"] = plots.curves(os.path.join(folder, "curves.png"), curves, primary,
                               training.get("best_step"))
  if "train/reward" in curves:  # GRPO
    p["rewards"] = plots.rewards(os.path.join(folder, "rewards.png"), curves)
  systems = dict(results.get("baselines") or {})
  if results.get("finetuned"):
    systems[FINETUNED] = results["finetuned"]
  gen = [m for m in results.get("metric_names", []) if m not in metrics_lib.LOSS_METRICS]
  if systems and gen:
    p["comparison"] = plots.comparison(
        os.path.join(folder, "comparison.png"), {n: s["scores"] for n, s in systems.items()},
        {n: results["ci95"][n] for n in systems}, gen)
  tuned = results.get("finetuned")
  if results.get("confusion") and tuned:  # a label task (label_accuracy / macro_f1)
    p["confusion"] = plots.confusion_matrix(os.path.join(folder, "confusion.png"),
                                            results["references"][:tuned["examples"]],
                                            tuned["predictions"])
  if results.get("forgetting"):
    p["forgetting"] = plots.forgetting(os.path.join(folder, "forgetting.png"), results["forgetting"])
  write_json(os.path.join(folder, "report.json"), report)
  with open(os.path.join(folder, "report.md"), "w") as f:
    f.write(markdown(report, systems))
  return report


def markdown(report: dict, systems: dict) -> str:
  """report.md: one section after the other, each from its own function."""
  r = report["results"]
  lines = ["# Evaluation report", ""]
  for section in (_verdict_md, _metrics_md, _systems_md, _loss_md, _training_md, _forgetting_md,
                  _leakage_md, _auto_md, _data_cost_md, _samples_md):
    lines += section(report, r, systems)
  return "\n".join(lines)


def _verdict_md(report: dict, r: dict, systems: dict) -> list[str]:
  lines = []
  verdict = r.get("verdict")
  if verdict:
    lines += [f"**Verdict: {verdict['text']}**", ""]
  elif systems and not r.get("finetuned"):
    best = max(systems, key=lambda n: next(iter(systems[n]["scores"].values())))
    lines += [f"Prompting only (no fine-tuned model): best baseline **{best}**.", ""]
  return lines


def _metrics_md(report: dict, r: dict, systems: dict) -> list[str]:
  names = r.get("metric_names", [])
  lines = ["## Metrics (fixed before training)", "",
           f"Declared: {', '.join(f'`{n}`' for n in names)}; primary: `{r.get('primary')}` "
           f"(decides early stopping, and the verdict when it is a generation metric; otherwise "
           f"the first generation metric does). Exact-match normalisation: "
           f"{r.get('normalize') or 'none'}."
           + (f" {r['examples']} eval examples, greedy." if r.get("examples") else ""), ""]
  if r.get("shots"):
    lines += [f"Few-shot examples (from train, checked against eval for overlap): "
              f"{', '.join(r['shots'])}.", ""]
  return lines


def _systems_md(report: dict, r: dict, systems: dict) -> list[str]:
  gen = [m for m in r.get("metric_names", []) if m not in metrics_lib.LOSS_METRICS]
  if not (systems and gen):
    return []
  lines = ["## Prompting baselines vs fine-tuned", "",
           "| system | " + " | ".join(f"{m} (%) [95% CI]" for m in gen) + " |",
           "|---|" + "---|" * len(gen)]
  for name, s in systems.items():
    cells = [f"{_pct(s['scores'][m])} [{_pct(r['ci95'][name][m][0])}, {_pct(r['ci95'][name][m][1])}]"
             for m in gen]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines.append("")
  if r.get("finetuned_minus"):
    lines += ["Fine-tuned minus each baseline, points, paired bootstrap 95% CI "
              f"({r.get('resamples', 1000)} resamples):", "",
              "| baseline | " + " | ".join(gen) + " |", "|---|" + "---|" * len(gen)]
    for base in r["baselines"]:
      cells = []
      for m in gen:
        c = r["finetuned_minus"][m][base]
        cells.append(f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]")
      lines.append(f"| {base} | " + " | ".join(cells) + " |")
    lines.append("")
  if report["plots"].get("comparison"):
    lines += [f"![baselines vs fine-tuned]({report['plots']['comparison']})", ""]
  for name, c in (r.get("confusion") or {}).items():
    recall = ", ".join(f"{label or '(empty)'} {100 * v:.0f}%" for label, v in c["recall"].items())
    mistakes = ", ".join(f"{a or '(empty)'} -> {b or '(empty)'} x{n}" for a, b, n in c["mistakes"]) or "none"
    lines += [f"Labels, {name} ({c['labels']} labels): recall {recall}; most frequent mistakes: {mistakes}.", ""]
  unmapped = {n: s["unmapped"] for n, s in systems.items() if "unmapped" in s}
  if unmapped:  # classification: generated answers mapped onto the class names
    lines += ["Answers that named no class (exact, then normalised match; counted wrong): "
              + ", ".join(f"{n} {k} of {systems[n]['examples']}" for n, k in unmapped.items()) + ".", ""]
  if report["plots"].get("confusion"):
    lines += [f"![confusion matrix, fine-tuned]({report['plots']['confusion']})", ""]
  return lines


def _loss_md(report: dict, r: dict, systems: dict) -> list[str]:
  loss = r.get("loss") or {}
  if loss and all("perplexity" in v for v in loss.values()):
    lines = ["## Eval loss (answer tokens, teacher-forced)", "", "| model | loss | perplexity | token accuracy |",
             "|---|---|---|---|"]
    for name, v in loss.items():
      lines.append(f"| {name} | {v['loss']:.4f} | {v['perplexity']:.3f} | {100 * v['token_accuracy']:.1f}% |")
    return lines + [""]
  if not loss:
    return []
  # another objective's eval metrics (preference: rewards/accuracies, margins, ...)
  columns = sorted({k for v in loss.values() for k in v if k != "note"})
  lines = ["## Eval loss and metrics (held-out split)", "", "| model | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for name, v in loss.items():
    lines.append(f"| {name} | " + " | ".join(f"{v[c]:.4g}" if c in v else "" for c in columns) + " |")
  return lines + [""] + [note + "\n" for note in dict.fromkeys(v["note"] for v in loss.values() if v.get("note"))]


def _training_md(report: dict, r: dict, systems: dict) -> list[str]:
  t = r.get("training") or {}
  if not (t or report["plots"].get("curves")):
    return []
  lines = ["## Training and overfitting", ""]
  if t.get("best_step") is not None:
    lines.append(f"Best step by `{t.get('metric', r.get('primary'))}`: {t['best_step']} "
                 f"({t.get('best_value', 0):.4g}); the exported model is from that step"
                 + (" (restored from the best checkpoint)." if t.get("restored_best") else "."))
  if t.get("stopped_early"):
    lines.append(f"Early stopping at step {t['stopped_at']}: no improvement in "
                 f"{t['patience']} evals (patience).")
  lines.append("")
  for w in report["overfitting_warnings"]:
    lines.append(f"- **Warning:** {w}")
  if report["overfitting_warnings"]:
    lines.append("")
  if report["plots"].get("curves"):
    lines += [f"![train vs eval curves]({report['plots']['curves']})", ""]
  if report["plots"].get("rewards"):
    lines += [f"![GRPO reward over steps]({report['plots']['rewards']})", ""]
  return lines


def _forgetting_md(report: dict, r: dict, systems: dict) -> list[str]:
  f = r.get("forgetting")
  if not f:  # eval.lm_eval_tasks' scores, when set, open the section themselves
    return _lm_eval_section(r.get("lm_eval"), under_forgetting=False)
  flag = "**FLAGGED**: above" if f["flagged"] else "below"
  lines = ["## Forgetting", "",
           f"Perplexity on general held-out text ({f.get('text', 'built-in sample')}): "
           f"{f['perplexity_before']:.3f} (base) -> {f['perplexity_after']:.3f} (fine-tuned), "
           f"{f['relative_change']:+.1%}, {flag} the {f['threshold']:.0%} threshold. "
           f"General prompts whose answer changed: {f['answers_changed']} of {len(f['prompts'])}.", "",
           "| prompt | base | fine-tuned |", "|---|---|---|"]
  for q, a, b in zip(f["prompts"], f["answers_before"], f["answers_after"]):
    lines.append(f"| {q} | {_cell(a)} | {_cell(b)} |")
  lines.append("")
  if report["plots"].get("forgetting"):
    lines += [f"![forgetting]({report['plots']['forgetting']})", ""]
  return lines + _lm_eval_section(r.get("lm_eval"), under_forgetting=True)


def _leakage_md(report: dict, r: dict, systems: dict) -> list[str]:
  lines = ["## Leakage", ""]
  leak = r.get("leakage")
  if leak:
    lines.append(f"Train/eval overlap (ftjax.data.quality.leakage, near-duplicate threshold "
                 f"{leak['threshold']}): {leak['pairs']} pairs ({leak['exact']} exact, "
                 f"{leak['near']} near), {leak['eval_examples']} eval examples affected.")
    for pair in leak["listed"][:5]:
      lines.append(f"- {pair['eval']} ~ {pair['train']} ({pair['kind']}, {pair['similarity']:.2f})")
  else:
    lines.append("Not measured: no train set (prompting-only evaluation) or no eval set.")
  lines.append("")
  return lines


def _auto_md(report: dict, r: dict, systems: dict) -> list[str]:
  """The "auto" values (auto.json) and the learning-rate probe's table."""
  auto = report.get("auto")
  if not auto:
    return []
  lines = ["## Auto values (auto.json)", ""]
  lines += [f"- `{k}` = {v:g}: {auto['how'][k]}" if isinstance(v, (int, float))
            else f"- `{k}` = {v}: {auto['how'][k]}" for k, v in auto["resolved"].items()]
  lines.append("")
  probe = auto.get("lr_probe")
  if probe and probe.get("skipped"):
    lines += [f"Learning-rate probe skipped: {probe['skipped']}.", ""]
  elif probe:
    lines += [f"Learning-rate probe: {probe['steps_each']} steps per rate from the same start, "
              f"scored on {probe['held_out_rows']} held-out train rows ({probe['rule']}).", "",
              lr_plan.table_text(probe), ""]
  return lines


def _data_cost_md(report: dict, r: dict, systems: dict) -> list[str]:
  lines = []
  if report["data_report"]:
    lines += [data_markdown(report["data_report"]).replace("## Data check", "## Data check (data_report.json)"), ""]
  s = report["summary"]
  if s:
    lines += ["## Cost", "", f"{s['steps']} steps of {s['method']} ({s['trainable_params']:,} trainable "
              f"params), compile {s.get('compile_s', 0):.1f} s"
              + (f", {s['train_s']:.0f} s training" if s.get("train_s") else "")
              + (f", {s['eval_seconds']:.0f} s evaluating" if s.get("eval_seconds") else "") + ".", ""]
  return lines


def _samples_md(report: dict, r: dict, systems: dict) -> list[str]:
  lines = []
  if systems:
    lines += ["## Sample predictions", ""]
    for i in range(min(3, r.get("examples", 0))):
      lines += [f"**Example {i + 1}** ({r['sources'][i]}): {_cell(r['inputs'][i])}", "",
                f"- reference: `{_cell(r['references'][i])}`"]
      for name, sys_ in systems.items():
        mapped = ""  # classification: the generated answer, then the class it was mapped onto
        if "answers" in sys_:
          mapped = f" -> {sys_['predictions'][i] or 'no class'}"
        shown = sys_.get("answers", sys_["predictions"])[i]
        lines.append(f"- {name}: `{_cell(shown)}`{mapped}")
      lines.append("")
  if report["config"]:
    lines += ["## Config", "", "```json", json.dumps(report["config"], indent=1, sort_keys=True), "```", ""]
  return lines


def _lm_eval_section(result: dict | None, under_forgetting: bool) -> list[str]:
  """eval.lm_eval_tasks' scores, base vs fine-tuned, as part of the forgetting section."""
  if not result:
    return []
  lines = ([] if under_forgetting else ["## Forgetting", ""]) + ["### lm-evaluation-harness", ""]
  limit = f", first {result['limit']} examples per task" if result.get("limit") else ""
  lines += [f"Tasks {', '.join(f'`{t}`' for t in result['tasks'])}{limit} (lm_eval, model ftjax).", ""]
  if result.get("error"):
    return lines + [f"**Not scored:** {_cell(result['error'])}", ""]

  def num(value, err):
    if not isinstance(value, (int, float)):
      return "-"
    return f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")
  lines += ["| task | metric | base | fine-tuned | change |", "|---|---|---|---|---|"]
  for task, metric, base, tuned, base_err, tuned_err in table(result):
    change = "-" if base is None or tuned is None else f"{tuned - base:+.4f}"
    lines.append(f"| {task} | {metric} | {num(base, base_err)} | {num(tuned, tuned_err)} | {change} |")
  return lines + [""]


def _cell(text: str) -> str:
  return " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")[:300]
