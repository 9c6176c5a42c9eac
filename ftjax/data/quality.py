"""The data check's quality and leakage signals (one split's duplicates, conflicts, repeated
outputs, length outliers, labels; train/eval leakage) and the text views they compare.

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
"""

from __future__ import annotations

import collections
import string

import numpy as np

from ftjax.data import similarity

MANY_INPUTS = 5  # an output repeated for >= this many distinct inputs ...
MANY_FRACTION = 0.05  # ... and >= this fraction of examples is flagged
LABEL_WORDS, LABEL_VALUES, RARE_LABEL = 3, 50, 5
MIN_FOR_OUTLIERS = 100  # percentiles of fewer examples flag only the extremes: skip
LISTED = 50  # groups / pairs listed per signal in the JSON report


# --- text views ------------------------------------------------------------------------------------

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
