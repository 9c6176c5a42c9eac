"""The data check's report in words: the terminal summary (`summary_text`), the Markdown
section of the evaluation report (`markdown`) and the cost plan's part of it (`add_cost_plan`,
ftjax.cost_plan). The report itself is a dict (ftjax.data.selection.check), written as
data_report.json by `python -m ftjax.data check` (ftjax/data_check.py) and by training.
"""

from __future__ import annotations

from ftjax import cost_plan
from ftjax.data import lr_plan, quality, selection

LOCATIONS_PRINTED = 5  # duplicate / near-duplicate / conflict / leak locations printed per signal


def summary_text(report):
  """The terminal summary."""
  lines = []
  counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items()) or "none"
  lines.append(f"problems: {counts}")
  for p in report["problems"][:selection.MAX_PRINTED]:
    lines.append(f"  [{p['code']}] {p['message']}")
  if len(report["problems"]) > selection.MAX_PRINTED:
    lines.append(f"  ... {len(report['problems']) - selection.MAX_PRINTED} more in data_report.json")
  for name, s in report["splits"].items():
    if s.get("examples"):
      lines.append(f"{name}: {s['kept']} examples, {s['tokens']} tokens ({s['trained_tokens']} "
                   f"trained), length p50/p90/p99/max {s['length']['p50']:.0f}/"
                   f"{s['length']['p90']:.0f}/{s['length']['p99']:.0f}/{s['length']['max']}, "
                   f"{s['truncated']} truncated, {s['dropped']} dropped, {s['rows']} rows "
                   f"{s['fill']:.0%} filled; {s['skipped']} records skipped")
  q = report["quality"]
  lines.append(f"train quality: {q['exact_duplicates']['examples']} exact duplicates, "
               f"{q['near_duplicates']['pairs']} near-duplicate pairs (similarity >= "
               f"{q['near_duplicates']['threshold']}), {q['conflicting_outputs']['inputs']} inputs "
               f"with conflicting outputs, {len(q['repeated_outputs'])} outputs shared by many inputs")
  lines += _locations(q)
  if "labels" in q:
    lines.append(f"labels: {q['labels']['counts']}; rare (< {quality.RARE_LABEL}): {q['labels']['rare']}")
  leak = report["leakage"]
  lines.append(f"leakage: {leak['pairs']} train/eval pairs ({leak['exact']} exact, {leak['near']} near)"
               + (f"; {leak['dropped_from_train']} train examples dropped"
                  if "dropped_from_train" in leak else ""))
  for p in leak["listed"][:LOCATIONS_PRINTED]:
    lines.append(f"  {p['similarity']:.2f} {p['eval']} ~ {p['train']}")
  for line in report.get("auto", []):
    lines.append(f"chose {line}")
  if "cost" in report:
    lines.append(cost_plan.summary_text(report["cost"]))
  if report.get("written_to"):
    lines.append(f"report: {report['written_to']}")
  lines.append("result: " + ("FAILED" if report["failed"] else "ok"))
  return "\n".join(lines)


def _locations(quality):
  """Terminal lines naming where the first duplicates, near duplicates and conflicts are."""
  lines = []
  for group in quality["exact_duplicates"]["listed"][:LOCATIONS_PRINTED]:
    lines.append(f"  duplicate: {' = '.join(group)}")
  for p in quality["near_duplicates"]["listed"][:LOCATIONS_PRINTED]:
    lines.append(f"  near duplicate {p['similarity']:.2f}: {p['a']} ~ {p['b']}")
  for group in quality["conflicting_outputs"]["listed"][:LOCATIONS_PRINTED]:
    lines.append(f"  conflicting outputs: {' / '.join(group)}")
  return lines


def markdown(report):
  """A Markdown section for the evaluation report."""
  q, leak = report["quality"], report["leakage"]
  rows = ["## Data check", "", "| split | examples | tokens | trained tokens | p50 / p99 / max "
          "| truncated | dropped | skipped |", "|---|---|---|---|---|---|---|---|"]
  for name, s in report["splits"].items():
    if s.get("examples"):
      rows.append(f"| {name} | {s['kept']} | {s['tokens']} | {s['trained_tokens']} | "
                  f"{s['length']['p50']:.0f} / {s['length']['p99']:.0f} / {s['length']['max']} | "
                  f"{s['truncated']} | {s['dropped']} | {s['skipped']} |")
  counts = ", ".join(f"`{k}` {v}" for k, v in report["counts"].items()) or "none"
  rows += ["", f"Problems: {counts}.", "",
           f"Train: {q['exact_duplicates']['examples']} exact duplicates, "
           f"{q['near_duplicates']['pairs']} near-duplicate pairs (character 5-gram Jaccard >= "
           f"{q['near_duplicates']['threshold']}), {q['conflicting_outputs']['inputs']} inputs "
           f"with conflicting outputs.", "",
           f"Leakage: {leak['pairs']} train/eval pairs ({leak['exact']} exact, {leak['near']} "
           f"near)" + (f", {leak['dropped_from_train']} train examples dropped."
                       if "dropped_from_train" in leak else ".")]
  if "cost" in report:
    rows += ["", "```", cost_plan.summary_text(report["cost"]), "```"]
  return "\n".join(rows) + "\n"


def add_cost_plan(report, config, probed=None):
  """report["cost"]: ftjax.cost_plan.plan of the train split (and a probe's measurements)."""
  train = report["splits"].get("train", {})
  if train.get("examples"):
    report["cost"] = cost_plan.plan(config, train, probed)
    if report.get("lr_probe"):  # train.lr "auto": the probe's steps (ftjax/lr_probe.py)
      report["cost"]["lr_probe"] = dict(report["lr_probe"], line=lr_plan.plan_line(report["lr_probe"]))
  return report
