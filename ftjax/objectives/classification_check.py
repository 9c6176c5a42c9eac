"""The data check of objective="classification": ftjax.data.selection's report, for labelled texts.

Same report shape as the SFT check (so `python -m ftjax.data check`, the run's data report, the
cost plan and train.epochs="auto" read it unchanged), with the classification codes of
ftjax.objectives.classification: every unreadable or invalid record (bad_json, missing_field,
wrong_type, empty_label, label_list, unknown_label) at file:line as an error, and the split's
label signals (rare_class, imbalance, conflicting_labels) as warnings. Duplicates, near
duplicates and train/eval leakage are the SFT check's own functions, run on the texts.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from ftjax.data import quality as quality_lib
from ftjax.data import selection
from ftjax.objectives import classification_data as cls_lib


def _split(objective, path):
  """(examples, problems) of one data path."""
  return cls_lib.read_split(path, objective.block.problem_type, objective._fields())


def check(objective, tokenizer):
  """(report, {"train", "eval"} LabeledTexts to train on) for the objective's config."""
  config = objective.config
  d = config.data
  splits = {"train": _split(objective, d.train)}
  if d.eval:
    splits["eval"] = _split(objective, d.eval)
  names = objective.labels()
  given = bool(objective.block.labels.strip())  # "" takes the names from train: none unknown there
  report = {"config": {"train": d.train, "eval": d.eval, "seq_len": d.seq_len,
                       "on_error": d.check.on_error, "drop_leaked": d.check.drop_leaked,
                       "near_dup_threshold": float(d.check.near_dup), "fields": d.fields,
                       "eval_fraction": d.eval_fraction, "labels": names,
                       "problem_type": objective.block.problem_type},
            "problems": [], "counts": {}, "errors": 0, "splits": {}}
  kept, emptied = {}, {}
  for name, (examples, problems) in splits.items():
    if name == "eval" or given:
      problems = problems + cls_lib.check_records(examples, names)
    bad = {p.where for p in problems}
    kept[name] = [ex for ex in examples if ex.where not in bad]
    report["problems"] += [dict(dataclasses.asdict(p), split=name, error=True) for p in problems]
    report["errors"] += len(problems)
    report["splits"][name] = {"records_with_errors": len(bad),
                              "skipped": len(bad) if d.check.on_error == "skip" else 0}
    if not kept[name]:
      emptied[name] = selection.why_no_valid_record(len(bad), d.check.on_error)
  if "eval" not in splits and d.eval_fraction > 0:
    kept["train"], kept["eval"] = selection.carve_eval(kept["train"], d.eval_fraction, d.eval_seed)
    report["splits"]["eval"] = {"records_with_errors": 0, "skipped": 0,
                                "carved_from_train": len(kept["eval"])}
    if not kept["eval"]:
      emptied["eval"] = f"data.eval_fraction={d.eval_fraction} held out no record"
  report["problems"] += [dict(dataclasses.asdict(p), split="train", error=False)
                         for p in cls_lib.label_signals(kept["train"], names)]
  report["failed"] = bool(report["errors"]) and d.check.on_error == "fail"
  _quality_and_leakage(report, kept, names, float(d.check.near_dup), d.check.drop_leaked)
  for name, examples in kept.items():
    report["splits"][name].update(_token_stats(objective, examples, tokenizer))
  report["counts"] = dict(collections.Counter(p["code"] for p in report["problems"]).most_common())
  selection.fail_empty_splits(report, emptied, d)
  return report, kept


def _quality_and_leakage(report, kept, names, threshold, drop_leaked):
  """The SFT check's duplicate / near-duplicate signals and leakage on the texts; the label
  counts and conflicting labels in its `labels` / `conflicting_outputs` slots."""
  train = kept["train"]
  lengths = {id(ex): len(ex.text) for ex in train}  # only the outlier signal reads them
  quality = quality_lib.quality(train, lengths, threshold=threshold)
  counts = collections.Counter(label for ex in train for label in ex.labels)
  quality["labels"] = {"counts": {n: counts[n] for n in names},
                       "rare": sorted(n for n in names if counts[n] < cls_lib.RARE_CLASS)}
  conflicts = [p for p in report["problems"] if p["code"] == "conflicting_labels"]
  quality["conflicting_outputs"] = {"inputs": len(conflicts),
                                    "listed": [[p["where"]] for p in conflicts[:quality_lib.LISTED]]}
  report["quality"] = quality
  leaks = quality_lib.leakage(train, kept["eval"], threshold=threshold) if "eval" in kept else []
  report["leakage"] = {"pairs": len(leaks), "exact": sum(p["kind"] == "exact" for p in leaks),
                       "near": sum(p["kind"] == "near" for p in leaks),
                       "train_examples": len({p["train"] for p in leaks}),
                       "eval_examples": len({p["eval"] for p in leaks}), "listed": leaks}
  if drop_leaked:
    leaked = {p["train"] for p in leaks}
    kept["train"] = [ex for ex in train if ex.where not in leaked]
    report["leakage"]["dropped_from_train"] = len(leaked)


def _token_stats(objective, examples, tokenizer):
  """What training builds of a split: one row per text (no packing), and length percentiles."""
  if not examples:
    return {"examples": 0}
  d = objective.config.data
  n = np.array([len(cls_lib.encode(tokenizer, ex.text, objective.block.template))
                for ex in examples])
  kept_tokens = np.minimum(n, d.seq_len)
  return {"examples": len(examples), "kept": len(examples), "rows": len(examples),
          "tokens": int(kept_tokens.sum()), "trained_tokens": int(kept_tokens.sum()),
          "truncated": int((n > d.seq_len).sum()), "dropped": 0, "seq_len": d.seq_len,
          "fill": float(kept_tokens.sum() / (len(examples) * d.seq_len)), "packed": False,
          "length": {"p50": float(np.percentile(n, 50)), "p90": float(np.percentile(n, 90)),
                     "p99": float(np.percentile(n, 99)), "max": int(n.max())}}
