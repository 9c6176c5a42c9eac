"""GRPO's reward functions: built-in ones, and the user's own with TRL's signature.

`grpo.reward_funcs = "exact_answer,mypkg.rewards:brevity"`: each function is called once per
batch of rollouts as `fn(prompts, completions, **columns) -> list[float | None]`, TRL's
signature: `prompts` and `completions` are lists of strings (message lists for conversational
prompts), one entry per completion (a prompt repeated for each of its G completions), and
`columns` holds the dataset's other columns the same way (e.g. `answer`). None means "this
function cannot score this completion": it is left out of that completion's weighted sum, and a
completion no function can score gets advantage 0 (as in TRL).
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, Sequence

import numpy as np

from ftjax.errors import FtjaxError
from ftjax.user_functions import import_function

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def _text(completion) -> str:
  if isinstance(completion, list):  # conversational: the assistant message(s)
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
  return str(completion)


def _normalise_answer(text: str) -> str:
  text = text.strip().lower().replace(",", "")
  try:  # numbers compare as numbers: "42", "42.0" and "42.00" are one answer
    value = float(text)
    return repr(int(value)) if value.is_integer() else repr(value)
  except ValueError:
    return " ".join(text.split())


def extract_answer(completion) -> str | None:
  """The answer a completion gives: inside <answer>...</answer> when there is one, else its
  last number; None when it gives neither."""
  text = _text(completion)
  tagged = _ANSWER_TAG.findall(text)
  if tagged:
    return tagged[-1]
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def exact_answer(prompts, completions, answer=None, **columns) -> list[float | None]:
  """1.0 when the completion's answer (`extract_answer`) equals the `answer` column after
  normalisation (case, spaces, thousands commas; numbers by value), else 0.0; None for an
  example without an answer."""
  if answer is None:
    raise FtjaxError("grpo.reward_funcs: exact_answer needs an 'answer' column in the data")
  out = []
  for completion, want in zip(completions, answer):
    if want is None or str(want).strip() == "":
      out.append(None)
      continue
    got = extract_answer(completion)
    out.append(float(got is not None and _normalise_answer(got) == _normalise_answer(str(want))))
  return out


def json_valid(prompts, completions, **columns) -> list[float]:
  """1.0 when the completion (stripped, or the first {...} / [...] block in it) parses as JSON."""
  out = []
  for completion in completions:
    text = _text(completion).strip()
    match = re.search(r"[\[{].*[\]}]", text, re.S)
    candidates = [text] + ([match.group(0)] if match else [])
    out.append(float(any(_parses(c) for c in candidates)))
  return out


def _parses(text: str) -> bool:
  try:
    json.loads(text)
    return True
  except ValueError:
    return False


def answer_format(prompts, completions, **columns) -> list[float]:
  """1.0 when the completion gives exactly one <answer>...</answer> with something in it (the
  format exact_answer reads first), else 0.0: a dense signal while answers are still wrong."""
  return [float(len(tags) == 1 and bool(tags[0].strip()))
          for tags in (_ANSWER_TAG.findall(_text(c)) for c in completions)]


def length_penalty(prompts, completions, **columns) -> list[float]:
  """-(characters / 1000): with a small weight, prefers the shorter of equally good answers."""
  return [-len(_text(c)) / 1000.0 for c in completions]


BUILT_IN: dict[str, Callable] = {"exact_answer": exact_answer, "answer_format": answer_format,
                                 "json_valid": json_valid, "length_penalty": length_penalty}
SIGNATURE = "(prompts, completions, **columns) -> list[float | None]"


class Rewards:
  """The configured reward functions and weights; `__call__` scores a batch of rollouts."""

  def __init__(self, funcs: str, weights: str = ""):
    names = [n.strip() for n in funcs.split(",") if n.strip()]
    if not names:
      raise FtjaxError("config: grpo.reward_funcs is empty; name at least one reward function "
                       f"(built in: {', '.join(BUILT_IN)}; or 'pkg.module:function' {SIGNATURE})")
    self.names = names
    self.funcs = [BUILT_IN[n] if n in BUILT_IN else
                  import_function(n, key="grpo.reward_funcs", what="reward function",
                                  signature=SIGNATURE) for n in names]
    w = [x.strip() for x in weights.split(",") if x.strip()]
    if w and len(w) != len(names):
      raise FtjaxError(f"config: grpo.reward_weights has {len(w)} weight(s) for {len(names)} "
                       f"reward function(s) ({', '.join(names)}); give one per function or none")
    try:
      self.weights = np.asarray([float(x) for x in w] if w else [1.0] * len(names), np.float32)
    except ValueError:
      raise FtjaxError(f"config: grpo.reward_weights={weights!r}; expected comma-separated "
                       "numbers") from None

  def __call__(self, prompts: Sequence, completions: Sequence, columns: dict) -> np.ndarray:
    """[completions, functions] float32, NaN where a function returned None."""
    out = np.full((len(completions), len(self.funcs)), np.nan, np.float32)
    for j, (name, fn) in enumerate(zip(self.names, self.funcs)):
      values = self._call(name, fn, prompts, completions, columns)
      for i, v in enumerate(values):
        if v is None:
          continue
        if not isinstance(v, (int, float, np.number)) or isinstance(v, bool) or not math.isfinite(v):
          raise FtjaxError(f"grpo.reward_funcs: {name} returned {v!r} for completion {i} "
                           f"(prompt {_short(prompts[i])}); expected a finite number or None")
        out[i, j] = v
    return out

  def weighted_sum(self, per_func: np.ndarray) -> np.ndarray:
    """TRL's sum_then_normalize: the weighted sum over the functions that scored, NaN where
    none did."""
    total = np.nansum(per_func * self.weights, axis=1)
    return np.where(np.isnan(per_func).all(axis=1), np.nan, total).astype(np.float32)

  @staticmethod
  def _call(name, fn, prompts, completions, columns) -> list:
    try:
      values = list(fn(prompts=list(prompts), completions=list(completions), **columns))
    except FtjaxError:
      raise
    except Exception as e:
      # Find the completion it fails on, one at a time, so the error names the prompt.
      for i in range(len(completions)):
        try:
          fn(prompts=[prompts[i]], completions=[completions[i]],
             **{k: [v[i]] for k, v in columns.items()})
        except Exception as one:
          raise FtjaxError(f"grpo.reward_funcs: {name} raised {type(one).__name__}: {one} on "
                           f"completion {i} (prompt {_short(prompts[i])})") from None
      raise FtjaxError(f"grpo.reward_funcs: {name} raised {type(e).__name__}: {e} on the "
                       "batch (each completion alone scores)") from None
    if len(values) != len(completions):
      raise FtjaxError(f"grpo.reward_funcs: {name} returned {len(values)} values for "
                       f"{len(completions)} completions; expected one per completion")
    return values


def _short(prompt) -> str:
  text = _text(prompt)
  return repr(text[:60] + ("..." if len(text) > 60 else ""))
