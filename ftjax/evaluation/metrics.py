"""Metrics declared in the config (`eval.metrics`, `eval.primary`), fixed before training.

Two kinds:
  loss metrics        loss, perplexity, token_accuracy: teacher-forced on the eval split's
                      answer tokens (no generation).
  generation metrics  a greedy answer against the reference answer of each eval example:
                      exact_match, json_valid, field_accuracy, label_accuracy, macro_f1, rouge_l,
                      token_f1, or a user function "pkg.module:function"(prediction, reference)
                      -> float.

Every generation metric is a corpus function of (predictions, references): most are the mean of
a per-example score, macro_f1 is not. The paired bootstrap (stats.py) resamples examples and
recomputes the corpus function, so both kinds get a confidence interval. All built-in metrics
lie in [0, 1], higher is better (the report shows them as percentages / points).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import re
import string
from typing import Callable

import numpy as np

from ftjax.errors import FtjaxError
from ftjax.user_functions import import_function

log = logging.getLogger(__name__)

# Metrics of the eval pass (no generation), name: higher is better. "accuracy" is the eval loss
# function's own accuracy: top-1 tokens under SFT (= token_accuracy), classes under
# objective="classification".
LOSS_METRICS = {"loss": False, "perplexity": False, "token_accuracy": True, "accuracy": True}
NORMALIZERS = ("strip", "lower", "whitespace", "punctuation")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclasses.dataclass(frozen=True)
class Options:
  """Options of the built-in metrics, from the eval block."""
  normalize: tuple[str, ...] = ("strip",)  # exact_match (label_accuracy adds lower + strip)
  fields: tuple[str, ...] = ()  # field_accuracy: keys compared; (): every reference key


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str
  per_example: Callable | None  # (prediction, reference, options) -> float; None: corpus only
  corpus: Callable | None = None  # (predictions, references, options) -> float
  higher_is_better: bool = True

  def score(self, predictions, references, options: Options) -> float:
    if self.corpus is not None:
      return float(self.corpus(predictions, references, options))
    return float(np.mean(self.per_example_scores(predictions, references, options)))

  def per_example_scores(self, predictions, references, options: Options) -> np.ndarray:
    return np.array([float(self.per_example(p, r, options)) for p, r in zip(predictions, references)])


def normalise(text: str, how) -> str:
  if "lower" in how:
    text = text.lower()
  if "punctuation" in how:
    text = _PUNCT.sub("", text)
  if "whitespace" in how:
    text = " ".join(text.split())
  if "strip" in how:
    text = text.strip()
  return text


def _exact_match(pred, ref, opts):
  return normalise(pred, opts.normalize) == normalise(ref, opts.normalize)


def _label(text, opts):
  """Labels compare case-, whitespace- and edge-punctuation-insensitively."""
  return normalise(text, set(opts.normalize) | {"lower", "whitespace", "strip"}).strip(string.punctuation)


def _label_accuracy(pred, ref, opts):
  return _label(pred, opts) == _label(ref, opts)


def parse_object(text: str):
  """The JSON object in `text` (surrounding whitespace allowed), or None."""
  try:
    value = json.loads(text.strip())
  except ValueError:
    return None
  return value if isinstance(value, dict) else None


def _reference_object(ref: str) -> dict | None:
  return parse_object(ref)


def _json_valid(pred, ref, opts):
  """A JSON object; when the reference is one too, with exactly its keys."""
  obj = parse_object(pred)
  ref_obj = _reference_object(ref)
  return obj is not None and (ref_obj is None or sorted(obj) == sorted(ref_obj))


def json_equal(a, b) -> bool:
  """Equality of two parsed JSON values as JSON types: true is not 1 and false is not 0 (Python's
  bool is an int, so `==` says they are); numbers compare by value (5 == 5.0: JSON has one
  number type); arrays and objects element by element."""
  if isinstance(a, bool) or isinstance(b, bool):
    return isinstance(a, bool) and isinstance(b, bool) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
  return type(a) is type(b) and a == b


def _field_accuracy(pred, ref, opts):
  """Share of the reference object's fields (or `opts.fields`) equal in the prediction, as JSON
  values (`json_equal`: 5 == 5.0, true != 1)."""
  ref_obj = _reference_object(ref)
  if ref_obj is None:
    raise FtjaxError(f"field_accuracy: the reference {ref[:60]!r} is not a JSON object")
  keys = opts.fields or tuple(ref_obj)
  obj = parse_object(pred) or {}
  return sum(k in obj and json_equal(obj[k], ref_obj.get(k)) for k in keys) / max(len(keys), 1)


def _tokens(text: str) -> list[str]:
  return normalise(text, ("lower", "punctuation", "whitespace")).split()


def _token_f1(pred, ref, opts):
  """SQuAD's token F1: overlap of lower-cased, punctuation-free word bags."""
  p, r = _tokens(pred), _tokens(ref)
  if not p or not r:
    return float(p == r)
  common = sum((collections.Counter(p) & collections.Counter(r)).values())
  if not common:
    return 0.0
  precision, recall = common / len(p), common / len(r)
  return 2 * precision * recall / (precision + recall)


def _lcs(a, b) -> int:
  row = [0] * (len(b) + 1)
  for x in a:
    prev = 0
    for j, y in enumerate(b):
      prev, row[j + 1] = row[j + 1], prev + 1 if x == y else max(row[j + 1], row[j])
  return row[-1]


def _rouge_tokens(text: str) -> list[str]:
  """rouge-score's tokens: lower case, punctuation splits words ("fine-tuning": fine, tuning);
  unlike it, non-ASCII letters are kept."""
  return _PUNCT.sub(" ", text.lower()).split()


def _rouge_l(pred, ref, opts):
  """ROUGE-L F-measure (beta 1) over words, as rouge-score without stemming."""
  p, r = _rouge_tokens(pred), _rouge_tokens(ref)
  if not p or not r:
    return float(p == r)
  lcs = _lcs(p, r)
  if not lcs:
    return 0.0
  precision, recall = lcs / len(p), lcs / len(r)
  return 2 * precision * recall / (precision + recall)


def confusion(predictions, references, opts: Options = Options()) -> dict:
  """{"labels": reference labels by count, "pairs": {(ref, pred): n}} for classification."""
  refs = [_label(r, opts) for r in references]
  preds = [_label(p, opts) for p in predictions]
  return {"labels": collections.Counter(refs), "pairs": collections.Counter(zip(refs, preds))}


def _macro_f1(predictions, references, opts):
  """Mean F1 over the reference labels (a predicted label outside them counts as a miss)."""
  table = confusion(predictions, references, opts)
  pairs, f1s = table["pairs"], []
  for label in table["labels"]:
    tp = pairs[(label, label)]
    fp = sum(n for (r, p), n in pairs.items() if p == label and r != label)
    fn = sum(n for (r, p), n in pairs.items() if r == label and p != label)
    f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
  return float(np.mean(f1s)) if f1s else 0.0


METRICS = {m.name: m for m in (
    Metric("exact_match", _exact_match),
    Metric("json_valid", _json_valid),
    Metric("field_accuracy", _field_accuracy),
    Metric("label_accuracy", _label_accuracy),
    Metric("macro_f1", None, corpus=_macro_f1),
    Metric("rouge_l", _rouge_l),
    Metric("token_f1", _token_f1),
)}


def user_metric(spec: str) -> Metric:
  """"pkg.module:function" -> a Metric; FtjaxError when it does not import, is not a plain
  function, or belongs to a system module (os, sys, subprocess, shutil, builtins...)."""
  if ":" not in spec:
    raise FtjaxError(f"config: eval.metrics: {spec!r} is neither a built-in metric "
                     f"({', '.join(all_names())}) nor 'pkg.module:function'")
  fn = import_function(spec, key="eval.metrics", what="custom metric",
                       signature="(prediction, reference) -> float")
  return Metric(spec, lambda p, r, opts: float(fn(p, r)))


def all_names() -> tuple[str, ...]:
  return tuple(LOSS_METRICS) + tuple(METRICS)


def split_names(text: str) -> list[str]:
  return [n.strip() for n in text.split(",") if n.strip()]


def resolve(names: list[str]) -> dict[str, Metric]:
  """The generation metrics among `names` (loss metrics are computed by the eval loss pass);
  FtjaxError for an unknown name or a custom metric that does not import."""
  out = {}
  for name in names:
    if name in LOSS_METRICS:
      continue
    out[name] = METRICS[name] if name in METRICS else user_metric(name)
  return out


def higher_is_better(name: str) -> bool:
  return LOSS_METRICS.get(name, True)


def options(eval_cfg) -> Options:
  return Options(normalize=tuple(split_names(eval_cfg.normalize)),
                 fields=tuple(split_names(eval_cfg.fields)))


def primary(eval_cfg) -> str:
  """The metric that decides early stopping and the verdict: eval.primary, else the first of
  eval.metrics that this run computes (generation metrics need eval.generate), else loss.
  Passing over a generation metric is logged (once), so the switch to loss is never silent."""
  if eval_cfg.primary:
    return eval_cfg.primary
  names = split_names(eval_cfg.metrics)
  for name in names:
    if name in LOSS_METRICS or eval_cfg.generate:
      break
  else:
    name = "loss"
  if names and name != names[0]:
    _log_passed_over(name, tuple(names[:names.index(name)] if name in names else names))
  return name


@functools.lru_cache(maxsize=None)
def _log_passed_over(chosen: str, skipped: tuple[str, ...]) -> None:
  log.warning("eval.primary is %r: eval.metrics lists %s first, which needs eval.generate=True "
              "(set eval.primary, or eval.generate, to choose)", chosen, ", ".join(skipped))


def validate(eval_cfg) -> None:
  """Config-time checks of the eval block (custom metrics are imported here)."""
  names = split_names(eval_cfg.metrics)
  if not names:
    raise FtjaxError("config: eval.metrics is empty; give e.g. 'exact_match' or 'loss'")
  bad = [n for n in split_names(eval_cfg.normalize) if n not in NORMALIZERS]
  if bad:
    raise FtjaxError(f"config: eval.normalize has {bad}; expected a subset of {NORMALIZERS}")
  for name in names:
    if name not in all_names() and ":" not in name:
      raise FtjaxError(f"config: eval.metrics: unknown metric {name!r}; expected one of "
                       f"{', '.join(all_names())}, or 'pkg.module:function' for your own")
  resolve(names)
  size = eval_cfg.batch_size
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise FtjaxError(f"config: eval.batch_size={eval_cfg.batch_size!r}; expected an integer >= 0 "
                     "(0: as many prompts at once as memory allows)")
  if eval_cfg.primary and eval_cfg.primary not in names:
    raise FtjaxError(f"config: eval.primary={eval_cfg.primary!r} is not among eval.metrics={names}")
  if eval_cfg.primary and eval_cfg.primary not in LOSS_METRICS and not eval_cfg.generate:
    raise FtjaxError(f"config: eval.primary={eval_cfg.primary!r} is a generation metric: set "
                     "eval.generate=True (or choose loss, perplexity or token_accuracy)")
