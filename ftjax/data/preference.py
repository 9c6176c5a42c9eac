"""Preference data in TRL's formats -> rows for the preference objectives (ftjax.objectives).

Paired records (DPO, ORPO, SimPO), detected per record from its keys:
  standard        {"prompt": str, "chosen": str, "rejected": str, optional "system"}: the prompt is
                  the user turn, each reply the assistant turn, the chat template applied.
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}: the prompt
                  may hold a system turn and earlier turns; the replies are assistant messages.
  implicit prompt {"chosen": [messages], "rejected": [messages]}: two whole conversations; their
                  longest shared prefix of messages is the prompt (TRL's extract_prompt).
Unpaired records (KTO): {"prompt", "completion", "label": true|false}, strings or message lists.

A pair becomes two chat examples (prompt turns untrained, reply turns trained), tokenised by
ftjax.data.template like SFT data; one row holds the pair as [2, seq] per key (chosen at 0),
so a batch is [B, 2, seq] and the loss lays it out as one [2B, seq] forward. KTO rows hold the
example and its mismatched KL sequence: this prompt with the previous example's completion
(TRL rotates completions by one within each batch; ftjax's loader shuffles rows, so the rotation
runs over the file order: the KL estimate then mixes completions of other batches, still
mismatched pairs, which is what the estimate needs).

Problems, each at `path:LINE` with a stable code (the data check lists them):
  missing_field / wrong_type  a key absent or of the wrong type (formats' codes)
  empty_reply                 a chosen / rejected / completion that is empty or only whitespace
  identical_replies           chosen == rejected: the pair teaches nothing
  bad_label                   a KTO label that is not true / false
  over_length                 prompt + a reply over seq_len + 1 tokens (data.length_policy:
                              truncate both replies, drop the pair, or error)
  duplicate_pair              the same (prompt, chosen, rejected) again in train
Prompts shared between train and eval are the data check's leakage section (a pair's user
turns are its prompt; exact and near repeats), as for SFT data.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ftjax.data import cache, formats, packing
from ftjax.data.dataset import check_length_policy, keep_over_length
from ftjax.data.quality import normalise
from ftjax.data.sources import Problem, Record
from ftjax.errors import FtjaxError

CODES = ("missing_field", "wrong_type", "empty_reply", "identical_replies", "bad_label",
         "over_length", "duplicate_pair")


@dataclasses.dataclass
class Pair:
  where: str  # "path:LINE"
  prompt: list  # messages, untrained
  chosen: list  # assistant messages, trained
  rejected: list
  text = None  # formats.Example's view, for the data check's quality and leakage signals

  @property
  def messages(self):
    """The prompt and the chosen reply: what the data check's text views read (its leakage
    section then compares prompts, the user turns, between train and eval)."""
    return self.prompt + self.chosen


@dataclasses.dataclass
class Unpaired:
  where: str
  prompt: list
  completion: list
  label: bool  # True: desirable
  text = None

  @property
  def messages(self):
    return self.prompt + self.completion


def _problem(code, where, text):
  return FtjaxError(f"{where}: {code}: {text}", code=code)


def _messages(where, value, key, *, reply: bool):
  """A string or a message list -> messages; replies become assistant turns (weight 1)."""
  if isinstance(value, str):
    if reply and not value.strip():
      raise _problem("empty_reply", where, f"'{key}' is empty")
    return [{"role": "assistant" if reply else "user", "content": value, "weight": int(reply)}]
  if not isinstance(value, list) or not value:
    raise _problem("wrong_type", where, f"'{key}' must be a string or a non-empty list of messages")
  record = Record(where, {"messages": value if reply else value + [{"role": "assistant", "content": "x"}]})
  try:
    messages = formats._from_chat(record)[0].messages
  except FtjaxError as e:
    if e.code == "no_assistant_turn":
      raise _problem("wrong_type", where, f"'{key}' holds no assistant message") from None
    raise FtjaxError(f"{e} (in '{key}')", code=e.code) from None
  messages = messages if reply else messages[:-1]
  for m in messages:
    m["weight"] = int(reply and m["role"] == "assistant")
  if reply and not "".join(m["content"] for m in messages if m["weight"]).strip():
    raise _problem("empty_reply", where, f"'{key}' has no non-empty assistant message")
  return messages


def _reply(where, messages, key):
  """The turns after an implicit prompt, assistant turns trained."""
  for m in messages:
    m["weight"] = int(m["role"] == "assistant")
  if not _reply_text(messages).strip():
    raise _problem("empty_reply", where, f"'{key}' has no non-empty assistant message after the "
                   "prompt it shares with the other reply")
  return messages


def _shared_prefix(chosen, rejected):
  n = 0
  while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
    n += 1
  return n


def _with_system(messages, system):
  if system and messages[0]["role"] != "system":
    return [{"role": "system", "content": system, "weight": 0}] + messages
  return messages


def record_pair(record, system_prompt=None) -> Pair:
  """One paired record -> Pair, or FtjaxError with a code from CODES."""
  where, data = record.where, record.data
  if not isinstance(data, dict):
    raise _problem("wrong_type", where, "expected a JSON object with 'chosen' and 'rejected'")
  for key in ("chosen", "rejected"):
    if key not in data:
      raise _problem("missing_field", where, f"missing key '{key}' (a preference pair needs "
                     "'prompt', 'chosen', 'rejected', or whole conversations in 'chosen' and 'rejected')")
  system = data.get("system") or system_prompt
  if "prompt" not in data:  # implicit prompt: whole conversations sharing a prefix
    if not (isinstance(data["chosen"], list) and isinstance(data["rejected"], list)):
      raise _problem("missing_field", where, "missing key 'prompt' (string replies need one; "
                     "an implicit prompt needs 'chosen' and 'rejected' as message lists)")
    chosen = _messages(where, data["chosen"], "chosen", reply=False)
    rejected = _messages(where, data["rejected"], "rejected", reply=False)
    n = _shared_prefix(chosen, rejected)
    prompt = chosen[:n]
    chosen, rejected = _reply(where, chosen[n:], "chosen"), _reply(where, rejected[n:], "rejected")
  else:
    prompt = _messages(where, data["prompt"], "prompt", reply=False)
    chosen = _messages(where, data["chosen"], "chosen", reply=True)
    rejected = _messages(where, data["rejected"], "rejected", reply=True)
  if _reply_text(chosen) == _reply_text(rejected):
    raise _problem("identical_replies", where, "'chosen' and 'rejected' are the same reply")
  return Pair(where, _with_system(prompt, system), chosen, rejected)


def record_unpaired(record, system_prompt=None) -> Unpaired:
  """One KTO record {"prompt", "completion", "label"} -> Unpaired, or FtjaxError."""
  where, data = record.where, record.data
  if not isinstance(data, dict):
    raise _problem("wrong_type", where, "expected a JSON object with 'prompt', 'completion', 'label'")
  for key in ("prompt", "completion", "label"):
    if key not in data:
      raise _problem("missing_field", where, f"missing key '{key}' (KTO data is "
                     "{'prompt', 'completion', 'label': true|false})")
  if not isinstance(data["label"], bool):
    raise _problem("bad_label", where, f"'label' must be true or false, got {data['label']!r}")
  prompt = _messages(where, data["prompt"], "prompt", reply=False)
  completion = _messages(where, data["completion"], "completion", reply=True)
  return Unpaired(where, _with_system(prompt, data.get("system") or system_prompt), completion,
                  data["label"])


def _reply_text(messages):
  return "\n".join(m["content"] for m in messages if m["weight"])


def read_pairs(records, *, system_prompt=None, unpaired=False):
  """(valid items, problems) over a file's records; the check keeps going past bad records."""
  convert = record_unpaired if unpaired else record_pair
  items, problems = [], []
  for record in records:
    try:
      items.append(convert(record, system_prompt))
    except FtjaxError as e:
      problems.append(Problem(e.code or "wrong_type", record.where, str(e)))
  return items, problems


# --- quality across records -----------------------------------------------------------------------

def prompt_text(item) -> str:
  return normalise("\n".join(m["content"] for m in item.prompt if m["role"] != "system"))


def duplicates(pairs) -> list:
  """duplicate_pair Problems: a (prompt, chosen, rejected) seen before in the split."""
  first, out = {}, []
  for p in pairs:
    key = (prompt_text(p), normalise(_reply_text(p.chosen)), normalise(_reply_text(p.rejected)))
    if key in first:
      out.append(Problem("duplicate_pair", p.where, f"{p.where}: duplicate_pair: the same prompt "
                         f"and replies as {first[key]}"))
    else:
      first[key] = p.where
  return out


# --- tokens and rows ------------------------------------------------------------------------------

def _examples(item) -> list:
  """The two chat examples of a Pair or an Unpaired (its completion twice: the KL slot is
  filled by `kto_rows`)."""
  replies = (item.chosen, item.rejected) if isinstance(item, Pair) else (item.completion,)
  return [formats.Example(item.where, messages=item.prompt + r) for r in replies]


def tokenize_items(items, tok, *, max_len, length_policy="truncate"):
  """(kept items' TokenizedExamples per item, counts, over_length Problems) under the policy:
  a pair over max_len has both replies truncated, or is dropped, or raises (length_policy)."""
  check_length_policy(length_policy)
  flat = [ex for item in items for ex in _examples(item)]
  tokenized = cache.tokenize(flat, tok) if flat else []
  per = len(flat) // max(len(items), 1)
  counts = dict(examples=len(items), over_length=0, truncated=0, dropped=0, no_trained_tokens=0)
  kept, problems = [], []
  for i, item in enumerate(items):
    texs = tokenized[i * per:(i + 1) * per]
    longest = max(len(t.tokens) for t in texs)
    if longest > max_len:
      problems.append(Problem("over_length", item.where, f"{item.where}: over_length: {longest} "
                              f"tokens with a reply, over seq_len + 1 = {max_len}"))
      why = problems[-1].message + " (data.length_policy='error')"
      if not keep_over_length(counts, length_policy, why):
        continue
      texs = [dataclasses.replace(t, tokens=t.tokens[:max_len], loss_mask=t.loss_mask[:max_len])
              for t in texs]
    if not all(t.loss_mask.any() for t in texs):
      counts["no_trained_tokens"] += 1  # the prompt alone fills max_len
      continue
    kept.append((item, texs))
  return kept, counts, problems


def _rows(texs, seq_len, pad_id):
  """Unpacked rows of TokenizedExamples, plus "target_mask" (every real target: ORPO's NLL)."""
  rows = packing.pack(texs, seq_len, pack=False, pad_id=pad_id)
  every = [dataclasses.replace(t, loss_mask=np.ones_like(t.loss_mask)) for t in texs]
  rows["target_mask"] = packing.pack(every, seq_len, pack=False, pad_id=pad_id)["loss_mask"]
  return rows


def pair_rows(kept, seq_len, pad_id=0) -> dict:
  """{key: [n, 2, seq]} from `tokenize_items`' pairs: chosen at index 0, rejected at 1."""
  chosen = _rows([texs[0] for _, texs in kept], seq_len, pad_id)
  rejected = _rows([texs[1] for _, texs in kept], seq_len, pad_id)
  return {k: np.stack([chosen[k], rejected[k]], axis=1) for k in chosen}


def kto_rows(kept, tok, seq_len, pad_id=0) -> dict:
  """{key: [n, 2, seq]} (the example, its KL sequence: this prompt + the previous example's
  completion, cyclic in file order) and "label" [n] (1.0 desirable)."""
  items = [item for item, _ in kept]
  kl_examples = [formats.Example(item.where, messages=item.prompt + items[i - 1].completion)
                 for i, item in enumerate(items)]
  kl = [dataclasses.replace(t, tokens=t.tokens[:seq_len + 1], loss_mask=t.loss_mask[:seq_len + 1])
        for t in cache.tokenize(kl_examples, tok)]
  main = _rows([texs[0] for _, texs in kept], seq_len, pad_id)
  kl_rows = _rows(kl, seq_len, pad_id)
  out = {k: np.stack([main[k], kl_rows[k]], axis=1) for k in main}
  out["label"] = np.array([float(item.label) for item in items], np.float32)
  return out
