"""Prompt data for GRPO (ftjax.objectives.grpo): `{"prompt": str | messages, ...columns}`.

The prompt is a user turn (a string; `data.system_prompt` or a record's "system" before it) or a
message list (a conversation ending where the model's reply starts). Every other key of the
record is a column handed to the reward functions as it is (e.g. the reference `answer`).

Problems, each at `path:LINE` with a stable code (the data check lists them):
  missing_field  no "prompt" key
  wrong_type     a prompt that is neither a string nor a list of {"role", "content"} messages
  empty_prompt   a prompt that is empty or only whitespace
  over_length    a prompt over data.seq_len - grpo.max_new_tokens tokens (data.length_policy:
                 truncate keeps its LAST tokens, where the question usually ends, as TRL's
                 left truncation; drop; error)

Rows (one per prompt): "prompt_ids" [seq_len - max_new_tokens] right-padded, "prompt_len" [],
"index" [] (the prompt's position in `items`, for its columns).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ftjax.data.dataset import check_length_policy, keep_over_length
from ftjax.data.sources import Problem
from ftjax.errors import FtjaxError

CODES = ("missing_field", "wrong_type", "empty_prompt", "over_length")


@dataclasses.dataclass
class PromptItem:
  where: str  # "path:LINE"
  prompt: list  # messages, the reply to come after them
  columns: dict  # the record's other keys, for the reward functions
  conversational: bool  # the record's prompt was a message list (completions are then too)
  text = None  # formats.Example's view, for the data check's quality and leakage signals

  @property
  def messages(self):
    return self.prompt

  @property
  def raw_prompt(self):
    """The prompt as reward functions get it (TRL): the string, or the message list."""
    if self.conversational:
      return [{"role": m["role"], "content": m["content"]} for m in self.prompt]
    return self.prompt[-1]["content"]


def _problem(code, where, text):
  return FtjaxError(f"{where}: {code}: {text}", code=code)


def record_prompt(record, system_prompt=None) -> PromptItem:
  """One record -> PromptItem, or FtjaxError with a code from CODES."""
  where, data = record.where, record.data
  if not isinstance(data, dict):
    raise _problem("wrong_type", where, "expected a JSON object with a 'prompt'")
  if "prompt" not in data:
    raise _problem("missing_field", where, "missing key 'prompt' (GRPO data is "
                   "{'prompt': str | messages, ...columns for the reward functions})")
  value = data["prompt"]
  columns = {k: v for k, v in data.items() if k not in ("prompt", "system")}
  system = data.get("system") or system_prompt
  if isinstance(value, str):
    if not value.strip():
      raise _problem("empty_prompt", where, "'prompt' is empty")
    messages = [{"role": "user", "content": value}]
    conversational = False
  elif isinstance(value, list) and value and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in value):
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if not "".join(m["content"] for m in messages).strip():
      raise _problem("empty_prompt", where, "'prompt' has no non-empty message")
    conversational = True
  else:
    raise _problem("wrong_type", where, "'prompt' must be a string or a non-empty list of "
                   f"{{'role', 'content'}} messages, got {type(value).__name__}")
  if system and messages[0]["role"] != "system":
    messages = [{"role": "system", "content": system}] + messages
  return PromptItem(where, messages, columns, conversational)


def read_prompts(records, *, system_prompt=None):
  """(valid items, problems) over a file's records; the check keeps going past bad records."""
  items, problems = [], []
  for record in records:
    try:
      items.append(record_prompt(record, system_prompt))
    except FtjaxError as e:
      problems.append(Problem(e.code or "wrong_type", record.where, str(e)))
  return items, problems


def prompt_tokens(item: PromptItem, tok) -> list[int]:
  """The prompt's token ids as the model continues it: the chat template with the generation
  prompt (the assistant turn opened), or the plain text when the tokenizer has no template."""
  if getattr(tok, "chat_template", None) and not getattr(tok, "plain_format", False):
    text = tok.apply_chat_template(item.prompt, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))
  return list(tok.encode("\n".join(m["content"] for m in item.prompt)))


def tokenize_prompts(items, tok, *, max_len: int, length_policy: str = "truncate"):
  """(kept [(item, ids)], counts, over_length Problems): prompts over `max_len` tokens keep their
  last max_len tokens, are dropped, or raise (length_policy)."""
  check_length_policy(length_policy)
  counts = dict(examples=len(items), over_length=0, truncated=0, dropped=0)
  kept, problems = [], []
  for item in items:
    ids = prompt_tokens(item, tok)
    if len(ids) > max_len:
      problems.append(Problem("over_length", item.where, f"{item.where}: over_length: prompt of "
                              f"{len(ids)} tokens, over data.seq_len - grpo.max_new_tokens = {max_len}"))
      why = problems[-1].message + " (data.length_policy='error')"
      if not keep_over_length(counts, length_policy, why):
        continue
      ids = ids[-max_len:]
    kept.append((item, ids))
  return kept, counts, problems


def prompt_rows(kept, max_len: int, pad_id: int = 0) -> dict:
  """{"prompt_ids" [n, max_len] right-padded, "prompt_len" [n], "index" [n]}."""
  n = len(kept)
  ids = np.full((n, max_len), pad_id, np.int32)
  lens = np.zeros(n, np.int32)
  for i, (_, toks) in enumerate(kept):
    ids[i, :len(toks)] = toks
    lens[i] = len(toks)
  return {"prompt_ids": ids, "prompt_len": lens, "index": np.arange(n, dtype=np.int32)}


def unpad(rows: dict) -> list[list[int]]:
  """The prompts of prompt rows as token lists (a padding row, prompt_len 0, gives [])."""
  return [list(r[:n]) for r, n in zip(np.asarray(rows["prompt_ids"]).tolist(),
                                         np.asarray(rows["prompt_len"]).tolist())]
