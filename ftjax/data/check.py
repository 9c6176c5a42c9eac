"""`python -m ftjax.data check --config configs/<name>.py`: find data problems before training.

Reads data.train and data.eval as training does (same formats, data.fields renaming, system
prompt, tokenizer and length rule) but keeps going after a problem, so one run lists them all:

  problems   every invalid record at `path:LINE` with a stable code: bad_json, bad_encoding,
             bad_csv (a row whose cell count differs from the header's), data_type, unknown_format, mixed_format, missing_field, wrong_type, unknown_key, unknown_role,
             invalid_weight, no_assistant_turn, empty_output, over_length (tokens > seq_len + 1;
             an error only under data.length_policy="error", otherwise counted as truncated /
             dropped as training will). data.check.on_error="fail" exits non-zero listing them;
             "skip" drops those records and counts them. A split left with no example
             (empty_split, naming why) fails the check under either policy.
  quality    in train: exact duplicates (each turn casefolded, whitespace collapsed,
             punctuation stripped at its ends), near-duplicates, one input with conflicting outputs, one
             output for many inputs (>= 5 inputs and >= 5% of examples), length outliers (tokens
             below the 1st / above the 99th percentile, with >= 100 examples), and for
             classification-like data (every output <= 3 words, <= 50 distinct) the label counts
             and labels with fewer than 5 examples.
  leakage    eval inputs that exactly or nearly repeat a train input, both locations and the
             similarity; data.check.drop_leaked=True removes those train examples
             (`clean_examples`, the function training calls).
  tokens     Dataset.summary of what training would build: examples, tokens, trained tokens,
             truncated / dropped, packing fill; plus length percentiles.

Near-duplicates (ftjax/data/similarity.py): Jaccard similarity of character 5-gram shingle
sets, casefolded, without the shingles that are boilerplate in the split (in more than 5% of
its texts: a shared instruction line or template, stock phrasing), exact (no MinHash). It holds
on one-line texts as on long ones: a listing with 2 of 16 words changed scores 0.82. The default
threshold 0.4 (data.check.near_dup) was calibrated by scripts/calibrate_near_dup.py on a long-
text set (a public grade-school math set, 7,473 train / 1,319 test questions: every train/test
pair at or above 0.3 restates one problem with names, numbers or the question changed, and 94%
of planted such rewrites reach 0.4) and a short-text set (an intent set, 15,000 / 4,500 one-line
queries: 82% of copies with 2 of 9-12 words changed reach 0.4; pairs of different intents do at
a rate of 1.3e-5, mostly one sentence with its object changed, "change my oil" / "change my
tires"). Pairs with the same input are reported as exact duplicates or conflicting outputs, not
again as near duplicates. docs/benchmarks.md has the numbers.

Then, for training: without data.eval, data.eval_fraction carves a held-out split from the
train records (`carve_eval`); data.mix draws the train sources by weight (`mix`, after the
quality and leakage signals, which judge each example once); train.epochs and "auto" values are
resolved from the counts (ftjax.data.auto); and the cost plan (ftjax.cost) is added.

Outputs: a terminal summary, `data_report.json` (`run_check(..., out_dir=...)`), and
`markdown(report)`, a section for the evaluation report.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import string

import numpy as np

from ftjax.data import dataset as dataset_lib
from ftjax.data import cache, formats, similarity, sources, template
from ftjax.errors import FtjaxError

MAX_PRINTED = 20  # problems printed in the terminal; the JSON report has all
LOCATIONS_PRINTED = 5  # duplicate / near-duplicate / conflict / leak locations printed per signal
MANY_INPUTS = 5  # an output repeated for >= this many distinct inputs ...
MANY_FRACTION = 0.05  # ... and >= this fraction of examples is flagged
LABEL_WORDS, LABEL_VALUES, RARE_LABEL = 3, 50, 5
MIN_FOR_OUTLIERS = 100  # percentiles of fewer examples flag only the extremes: skip
LISTED = 50  # groups / pairs listed per signal in the JSON report


Problem = sources.Problem  # code, where ("path:LINE"), message


@dataclasses.dataclass
class Split:
  """What checking one split found: the examples kept, the problems, and token lengths."""
  examples: list  # formats.Example, valid (over-length ones included unless policy drops them)
  problems: list  # Problem, in file order
  lengths: dict  # id(example) -> tokens of the templated example
  sources: list = dataclasses.field(default_factory=list)  # the source of each example, in order


# --- reading: every bad line, not just the first ------------------------------------------------

def validate_records(records, *, format="auto", fields=None, system_prompt=None):
  """(examples, problems): formats.record_examples on each record, its errors collected."""
  records = [formats.rename(r, fields) for r in records] if fields else records
  fmt, detected_from = format, None
  if fmt == "auto":  # training detects from the first record; here the first one that tells
    fmt = None
    for r in records:
      try:
        fmt, detected_from = formats.detect_format(r), r.where
        break
      except FtjaxError:
        continue
  examples, problems = [], []
  for r in records:
    try:
      found = formats.record_examples(r, fmt or formats.detect_format(r), system_prompt,
                                      detected_from=detected_from)
    except FtjaxError as e:
      problems.append(Problem(e.code or "invalid", r.where, str(e)))
      continue
    empty = [ex for ex in found if ex.messages is not None and any(
        m["role"] == "assistant" and m["weight"] and not m["content"].strip() for m in ex.messages)]
    if empty:
      problems.append(Problem("empty_output", r.where,
                              f"{r.where}: empty_output: an assistant turn to train on is empty"))
      continue
    examples.extend(found)
  return examples, problems


def check_split(path, tokenizer, *, seq_len, format="auto", fields=None, system_prompt=None,
                length_policy="truncate"):
  """A Split for a data path (file, directory or list), as training would read it."""
  examples, problems, origin = [], [], []
  for p in dataset_lib._expand(path):
    records, bad = sources.read_all(p)  # every unreadable record, at its line
    found, invalid = validate_records(records, format=format, fields=fields,
                                      system_prompt=system_prompt)
    examples.extend(found)
    origin.extend([p] * len(found))
    problems.extend(sorted(bad + invalid, key=lambda q: _line(q.where)))
  template.require_chat_template(tokenizer, examples, path)
  lengths = {}
  max_len = seq_len + 1
  for ex, tex in zip(examples, cache.tokenize(examples, tokenizer)):
    n = len(tex.tokens)
    lengths[id(ex)] = n
    if n > max_len and ex.text is None:
      action = {"truncate": "truncated", "drop": "dropped", "error": "error"}[length_policy]
      problems.append(Problem("over_length", ex.where,
                              f"{ex.where}: over_length: {n} tokens > max_len {max_len} ({action})"))
  return Split(examples, problems, lengths, origin)


def carve_eval(examples, fraction, seed):
  """(train, eval): a held-out `fraction` of the records (all examples of a record go to the
  same side, so the instances of one record never straddle the split), drawn with `seed`."""
  wheres = list(dict.fromkeys(ex.where for ex in examples))
  n = min(len(wheres) - 1, max(1, round(fraction * len(wheres))))
  chosen = {wheres[i] for i in np.random.default_rng(seed).permutation(len(wheres))[:n]}
  return [ex for ex in examples if ex.where not in chosen], [ex for ex in examples if ex.where in chosen]


def mix(examples, origin, weights, seed):
  """Examples drawn from each source in proportion to `weights` (as many in all as there are):
  a source's share is its examples in a seeded random order, repeated when it must be drawn
  more often than it has examples. Returns (examples, per-source counts)."""
  order = list(dict.fromkeys(origin))
  if len(weights) != len(order):
    raise FtjaxError(f"config: data.mix has {len(weights)} weights for {len(order)} train sources "
                     f"({', '.join(order)})")
  groups = {src: [ex for ex, o in zip(examples, origin) if o == src] for src in order}
  total, norm = len(examples), sum(weights)
  rng = np.random.default_rng(seed)
  out, counts = [], []
  for src, w in zip(order, weights):
    group, want = groups[src], round(w / norm * total)
    picks = np.concatenate([rng.permutation(len(group)) for _ in range(-(-want // len(group)))]
                           ) if want and group else np.zeros(0, int)
    out += [group[i] for i in picks[:want]]
    counts.append({"source": src, "examples": len(group), "weight": w, "drawn": want})
  return out, counts


def _line(where):
  tail = where.rsplit(":", 1)[-1]
  return int(tail) if tail.isdigit() else 0


def is_error(problem, length_policy):
  """Whether a problem stops training: all but over-length under truncate / drop."""
  return problem.code != "over_length" or length_policy == "error"


# --- text views and similarity --------------------------------------------------------------------

def normalise(text):
  """Casefolded, whitespace collapsed, punctuation stripped at both ends."""
  return " ".join(text.casefold().split()).strip(string.punctuation + " ")


def input_text(ex):
  """What the model is asked: user turns (the text itself for text examples)."""
  if ex.text is not None:
    return ex.text
  return "\n".join(m["content"] for m in ex.messages if m["role"] == "user")


def output_text(ex):
  if ex.text is not None:
    return ""
  return "\n".join(m["content"] for m in ex.messages if m["role"] == "assistant" and m["weight"])


def full_text(ex):
  """Everything but system turns: a shared system prompt would make all examples look alike."""
  if ex.text is not None:
    return ex.text
  return "\n".join(m["content"] for m in ex.messages if m["role"] != "system")


def normalise_turns(ex):
  """The duplicate key: each non-system turn normalised (punctuation ends at turn ends)."""
  if ex.text is not None:
    return (normalise(ex.text),)
  return tuple(normalise(m["content"]) for m in ex.messages if m["role"] != "system")


# --- quality signals and leakage ----------------------------------------------------------------

def quality(examples, lengths, *, threshold):
  """Duplicate, conflict, repeated-output, length-outlier and label signals within a split."""
  out = {}
  norm_full = [normalise_turns(ex) for ex in examples]
  groups = collections.defaultdict(list)
  for i, t in enumerate(norm_full):
    groups[t].append(i)
  dups = [g for g in groups.values() if len(g) > 1]
  out["exact_duplicates"] = {"groups": len(dups), "examples": sum(len(g) - 1 for g in dups),
                             "listed": [[examples[i].where for i in g] for g in dups[:LISTED]]}
  # an exact duplicate, or one input with another output (a conflict), is reported as that
  same_input = [normalise(input_text(ex)) if ex.text is None else norm_full[i]
                for i, ex in enumerate(examples)]
  near = [(i, j, s) for i, j, s in similarity.similar_pairs([full_text(ex) for ex in examples],
                                                           None, threshold)
          if norm_full[i] != norm_full[j] and same_input[i] != same_input[j]]
  out["near_duplicates"] = {"pairs": len(near), "threshold": threshold, "listed": [
      {"a": examples[i].where, "b": examples[j].where, "similarity": s} for i, j, s in near[:LISTED]]}

  by_input = collections.defaultdict(list)
  by_output = collections.defaultdict(list)
  for i, ex in enumerate(examples):
    if ex.text is None:
      by_input[normalise(input_text(ex))].append(i)
      by_output[normalise(output_text(ex))].append(i)
  conflicts = [g for g in by_input.values()
               if len({normalise(output_text(examples[i])) for i in g}) > 1]
  out["conflicting_outputs"] = {"inputs": len(conflicts), "listed": [
      [examples[i].where for i in g] for g in conflicts[:LISTED]]}
  n = len(examples)
  repeated = []
  for text, g in by_output.items():
    inputs = {normalise(input_text(examples[i])) for i in g}
    if len(inputs) >= MANY_INPUTS and len(g) >= MANY_FRACTION * n:
      repeated.append({"output": text[:80], "inputs": len(inputs), "first": examples[g[0]].where})
  out["repeated_outputs"] = repeated

  tokens = np.array([lengths[id(ex)] for ex in examples]) if examples else np.zeros(0)
  if len(tokens) >= MIN_FOR_OUTLIERS:
    lo, hi = np.percentile(tokens, [1, 99])
    short = [ex.where for ex, t in zip(examples, tokens) if t < lo]
    long = [ex.where for ex, t in zip(examples, tokens) if t > hi]
    out["length_outliers"] = {"below_p1": len(short), "above_p99": len(long), "p1": float(lo),
                              "p99": float(hi), "short": short[:LISTED], "long": long[:LISTED]}
  else:
    out["length_outliers"] = {"skipped": f"fewer than {MIN_FOR_OUTLIERS} examples"}

  labels = collections.Counter(output_text(ex).strip() for ex in examples if ex.text is None)
  if labels and len(labels) <= LABEL_VALUES and all(len(k.split()) <= LABEL_WORDS for k in labels):
    out["labels"] = {"counts": dict(labels.most_common()),
                     "rare": sorted(k for k, v in labels.items() if v < RARE_LABEL)}
  return out


def leakage(train, eval_examples, *, threshold):
  """Eval inputs that repeat a train input: [{"train", "eval", "similarity", "kind"}]."""
  norm_train = [normalise(input_text(ex)) for ex in train]
  norm_eval = [normalise(input_text(ex)) for ex in eval_examples]
  pairs = similarity.similar_pairs([input_text(ex) for ex in train],
                                   [input_text(ex) for ex in eval_examples], threshold)
  found = {(i, j): s for i, j, s in pairs}
  by_text = collections.defaultdict(list)
  for i, t in enumerate(norm_train):
    by_text[t].append(i)
  for j, t in enumerate(norm_eval):
    for i in by_text.get(t, ()):
      found[(i, j)] = 1.0  # exact after normalising, even when too short to shingle apart
  out = []
  for (i, j), s in sorted(found.items(), key=lambda kv: (-kv[1], kv[0])):
    exact = norm_train[i] == norm_eval[j]
    out.append({"train": train[i].where, "eval": eval_examples[j].where,
                "similarity": 1.0 if exact else s, "kind": "exact" if exact else "near"})
  return out


# --- the whole check -----------------------------------------------------------------------------

def check(config, tokenizer):
  """(report dict, {"train": examples, "eval": examples}) for a config, nothing written."""
  d = config.data
  template.choose_chat_template(tokenizer, d.chat_template)
  common = dataset_lib.read_options(d)
  del common["skip_invalid"]  # the check reads every record and reports the invalid ones
  common.update(seq_len=d.seq_len, length_policy=d.length_policy)
  from ftjax import objectives
  objective = objectives.get(config)  # its data formats (preference pairs, ...) and rows
  splits = {"train": objective.check_split(d.train, tokenizer, **common)}
  if d.eval:
    splits["eval"] = objective.check_split(d.eval, tokenizer, **common)
  threshold = float(d.check.near_dup)
  report = {"config": {"train": d.train, "eval": d.eval, "seq_len": d.seq_len,
                       "length_policy": d.length_policy, "on_error": d.check.on_error,
                       "drop_leaked": d.check.drop_leaked, "near_dup_threshold": threshold,
                       "fields": d.fields, "format": d.format, "mix": d.mix,
                       "eval_fraction": d.eval_fraction, "chat_template": d.chat_template},
            "problems": [], "counts": {}, "errors": 0, "splits": {}}
  kept, emptied = {}, {}  # emptied: split -> why it has no example left (a check failure)
  for name, split in splits.items():
    errors = [p for p in split.problems if is_error(p, d.length_policy)]
    bad = {p.where for p in errors}
    kept[name] = [ex for ex in split.examples if ex.where not in bad]
    report["problems"] += [dict(dataclasses.asdict(p), split=name,
                                error=is_error(p, d.length_policy)) for p in split.problems]
    report["errors"] += len(errors)
    report["splits"][name] = {"records_with_errors": len(bad), "skipped": 0}
    if not kept[name]:
      emptied[name] = _why_no_valid_record(len(bad), d.check.on_error)
  if "eval" not in splits and d.eval_fraction > 0:  # a held-out split carved from train
    records = len({ex.where for ex in kept["train"]})
    kept["train"], kept["eval"] = carve_eval(kept["train"], d.eval_fraction, d.eval_seed)
    if not kept["eval"]:
      emptied.setdefault("eval", f"data.eval_fraction={d.eval_fraction} held out no record of the "
                         f"{records} valid train record(s); at least 2 are needed")
    splits["eval"] = splits["train"]  # same token lengths
    report["splits"]["eval"] = {"records_with_errors": 0, "skipped": 0,
                                "carved_from_train": len(kept["eval"])}
  report["counts"] = dict(collections.Counter(p["code"] for p in report["problems"]).most_common())
  report["failed"] = bool(report["errors"]) and d.check.on_error == "fail"
  if d.check.on_error == "skip":
    for name in splits:
      report["splits"][name]["skipped"] = report["splits"][name]["records_with_errors"]

  lengths = splits["train"].lengths
  report["quality"] = quality(kept["train"], lengths, threshold=threshold)
  leaks = leakage(kept["train"], kept["eval"], threshold=threshold) if "eval" in kept else []
  report["leakage"] = {"pairs": len(leaks), "exact": sum(p["kind"] == "exact" for p in leaks),
                       "near": sum(p["kind"] == "near" for p in leaks),
                       "train_examples": len({p["train"] for p in leaks}),
                       "eval_examples": len({p["eval"] for p in leaks}), "listed": leaks}
  if d.check.drop_leaked:
    leaked = {p["train"] for p in leaks}
    kept["train"] = [ex for ex in kept["train"] if ex.where not in leaked]
    report["leakage"]["dropped_from_train"] = len(leaked)
    if leaked and not kept["train"]:
      emptied.setdefault("train", f"data.check.drop_leaked removed all {len(leaked)} train "
                         "examples: each repeats an eval input (is data.eval the train data?)")

  if d.mix:  # after quality and leakage, which judge each example once
    origin = dict(zip(map(id, splits["train"].examples), splits["train"].sources))
    kept["train"], report["mix"] = mix(kept["train"], [origin[id(ex)] for ex in kept["train"]],
                                       [float(w) for w in d.mix.split(",")], d.eval_seed)
  for name, examples in kept.items():
    try:
      stats = objective.token_stats(examples, splits[name].lengths, tokenizer,
                                    pack=d.pack if name == "train" else False)
    except FtjaxError as e:
      if e.code != "empty_split":
        raise
      stats = {"examples": 0}
      emptied.setdefault(name, str(e).removeprefix("data: "))  # every example cut by the length policy
    report["splits"][name].update(stats)
  _fail_empty_splits(report, emptied, d)
  return report, kept


def _why_no_valid_record(with_errors, on_error):
  if not with_errors:
    return "no records: the data is empty"
  what = "skipped under data.check.on_error='skip'" if on_error == "skip" else "each listed with its code"
  return f"every record has a problem ({with_errors} records, {what})"


def _fail_empty_splits(report, emptied, d):
  """An empty or emptied split fails the check whatever data.check.on_error says: training would
  stop later on it with a vaguer message (or run without the eval split the config asked for)."""
  for name, why in emptied.items():
    path = d.train if name == "train" else (d.eval or "held-out eval")
    message = f"data.{name} ({path}): empty_split: no examples left: {why}"
    report["problems"].append(dict(code="empty_split", where=str(path), message=message,
                                   split=name, error=True))
    report["splits"][name]["empty"] = why
    report["errors"] += 1
  if emptied:
    report["counts"] = dict(collections.Counter(p["code"] for p in report["problems"]).most_common())
    report["failed"] = True


def token_stats(examples, lengths, tokenizer, d, *, pack):
  """Dataset.summary of what training would build, plus length percentiles."""
  if not examples:
    return {"examples": 0}
  policy = "drop" if d.length_policy == "error" else d.length_policy  # errors already counted
  ds = dataset_lib.dataset_from_examples(examples, tokenizer, seq_len=d.seq_len, pack=pack,
                                         length_policy=policy)
  n = np.array([lengths[id(ex)] for ex in examples])
  stats = {k: v for k, v in ds.summary.items() if k != "files"}
  stats["length"] = {f"p{q}": float(np.percentile(n, q)) for q in (50, 90, 99)}
  stats["length"]["max"] = int(n.max())
  return stats


def clean_examples(config, tokenizer):
  """{"train", "eval"} Examples training should use: invalid records dropped (on_error="skip"),
  leaked train examples dropped (drop_leaked). Raises FtjaxError listing problems under "fail"."""
  report, kept = check(config, tokenizer)
  if report["failed"]:
    raise FtjaxError(failure_message(report))
  return kept


def failure_message(report):
  errors = [p for p in report["problems"] if p["error"]]
  if report["config"]["on_error"] == "skip":  # skipped records do not fail it; empty splits do
    errors = [p for p in errors if p["code"] == "empty_split"]
    lines = [f"{len(errors)} split(s) with no examples left:"]
  else:
    lines = [f"{len(errors)} data problems (data.check.on_error='fail'; 'skip' drops them):"]
  lines += [f"  {p['message']}" for p in errors[:MAX_PRINTED]]
  if len(errors) > MAX_PRINTED:
    lines.append(f"  ... {len(errors) - MAX_PRINTED} more in data_report.json")
  return "\n".join(lines)


def summary_text(report):
  """The terminal summary."""
  lines = []
  counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items()) or "none"
  lines.append(f"problems: {counts}")
  for p in report["problems"][:MAX_PRINTED]:
    lines.append(f"  [{p['code']}] {p['message']}")
  if len(report["problems"]) > MAX_PRINTED:
    lines.append(f"  ... {len(report['problems']) - MAX_PRINTED} more in data_report.json")
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
    lines.append(f"labels: {q['labels']['counts']}; rare (< {RARE_LABEL}): {q['labels']['rare']}")
  leak = report["leakage"]
  lines.append(f"leakage: {leak['pairs']} train/eval pairs ({leak['exact']} exact, {leak['near']} near)"
               + (f"; {leak['dropped_from_train']} train examples dropped"
                  if "dropped_from_train" in leak else ""))
  for p in leak["listed"][:LOCATIONS_PRINTED]:
    lines.append(f"  {p['similarity']:.2f} {p['eval']} ~ {p['train']}")
  for line in report.get("auto", []):
    lines.append(f"chose {line}")
  if "cost" in report:
    from ftjax import cost
    lines.append(cost.summary_text(report["cost"]))
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
    from ftjax import cost
    rows += ["", "```", cost.summary_text(report["cost"]), "```"]
  return "\n".join(rows) + "\n"


def add_cost_plan(report, config, probed=None):
  """report["cost"]: ftjax.cost.plan of the train split (and a probe's measurements)."""
  from ftjax import cost
  train = report["splits"].get("train", {})
  if train.get("examples"):
    report["cost"] = cost.plan(config, train, probed)
    if report.get("lr_probe"):  # train.lr "auto": the probe's steps (ftjax/lr_probe.py)
      report["cost"]["lr_probe"] = report["lr_probe"]
  return report


def run_check(config, tokenizer, out_dir=".", probe=True):
  """Checks, adds the cost plan (probing the real step when `probe` and cost.probe_steps > 0
  and the data passed), writes out_dir/data_report.json, returns the report (its absolute
  path in report["written_to"], which the summary prints)."""
  from ftjax import cost
  from ftjax.files import write_json
  from ftjax.data import auto
  from ftjax import objectives
  report, _ = objectives.get(config).check_data(tokenizer)
  # train.epochs / "auto": the steps the plan prices. A failed check prices the records that
  # passed, what the run would train on once the bad ones are fixed or skipped.
  auto.resolve_from_report(config, report)
  probed = None
  if probe and config.cost.probe_steps and not report["failed"]:
    probed = cost.probe(config, config.cost.probe_steps)
  add_cost_plan(report, config, probed)
  os.makedirs(out_dir, exist_ok=True)
  report["written_to"] = os.path.abspath(os.path.join(out_dir, "data_report.json"))
  write_json(report["written_to"], report)
  return report
