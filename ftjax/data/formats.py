"""Validate raw records and turn each into an `Example`: a chat conversation or a plain text.

Formats (auto-detected per file from the first record's keys, or forced with `format=`; every
record's keys are then checked against that format, see `check_keys`):
  input_output  {"input", "output", optional "system"}
  instruction   {"instruction", optional "input", "output", optional "system"} (alpaca); also
                self_instruct's {"instruction", "instances": [{"input", "output"}, ...]}, expanded
                to one example per instance
  chat          {"messages": [{"role", "content", optional "weight" 0|1}, ...]}
  text          {"text"} records or a .txt file: continued pretraining / perplexity, every token trained
Chat errors carry the codes hosted fine-tuning APIs use (data_type, missing_messages_list, ...), so
users can search for them. Every error raised here carries a `.code` (FtjaxError's) from CODES (the
stable names `python -m ftjax.data check` counts), so the checker reuses this one validator.
"""

import dataclasses
import functools

from ftjax.data import sources
from ftjax.errors import FtjaxError

FORMATS = ("input_output", "instruction", "chat", "text")
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight", "name")
# Stable problem codes (ftjax.data.selection); the message keeps the hosted-API wording.
CODES = ("data_type", "unknown_format", "mixed_format", "missing_field", "wrong_type", "unknown_key",
         "unknown_role", "invalid_weight", "no_assistant_turn")
# The top-level keys each format reads (after data.fields renaming).
FORMAT_KEYS = {"input_output": ("input", "output", "system"),
               "instruction": ("instruction", "input", "output", "system", "instances"),
               "chat": ("messages",), "text": ("text",)}
READ_KEYS = frozenset(k for keys in FORMAT_KEYS.values() for k in keys)


@dataclasses.dataclass
class Example:
  where: str  # "path:LINE" of the record it came from
  messages: list = None  # chat: [{"role", "content", "weight"}]; None for text examples
  text: str = None  # text examples only


def detect_format(record):
  """Format name for one record from its keys, or FtjaxError naming the keys seen."""
  data = record.data
  if isinstance(data, str):
    return "text"
  if not isinstance(data, dict):
    raise FtjaxError(code="data_type",
                     message=f"{record.where}: data_type: expected a JSON object, got {type(data).__name__}")
  for key, fmt in (("messages", "chat"), ("instruction", "instruction"), ("text", "text")):
    if key in data:
      return fmt
  if "input" in data or "output" in data:
    return "input_output"
  raise FtjaxError(code="unknown_format", message=f"{record.where}: cannot tell the data format from keys {sorted(data)}; expected 'messages' "
    "(chat), 'instruction' (+'output'), 'input' and 'output', or 'text'; set format= or map "
    "fields with fields={'question': 'input', ...}")


def to_examples(records, format="auto", fields=None, system_prompt=None):
  """Validate records (of one file) and convert them to Examples.

  fields: optional {source_key: our_key} renaming applied first, e.g. gsm8k's
  {"question": "input", "answer": "output"}. system_prompt: prepended as a system message to
  examples that have none.
  """
  if not records:
    return []
  records = [rename(r, fields) for r in records] if fields else records
  fmt = detect_format(records[0]) if format == "auto" else format
  detected_from = records[0].where if format == "auto" else None
  examples = []
  for record in records:
    examples.extend(record_examples(record, fmt, system_prompt, detected_from=detected_from))
  return examples


def record_examples(record, fmt, system_prompt=None, *, detected_from=None):
  """The Examples of one (renamed) record in a known format; FtjaxError with `.code` if invalid.

  detected_from: the record ("path:LINE") the format was detected from under format="auto"; a
  record whose own keys say another format is then a mixed_format error, not read as this one."""
  if fmt not in FORMATS:
    raise FtjaxError(f"format {fmt!r} is not one of {', '.join(('auto',) + FORMATS)}")
  if isinstance(record.data, dict):
    check_keys(record, fmt, detected_from)
  convert = {"input_output": _from_input_output, "instruction": _from_instruction,
             "chat": _from_chat, "text": _from_text}[fmt]
  examples = convert(record)
  for ex in examples:
    if ex.messages is not None and system_prompt and ex.messages[0]["role"] != "system":
      ex.messages.insert(0, {"role": "system", "content": system_prompt, "weight": 0})
  return examples


def check_keys(record, fmt, detected_from=None):
  """FtjaxError for a record whose keys do not fit the file's format `fmt`:

  mixed_format  (format="auto" only) the record's own keys say another format, e.g. an alpaca
                {"instruction", "input", "output"} record in a file whose first record was
                {"input", "output"}: read as input_output it would train without its instruction.
  unknown_key   a key the format does not read that is a near-miss of one it does: the same
                ignoring case, or one edit away (two for the 8+ letter keys instruction,
                instances, messages), e.g. "sytem", "Output", "mesages". Checked first: a
                misspelt key is the likelier cause of a record that looks like another format.
                Also (format="auto" only) a key another format reads beside the record's own,
                e.g. a top-level "system" in a chat record, which the chat format would drop;
                but not "text", a rendered copy many HF datasets carry (tatsu-lab/alpaca).
  Other keys are metadata and ignored, as HF datasets' extra columns ("id", "category",
  "source", ...) usually are. A format forced with format= reads what it reads, on purpose."""
  data = record.data
  for key in data:
    if key in READ_KEYS or not isinstance(key, str):
      continue
    near = _near_miss(key, FORMAT_KEYS[fmt])
    if near:
      raise FtjaxError(code="unknown_key", message=f"{record.where}: unknown_key: {key!r} is not read by "
                       f"the {fmt} format (keys {', '.join(FORMAT_KEYS[fmt])}); did you mean {near!r}? "
                       "(rename keys with data.fields)")
  if detected_from is not None:
    try:
      own = detect_format(record)
    except FtjaxError:
      own = None  # no format's keys at all: the converter says what is missing
    if own is not None and own != fmt:
      raise FtjaxError(code="mixed_format", message=f"{record.where}: mixed_format: keys {sorted(data)} "
                       f"are the {own} format, but this file is {fmt} (detected from {detected_from}); "
                       "use one format per file, or set data.format")
    other = sorted(k for k in data if k in READ_KEYS and k not in FORMAT_KEYS[fmt] and k != "text")
    if other:
      hint = ("a system prompt goes in messages as {'role': 'system', ...} or in data.system_prompt"
              if fmt == "chat" and "system" in other else "drop or rename them, or set data.format")
      raise FtjaxError(code="unknown_key", message=f"{record.where}: unknown_key: {other} are read by "
                       f"another format, not by {fmt} (keys {', '.join(FORMAT_KEYS[fmt])}); {hint}")


@functools.lru_cache(maxsize=4096)  # a file repeats its few keys on every record
def _near_miss(key, candidates):
  """The candidate `key` looks like a misspelling of, or None."""
  folded = key.casefold()
  for candidate in candidates:
    if _edit_distance(folded, candidate) <= (2 if len(candidate) >= 8 else 1):
      return candidate
  return None


def _edit_distance(a, b):
  """Optimal string alignment distance: insertions, deletions, substitutions and swaps of two
  neighbouring letters ("outptu") each cost 1."""
  prev2, prev = None, list(range(len(b) + 1))
  for i in range(1, len(a) + 1):
    row = [i] + [0] * len(b)
    for j in range(1, len(b) + 1):
      row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
      if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
        row[j] = min(row[j], prev2[j - 2] + 1)
    prev2, prev = prev, row
  return prev[-1]


def rename(record, fields):
  """The record with its keys renamed by {source_key: our_key} (non-objects unchanged)."""
  if not isinstance(record.data, dict):
    return record
  data = {fields.get(k, k): v for k, v in record.data.items()}
  return dataclasses.replace(record, data=data)


def _need_object(record):
  if not isinstance(record.data, dict):
    raise FtjaxError(code="data_type", message=f"{record.where}: data_type: expected a JSON object, got "
                 f"{type(record.data).__name__}")
  return record.data


def _need_str(record, data, key, optional=False):
  if key not in data:
    if optional:
      return ""
    raise FtjaxError(code="missing_field", message=f"{record.where}: missing key {key!r}")
  value = data[key]
  if not isinstance(value, str):
    raise FtjaxError(code="wrong_type", message=f"{record.where}: key {key!r} must be a string, got {type(value).__name__}")
  return value


def _conversation(record, user, output, data):
  messages = []
  system = _need_str(record, data, "system", optional=True)
  if system:
    messages.append({"role": "system", "content": system, "weight": 0})
  messages.append({"role": "user", "content": user, "weight": 0})
  messages.append({"role": "assistant", "content": output, "weight": 1})
  return Example(record.where, messages=messages)


def _from_input_output(record):
  data = _need_object(record)
  user = _need_str(record, data, "input")
  return [_conversation(record, user, _need_str(record, data, "output"), data)]


def _from_instruction(record):
  data = _need_object(record)
  instruction = _need_str(record, data, "instruction")
  if "instances" in data and "output" not in data:
    instances = data["instances"]
    if not isinstance(instances, list) or not instances:
      raise FtjaxError(code="wrong_type", message=f"{record.where}: key 'instances' must be a non-empty list of "
                       "{'input', 'output'} objects")
    pairs = []
    for i, inst in enumerate(instances):
      if not isinstance(inst, dict):
        raise FtjaxError(code="wrong_type", message=f"{record.where}: instances[{i}] must be an object with 'input', 'output'")
      pairs.append((_need_str(record, inst, "input", optional=True),
                    _instance_output(record, inst, i)))
  else:
    pairs = [(_need_str(record, data, "input", optional=True), _need_str(record, data, "output"))]
  # Alpaca convention: the input, when present, follows the instruction after a blank line.
  return [_conversation(record, instruction + ("\n\n" + inp if inp else ""), out, data)
          for inp, out in pairs]


def _instance_output(record, inst, i):
  if "output" not in inst:
    raise FtjaxError(code="missing_field", message=f"{record.where}: missing key 'output' in instances[{i}]")
  if not isinstance(inst["output"], str):
    raise FtjaxError(code="wrong_type", message=f"{record.where}: instances[{i}].output must be a string")
  return inst["output"]


def _from_text(record):
  if isinstance(record.data, str):
    return [Example(record.where, text=record.data)]
  data = _need_object(record)
  return [Example(record.where, text=_need_str(record, data, "text"))]


def _from_chat(record):
  where = record.where
  if not isinstance(record.data, dict):
    raise FtjaxError(code="data_type", message=f"{where}: data_type: expected a JSON object with 'messages', got "
                 f"{type(record.data).__name__}")
  messages = record.data.get("messages")
  if not isinstance(messages, list) or not messages:
    raise FtjaxError(code="missing_field", message=f"{where}: missing_messages_list: expected key 'messages' holding a non-empty "
                     "list of {'role', 'content'} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise FtjaxError(code="data_type", message=f"{where}: data_type: messages[{i}] must be an object, got {type(m).__name__}")
    unknown = sorted(set(m) - set(MESSAGE_KEYS))
    if unknown:
      raise FtjaxError(code="unknown_key", message=f"{where}: message_unrecognized_key: messages[{i}] has key(s) {unknown}; "
                       f"expected only {', '.join(MESSAGE_KEYS)}")
    if "role" not in m:
      raise FtjaxError(code="missing_field", message=f"{where}: message_missing_key: messages[{i}] has no 'role'")
    if m["role"] not in ROLES:
      raise FtjaxError(code="unknown_role", message=f"{where}: unrecognized_role: messages[{i}] has role {m['role']!r}; "
                       f"expected one of {', '.join(ROLES)}")
    if not isinstance(m.get("content"), str):
      raise FtjaxError(code="wrong_type" if "content" in m else "missing_field", message=f"{where}: missing_content: messages[{i}] needs 'content' as a string")
    weight = m.get("weight", 1 if m["role"] == "assistant" else 0)
    if weight not in (0, 1) or isinstance(weight, bool):
      raise FtjaxError(code="invalid_weight", message=f"{where}: invalid_weight: messages[{i}] has weight {weight!r}; expected 0 or 1")
    if m["role"] != "assistant" and weight:
      raise FtjaxError(code="invalid_weight", message=f"{where}: invalid_weight: messages[{i}] is a {m['role']} message; only "
                       "assistant messages can be trained (weight 1)")
    out.append({"role": m["role"], "content": m["content"], "weight": int(weight)})
  if not any(m["role"] == "assistant" for m in out):
    raise FtjaxError(code="no_assistant_turn", message=f"{where}: example_missing_assistant_message: no message with role "
                     "'assistant' to train on")
  return [Example(where, messages=out)]


def parse_fields(text: str) -> dict | None:
  """data.fields: "question:input,answer:output" -> {"question": "input", "answer": "output"};
  "": None."""
  pairs = [p.split(":") for p in text.split(",") if p.strip()]
  if any(len(p) != 2 or not all(x.strip() for x in p) for p in pairs):
    raise FtjaxError(f"config: data.fields={text!r}; expected 'source:ours' pairs, e.g. "
                     "'question:input,answer:output'")
  return {a.strip(): b.strip() for a, b in pairs} or None


def validate_records(records, *, format="auto", fields=None, system_prompt=None):
  """(examples, problems): record_examples on each record, its errors collected: the data check
  reads every bad record (each a sources.Problem), where training stops at the first."""
  records = [rename(r, fields) for r in records] if fields else records
  fmt, detected_from = format, None
  if fmt == "auto":  # training detects from the first record; here the first one that tells
    fmt = None
    for r in records:
      try:
        fmt, detected_from = detect_format(r), r.where
        break
      except FtjaxError:
        continue
  examples, problems = [], []
  for r in records:
    try:
      found = record_examples(r, fmt or detect_format(r), system_prompt,
                              detected_from=detected_from)
    except FtjaxError as e:
      problems.append(sources.Problem(e.code or "invalid", r.where, str(e)))
      continue
    empty = [ex for ex in found if ex.messages is not None and any(
        m["role"] == "assistant" and m["weight"] and not m["content"].strip() for m in ex.messages)]
    if empty:
      problems.append(sources.Problem("empty_output", r.where,
                                      f"{r.where}: empty_output: an assistant turn to train on is empty"))
      continue
    examples.extend(found)
  return examples, problems
