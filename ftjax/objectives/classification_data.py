"""Sequence classification's records (ftjax.objectives.classification): labelled texts read
and checked at file:line, class names, the split's label signals, a text's token ids. Both the
objective and its data check (classification_check) use them, so they sit below both.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np

from ftjax.data import dataset as dataset_lib
from ftjax.data import formats, sources
from ftjax.data.quality import normalise
from ftjax.errors import FtjaxError

PROBLEM_TYPES = ("single_label", "multi_label")
TEMPLATES = ("none", "chat")
TEXT_KEYS = ("input", "text")
LABEL_KEY = "label"
RARE_CLASS = 5  # a class with fewer train examples than this is flagged
IMBALANCE = 10.0  # largest / smallest class count above this is flagged


@dataclasses.dataclass(frozen=True)
class LabeledText:
  where: str  # "path:LINE"
  text: str
  labels: tuple[str, ...]  # one name under single_label


@dataclasses.dataclass(frozen=True)
class Problem:
  code: str
  where: str
  message: str


# --- class names ---------------------------------------------------------------------------------

def resolve_labels(spec: str, train: list[LabeledText] | None = None) -> list[str]:
  """Class names in id order from classification.labels: "" = the sorted distinct train labels,
  an existing file = one name a line (blank lines skipped), otherwise a comma-separated list."""
  spec = (spec or "").strip()
  if not spec:
    if not train:
      raise FtjaxError("classification.labels is empty and there is no train data to take the "
                       "class names from; list them (\"a,b,c\") or name a file")
    return sorted({label for ex in train for label in ex.labels})
  if os.path.isfile(spec):
    with open(spec, encoding="utf-8") as f:
      names = [line.strip() for line in f if line.strip()]
    where = spec
  else:
    names = [name.strip() for name in spec.split(",")]
    where = "classification.labels"
  if not names or any(not n for n in names):
    raise FtjaxError(f"{where}: an empty class name in {spec!r}")
  repeated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
  if repeated:
    raise FtjaxError(f"{where}: class {repeated[0]!r} is listed twice")
  return names


# --- records ---------------------------------------------------------------------------------------

def parse_record(record, problem_type: str, fields: dict | None = None) -> LabeledText:
  """One record -> LabeledText, or FtjaxError with a stable code at the record's file:line."""
  if fields:
    record = formats.rename(record, fields)
  data = record.data
  if not isinstance(data, dict):
    raise FtjaxError(f"{record.where}: data_type: expected an object with 'input' (or 'text') and "
                     f"'label', got {type(data).__name__}", code="data_type")
  key = next((k for k in TEXT_KEYS if k in data), None)
  if key is None:
    raise FtjaxError(f"{record.where}: missing key 'input' (or 'text'); keys {sorted(data)} (map "
                     "yours with data.fields)", code="missing_field")
  if not isinstance(data[key], str):
    raise FtjaxError(f"{record.where}: key {key!r} must be a string, got {type(data[key]).__name__}",
                     code="wrong_type")
  if LABEL_KEY not in data:
    raise FtjaxError(f"{record.where}: missing key 'label'", code="missing_field")
  return LabeledText(record.where, data[key], _labels(record.where, data[LABEL_KEY], problem_type))


def _labels(where: str, value, problem_type: str) -> tuple[str, ...]:
  if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and np.ndim(value)):
    if problem_type == "single_label":
      raise FtjaxError(f"{where}: label_list: label {list(value)!r} is a list under "
                       "classification.problem_type='single_label' (use 'multi_label')",
                       code="label_list")
    names = [str(v).strip() for v in value]
  elif value is None or isinstance(value, (dict, bool)):
    raise FtjaxError(f"{where}: wrong_type: label must be a string, got {value!r}", code="wrong_type")
  else:  # a str, or a number a CSV / parquet column holds
    text = str(value).strip()
    names = [n.strip() for n in text.split(",")] if problem_type == "multi_label" else [text]
    if not text:
      names = []
  if not names or any(not n for n in names):
    raise FtjaxError(f"{where}: empty_label: the label is empty", code="empty_label")
  return tuple(dict.fromkeys(names))


def read_split(path, problem_type: str, fields: dict | None = None):
  """(examples, problems) of a data path (file, folder or list): every bad record listed."""
  examples, problems = [], []
  for p in dataset_lib.expand(path):
    records, unread = sources.read_all(p)
    problems += [Problem(u.code, u.where, u.message) for u in unread]
    for record in records:
      try:
        examples.append(parse_record(record, problem_type, fields))
      except FtjaxError as e:
        problems.append(Problem(e.code or "invalid", record.where, str(e)))
  return examples, problems


def check_records(examples: list[LabeledText], names: list[str]) -> list[Problem]:
  """unknown_label for every label outside `names`, at its file:line."""
  known = set(names)
  return [Problem("unknown_label", ex.where,
                  f"{ex.where}: unknown_label: {label!r} is not one of the {len(names)} classes "
                  f"(classification.labels), e.g. {', '.join(map(repr, names[:3]))}")
          for ex in examples for label in ex.labels if label not in known]


def label_signals(examples: list[LabeledText], names: list[str], *, rare: int = RARE_CLASS,
                  imbalance: float = IMBALANCE) -> list[Problem]:
  """Warnings over a split: rare_class, imbalance, conflicting_labels (with locations)."""
  counts = collections.Counter(label for ex in examples for label in ex.labels)
  out = [Problem("rare_class", _first(examples, n),
                 f"rare_class: {n!r} has {counts[n]} example(s) (< {rare})")
         for n in names if counts[n] < rare]
  present = [counts[n] for n in names if counts[n]]
  if present and max(present) > imbalance * min(present):
    big = max(names, key=lambda n: counts[n])
    small = min((n for n in names if counts[n]), key=lambda n: counts[n])
    out.append(Problem("imbalance", "", f"imbalance: {big!r} has {counts[big]} examples, {small!r} "
                       f"{counts[small]} (ratio > {imbalance:g}); consider classification.class_weights"))
  by_text = collections.defaultdict(list)
  for ex in examples:
    by_text[normalise(ex.text)].append(ex)
  for group in by_text.values():
    if len({ex.labels for ex in group}) > 1:
      out.append(Problem("conflicting_labels", group[0].where,
                         f"{group[0].where}: conflicting_labels: the same text is labelled "
                         + ", ".join(f"{'+'.join(ex.labels)!r} at {ex.where}" for ex in group[:4])))
  return out


def _first(examples, name):
  return next((ex.where for ex in examples if name in ex.labels), "")


def encode(tokenizer, text: str, template: str) -> list[int]:
  """Token ids of one text: as it is (BOS if the tokenizer adds one), or as a chat user turn
  with the generation prompt; no EOS either way (see the module docstring)."""
  if template == "chat":
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)
  ids = tokenizer.encode(text)
  eos = tokenizer.eos_token_id
  return ids[:-1] if ids and eos is not None and ids[-1] == eos and len(ids) > 1 else ids
