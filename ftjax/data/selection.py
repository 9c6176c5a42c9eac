"""The data check's selection stage: which examples training takes. `check(config, tokenizer)`
is `python -m ftjax.data check`'s core (ftjax/data_check.py) and `clean_examples` what
training calls.

Reads data.train and data.eval as training does (same formats, data.fields renaming, system
prompt, tokenizer and length rule) but keeps going after a problem, so one run lists them all:

  problems   every invalid record at `path:LINE` with a stable code: bad_json, bad_encoding,
             bad_csv (a row whose cell count differs from the header's), data_type, unknown_format, mixed_format, missing_field, wrong_type, unknown_key, unknown_role,
             invalid_weight, no_assistant_turn, empty_output, over_length (tokens > seq_len + 1;
             an error only under data.length_policy="error", otherwise counted as truncated /
             dropped as training will). data.check.on_error="fail" exits non-zero listing them;
             "skip" drops those records and counts them. A split left with no example
             (empty_split, naming why) fails the check under either policy.
  quality    (ftjax/data/quality.py) in train: exact duplicates (each turn casefolded,
             whitespace collapsed, punctuation stripped at its ends), near-duplicates, one input
             with conflicting outputs, one output for many inputs (>= 5 inputs and >= 5% of examples), length outliers (tokens
             below the 1st / above the 99th percentile, with >= 100 examples), and for
             classification-like data (every output <= 3 words, <= 50 distinct) the label counts
             and labels with fewer than 5 examples.
  leakage    eval inputs that exactly or nearly repeat a train input, both locations and the
             similarity; data.check.drop_leaked=True removes those train examples
             (`clean_examples`, the function training calls).
  tokens     Dataset.summary of what training would build: examples, tokens, trained tokens,
             truncated / dropped, packing fill; plus length percentiles.

Then, for training: without data.eval, data.eval_fraction carves a held-out split from the
train records (`carve_eval`); data.mix draws the train sources by weight (`mix`, after the
quality and leakage signals, which judge each example once); train.epochs and "auto" values are
resolved from the counts (ftjax.data.auto); and the cost plan is added (ftjax/data/report.py).

The report's text (terminal summary, Markdown section) is ftjax/data/report.py; the command,
with the probe of the real train step, ftjax/data_check.py.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np

from ftjax.data import dataset as dataset_lib
from ftjax.data import cache, formats, quality, sources, template
from ftjax.errors import FtjaxError

MAX_PRINTED = 20  # problems printed in the terminal; the JSON report has all


Problem = sources.Problem  # code, where ("path:LINE"), message


@dataclasses.dataclass
class Split:
  """What checking one split found: the examples kept, the problems, and token lengths."""
  examples: list  # formats.Example, valid (over-length ones included unless policy drops them)
  problems: list  # Problem, in file order
  lengths: dict  # id(example) -> tokens of the templated example
  sources: list = dataclasses.field(default_factory=list)  # the source of each example, in order


# --- reading: every bad line, not just the first ------------------------------------------------

def check_split(path, tokenizer, *, seq_len, format="auto", fields=None, system_prompt=None,
                length_policy="truncate"):
  """A Split for a data path (file, directory or list), as training would read it."""
  examples, problems, origin = [], [], []
  for p in dataset_lib.expand(path):
    records, bad = sources.read_all(p)  # every unreadable record, at its line
    found, invalid = formats.validate_records(records, format=format, fields=fields,
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


# --- the whole check -----------------------------------------------------------------------------

def check(config, tokenizer, objective=None):
  """(report dict, {"train": examples, "eval": examples}) for a config, nothing written.

  objective: the run's ftjax.objectives.Objective, whose check_split / token_stats read its
  record formats (preference pairs, ...) and rows; None: this module's, supervised fine-tuning's.
  Passed in, not looked up: objectives sit above data (docs/design.md, "Layers")."""
  d = config.data
  read_split, split_stats = check_split, functools.partial(token_stats, d=d)
  if objective is not None:
    read_split, split_stats = objective.check_split, objective.token_stats
  template.choose_chat_template(tokenizer, d.chat_template)
  common = dataset_lib.read_options(d)
  del common["skip_invalid"]  # the check reads every record and reports the invalid ones
  common.update(seq_len=d.seq_len, length_policy=d.length_policy)
  splits = {"train": read_split(d.train, tokenizer, **common)}
  if d.eval:
    splits["eval"] = read_split(d.eval, tokenizer, **common)
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
      emptied[name] = why_no_valid_record(len(bad), d.check.on_error)
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
  report["quality"] = quality.quality(kept["train"], lengths, threshold=threshold)
  leaks = quality.leakage(kept["train"], kept["eval"], threshold=threshold) if "eval" in kept else []
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
      stats = split_stats(examples, splits[name].lengths, tokenizer,
                          pack=d.pack if name == "train" else False)
    except FtjaxError as e:
      if e.code != "empty_split":
        raise
      stats = {"examples": 0}
      emptied.setdefault(name, str(e).removeprefix("data: "))  # every example cut by the length policy
    report["splits"][name].update(stats)
  fail_empty_splits(report, emptied, d)
  return report, kept


def why_no_valid_record(with_errors, on_error):
  if not with_errors:
    return "no records: the data is empty"
  what = "skipped under data.check.on_error='skip'" if on_error == "skip" else "each listed with its code"
  return f"every record has a problem ({with_errors} records, {what})"


def fail_empty_splits(report, emptied, d):
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


def clean_examples(config, tokenizer, objective=None):
  """{"train", "eval"} Examples training should use: invalid records dropped (on_error="skip"),
  leaked train examples dropped (drop_leaked). Raises FtjaxError listing problems under "fail"."""
  report, kept = check(config, tokenizer, objective)
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
