"""Calibrates the data check's near-duplicate measure (ftjax/data/similarity.py) on a long-text
set and a short-text set: false positives on unrelated pairs, recall on planted edits, time.

  python scripts/calibrate_near_dup.py --gsm8k DIR --clinc150 DIR [--planted 400] [--seed 0]
      [--gram 5] [--common-share 0.05] [--run 8] [--before]

long texts   gsm8k questions (7,473 train / 1,319 test, ~46 words). Unrelated pairs: every
             train x test pair but the rewrites read by hand (REWRITES).
short texts  CLINC150 intent queries (15,000 train / 4,500 test, ~8 words, 150 intents).
             Unrelated pairs: train x test pairs of different intents. Same-intent pairs are
             paraphrases of one request, often near-verbatim ("what is my balance" / "what's my
             balance"): counted apart, neither false nor planted.
planted      --planted train texts of each set, edited and added to its test split; recall: the
             share whose (original, edited) pair reaches the threshold. Edits: k words replaced by
             words drawn from the set's vocabulary plus one word's case changed (the issue's
             listing: 2 of 16 words and a case), and for gsm8k every number and capitalised name
             replaced (how its real rewrites differ).
boilerplate  1,000 train / 300 test CLINC150 queries under one instruction line plus "Message: "
             (the shape of instruction datasets): the pairs found must be the ones found on the
             bare messages.
--before     also measures the measure this replaced (word 5-gram Jaccard, no boilerplate rule).
Prints one table per set and a JSON line; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import time

import numpy as np

THRESHOLDS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
LOW = min(THRESHOLDS)
# gsm8k (test line, train line) pairs that restate one problem (its template, with names,
# numbers or the question changed): every pair this measure scores >= 0.3, read one by one
# (the first three are the ones word 5-grams found).
REWRITES = {(603, 1315), (603, 5163), (633, 21), (825, 3727), (598, 6656), (975, 2601),
            (449, 1782), (580, 2579), (919, 7286), (497, 3428), (303, 3053), (980, 4241),
            (356, 6291)}
INSTRUCTION = ("You are a customer support assistant for a bank and travel app. Classify the "
               "customer's message into exactly one intent from the list you were given and "
               "reply with the intent name only.\nMessage: ")
LISTING = "Used city bike, blue, for sale in very good condition with new tyres, asking 469 euros"


def load_gsm8k(folder):
  def questions(name):
    with open(os.path.join(folder, f"{name}.jsonl"), encoding="utf-8") as f:
      return [json.loads(line)["question"] for line in f if line.strip()]
  return questions("train"), questions("test")


def load_clinc150(folder):
  with open(os.path.join(folder, "data_full.json"), encoding="utf-8") as f:
    data = json.load(f)
  return [tuple(p) for p in data["train"]], [tuple(p) for p in data["test"]]


def words_before(text, n=5):
  """The measure this replaced: word 5-gram shingles (texts under 5 words are one)."""
  words = re.findall(r"\w+", text.casefold())
  if len(words) < n:
    return frozenset([" ".join(words)]) if words else frozenset()
  return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def pairs_before(left, right, threshold):
  """Exact Jaccard of word 5-gram sets through an inverted index (the check before)."""
  left_sets = [words_before(t) for t in left]
  right_sets = left_sets if right is None else [words_before(t) for t in right]
  index = collections.defaultdict(list)
  for i, s in enumerate(left_sets):
    for g in s:
      index[g].append(i)
  out = []
  for j, s in enumerate(right_sets):
    shared = collections.Counter()
    for g in s:
      shared.update(index.get(g, ()))
    for i, k in shared.items():
      if right is None and i >= j:
        continue
      score = k / (len(left_sets[i]) + len(s) - k)
      if score >= threshold:
        out.append((i, j, score))
  return out


def timed(measure, left, right, threshold=LOW):
  start = time.perf_counter()
  pairs = measure(left, right, threshold)
  return pairs, time.perf_counter() - start


# --- planted edits --------------------------------------------------------------------------------

def replace_words(text, k, rng, vocabulary):
  """`text` with k distinct words replaced by other vocabulary words and one word's case changed."""
  words = text.split()
  for i in rng.choice(len(words), size=min(k, len(words)), replace=False):
    old = words[i]
    while (new := vocabulary[rng.integers(len(vocabulary))]) == old.casefold():
      pass
    words[i] = new
  i = rng.integers(len(words))
  words[i] = words[i].upper() if words[i].islower() else words[i].lower()
  return " ".join(words)


def replace_names_and_numbers(text, rng, names):
  """Every number changed, every capitalised word after a sentence's first replaced by a name."""
  text = re.sub(r"\d+", lambda m: str(int(m.group()) + 1 + int(rng.integers(9))), text)
  return re.sub(r"(?<=[a-z,] )[A-Z][a-z]+", lambda m: names[rng.integers(len(names))], text)


def recall(measure, train, test, sources, edited, thresholds=THRESHOLDS):
  """{threshold: share of edited copies (appended to test) found with their train source}."""
  pairs, _ = timed(measure, train, test + edited)
  found = collections.defaultdict(float)
  for i, j, s in pairs:
    if j >= len(test) and sources[j - len(test)] == i:
      found[j - len(test)] = max(found[j - len(test)], s)
  return {t: sum(found[k] >= t for k in range(len(edited))) / len(edited) for t in thresholds}


# --- the sets -------------------------------------------------------------------------------------

def long_texts(measure, folder, planted, rng):
  train, test = load_gsm8k(folder)
  pairs, seconds = timed(measure, train, test)
  unrelated = [(i, j, s) for i, j, s in pairs if (j + 1, i + 1) not in REWRITES]
  found = {(j + 1, i + 1): s for i, j, s in pairs if (j + 1, i + 1) in REWRITES}
  total = len(train) * len(test) - len(REWRITES)
  out = {"train": len(train), "test": len(test), "seconds_train_x_test": round(seconds, 2),
         "rewrites_found_at": {f"test {a} ~ train {b}": round(s, 3) for (a, b), s in found.items()},
         "unrelated_pairs": total, "unrelated": _counts(unrelated, total, len(test))}
  out["closest_unrelated"] = [(j + 1, i + 1, round(s, 3)) for i, j, s in
                              sorted(unrelated, key=lambda p: -p[2])[:5]]
  vocabulary = sorted({w for t in train for w in re.findall(r"[a-z]+", t)})
  names = sorted({w for t in train for w in re.findall(r"(?<=[a-z,] )[A-Z][a-z]+", t)})
  sources = rng.choice(len(train), size=planted, replace=False)
  out["planted"] = {
      f"{k} words + case": recall(measure, train, test, sources, [
          replace_words(train[i], k, rng, vocabulary) for i in sources]) for k in (2, 5)}
  out["planted"]["names and numbers"] = recall(measure, train, test, sources, [
      replace_names_and_numbers(train[i], rng, names) for i in sources])
  return out


def short_texts(measure, folder, planted, rng):
  train, test = load_clinc150(folder)
  train_texts, test_texts = [t for t, _ in train], [t for t, _ in test]
  pairs, seconds = timed(measure, train_texts, test_texts)
  unrelated = [(i, j, s) for i, j, s in pairs if train[i][1] != test[j][1]]
  paraphrases = [(i, j, s) for i, j, s in pairs if train[i][1] == test[j][1]]
  intents = collections.Counter(label for _, label in train)
  same = sum(intents[label] for _, label in test)
  total = len(train) * len(test) - same
  out = {"train": len(train), "test": len(test), "seconds_train_x_test": round(seconds, 2),
         "unrelated_pairs": total, "unrelated": _counts(unrelated, total, len(test)),
         "same_intent_pairs": same,
         "same_intent": {t: sum(s >= t for *_, s in paraphrases) for t in THRESHOLDS}}
  out["closest_unrelated"] = [(test_texts[j], train_texts[i], round(s, 3)) for i, j, s in
                              sorted(unrelated, key=lambda p: -p[2])[:5]]
  vocabulary = sorted({w for t in train_texts for w in re.findall(r"[a-z]+", t)})
  lengths = np.array([len(t.split()) for t in train_texts])
  out["planted"] = {}
  for k, (lo, hi) in ((1, (4, 8)), (2, (4, 8)), (2, (9, 12)), (2, (13, 99)), (3, (13, 99))):
    pool = np.flatnonzero((lengths >= lo) & (lengths <= hi))
    sources = rng.choice(pool, size=min(planted, len(pool)), replace=False)
    edited = [replace_words(train_texts[i], k, rng, vocabulary) for i in sources]
    out["planted"][f"{k} words + case, {lo}-{hi} words"] = recall(
        measure, train_texts, test_texts, sources, edited)
  out["planted"]["the issue's listing (2 of 16 words + case)"] = recall(
      measure, train_texts + [LISTING], test_texts, [len(train_texts)],
      [LISTING.replace("for sale", "on sale").replace("asking", "Asking").replace("euros", "EUR")])
  return out


def boilerplate(measure, folder, rng, threshold=0.4):
  """Near pairs (within train, train x test) of 1,000 / 300 queries, bare and under one
  instruction line: the instruction must add none."""
  train, test = load_clinc150(folder)
  train = [train[i][0] for i in rng.choice(len(train), size=1000, replace=False)]
  test = [test[i][0] for i in rng.choice(len(test), size=300, replace=False)]
  out = {}
  for name, prefix in (("bare", ""), ("instruction", INSTRUCTION)):
    within = measure([prefix + t for t in train], None, threshold)
    leaks = measure([prefix + t for t in train], [prefix + t for t in test], threshold)
    out[name] = {"train_pairs": {(i, j) for i, j, _ in within}, "leaks": {(i, j) for i, j, _ in leaks}}
  bare, wrapped = out["bare"], out["instruction"]
  return {"threshold": threshold,
          "bare": {k: len(v) for k, v in bare.items()},
          "instruction": {k: len(v) for k, v in wrapped.items()},
          "instruction_only": {k: len(wrapped[k] - bare[k]) for k in bare}}


def _counts(pairs, total, n_eval):
  """Per threshold: unrelated pairs at or above it, their rate, and eval texts with one."""
  out = {}
  for t in THRESHOLDS:
    hit = [(i, j) for i, j, s in pairs if s >= t]
    out[t] = {"pairs": len(hit), "rate": len(hit) / total,
              "eval_texts": len({j for _, j in hit}) / n_eval}
  return out


def machine():
  try:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next(l.split(":", 1)[1].strip() for l in lines if l.startswith("Model name"))
  except (OSError, StopIteration):
    model = platform.processor()
  return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gsm8k", required=True)
  p.add_argument("--clinc150", required=True)
  p.add_argument("--planted", type=int, default=400)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--gram", type=int, help="override similarity.GRAM")
  p.add_argument("--run", type=int, help="override similarity.RUN")
  p.add_argument("--common-share", type=float, help="override similarity.COMMON_SHARE")
  p.add_argument("--before", action="store_true", help="also measure the word 5-gram measure")
  args = p.parse_args()
  from ftjax.data import similarity
  if args.run:
    similarity.RUN = args.run
  if args.gram:
    similarity.GRAM = args.gram
  if args.common_share is not None:
    similarity.COMMON_SHARE = args.common_share
  measures = {f"char {similarity.GRAM}-grams, boilerplate > {similarity.COMMON_SHARE:.1%}, run {similarity.RUN}":
              similarity.similar_pairs}
  if args.before:
    measures["word 5-grams (before)"] = pairs_before
  results = {"machine": machine()}
  for name, measure in measures.items():
    results[name] = {
        "gsm8k": long_texts(measure, args.gsm8k, args.planted, np.random.default_rng(args.seed)),
        "clinc150": short_texts(measure, args.clinc150, args.planted,
                                np.random.default_rng(args.seed)),
        "boilerplate": boilerplate(measure, args.clinc150, np.random.default_rng(args.seed))}
    _print(name, results[name])
  print(json.dumps(results, default=str))


def _print(name, r):
  print(f"== {name}")
  for set_name in ("gsm8k", "clinc150"):
    s = r[set_name]
    print(f"{set_name}: {s['train']} x {s['test']} in {s['seconds_train_x_test']} s; "
          f"{s['unrelated_pairs']:,} unrelated pairs")
    print("  threshold  " + "  ".join(f"{t:>9}" for t in THRESHOLDS))
    print("  FP pairs   " + "  ".join(f"{s['unrelated'][t]['pairs']:>9}" for t in THRESHOLDS))
    print("  FP rate    " + "  ".join(f"{s['unrelated'][t]['rate']:>9.1e}" for t in THRESHOLDS))
    print("  eval w/ FP " + "  ".join(f"{s['unrelated'][t]['eval_texts']:>9.2%}" for t in THRESHOLDS))
    for edit, rec in s["planted"].items():
      print(f"  recall {edit}: " + " ".join(f"{rec[t]:.2f}" for t in THRESHOLDS))
    if "same_intent" in s:
      print(f"  same-intent pairs found: {s['same_intent']}")
    if "rewrites_found_at" in s:
      print(f"  rewrites: {s['rewrites_found_at']}")
    print(f"  closest unrelated: {s['closest_unrelated']}")
  print(f"boilerplate: {r['boilerplate']}")


if __name__ == "__main__":
  main()
