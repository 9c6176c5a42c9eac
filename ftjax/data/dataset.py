"""read -> validate -> template -> tokenize -> length policy -> pack, with a summary of what happened."""

import dataclasses
import os

from ftjax.errors import FtjaxError
from ftjax.data import cache, formats, packing, sources, template
from ftjax.data.loader import Loader

LENGTH_POLICIES = ("truncate", "drop", "error")
EXTENSIONS = (".jsonl", ".json", ".txt", ".parquet", ".csv", ".tsv", ".arrow")


def expand(path):
  """Sources of a data path: a file, a directory of data files, a save_to_disk folder, a hub:
  dataset, a list of them, or several in one string separated by commas."""
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  paths = [p.strip() for x in map(os.fspath, paths) for p in x.split(",") if p.strip()]
  out = []
  for p in paths:
    base = sources.split_spec(p)[0]
    if base.startswith(sources.HUB_PREFIX) or sources.is_saved_dataset(base):
      out.append(p)
    elif os.path.isdir(p):
      found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(EXTENSIONS))
      if not found:
        raise FtjaxError(f"{p}: directory holds no data files ({', '.join(EXTENSIONS)})")
      out.extend(found)
    else:
      out.append(p)
  if not out:
    raise FtjaxError("no data files given")
  return out


def read_options(data_cfg) -> dict:
  """load_examples' keyword arguments from a config's `data` block: one place that says how a
  run reads its files, for training, evaluation and the few-shot pool alike."""
  return dict(format=data_cfg.format, system_prompt=data_cfg.system_prompt or None,
              fields=formats.parse_fields(data_cfg.fields),
              skip_invalid=data_cfg.check.on_error == "skip")


def load_examples(path, *, format="auto", fields=None, system_prompt=None, skip_invalid=False):
  """Validated Examples from a file, a directory of data files, or a list of them.

  A record that does not read or validate raises FtjaxError naming it; with `skip_invalid`
  (data.check.on_error="skip", whose check has reported and counted them) it is left out, as
  training leaves it out."""
  examples, records_seen = [], 0
  for p in expand(path):
    if skip_invalid:
      records, unread = sources.read_all(p)
      records_seen += len(unread) + len(records)
      examples.extend(formats.validate_records(records, format=format, fields=fields,
                                             system_prompt=system_prompt)[0])
    else:
      examples.extend(formats.to_examples(sources.read_records(p), format, fields, system_prompt))
  if not examples and records_seen:
    raise FtjaxError(f"{path}: no examples: all {records_seen} records are invalid and were skipped "
                     "(data.check.on_error='skip'; `python -m ftjax.data check` lists them)",
                     code="empty_split")
  if not examples:
    raise FtjaxError(f"{path}: no examples (empty dataset)", code="empty_split")
  return examples


def check_length_policy(length_policy: str) -> None:
  if length_policy not in LENGTH_POLICIES:
    raise FtjaxError(f"length_policy {length_policy!r} is not one of {', '.join(LENGTH_POLICIES)}")


def keep_over_length(counts: dict, length_policy: str, message: str) -> bool:
  """data.length_policy for one example over the length limit, the same for every kind of
  data (SFT examples, preference pairs, GRPO prompts): counted in `counts` ("over_length", then
  "truncated" or "dropped"); "error" raises FtjaxError(message) with code over_length. True:
  keep it, cut by the caller (which end is its own); False: leave it out."""
  counts["over_length"] += 1
  if length_policy == "error":
    raise FtjaxError(message, code="over_length")
  if length_policy == "drop":
    counts["dropped"] += 1
    return False
  counts["truncated"] += 1
  return True


def tokenize_examples(examples, tokenizer, *, max_len, length_policy="truncate"):
  """TokenizedExamples under the length policy, and counts for the summary.

  Chat examples over max_len are truncated (first max_len tokens), dropped, or raise, per the
  policy. Text examples (pretraining data) are instead cut into windows of max_len tokens that
  overlap by one token, so every token but the very first is a target exactly once.
  """
  check_length_policy(length_policy)
  if max_len < 2:
    raise FtjaxError(f"max_len must be at least 2 tokens, got {max_len}")
  counts = dict(examples=len(examples), over_length=0, truncated=0, dropped=0, chunked=0,
                no_trained_tokens=0, no_user_turn=0)
  first_over = None
  out = []
  for ex, tex in zip(examples, cache.tokenize(examples, tokenizer)):
    n = len(tex.tokens)
    if ex.text is not None:
      if n > max_len:
        counts["chunked"] += 1
      out.extend(_windows(tex, max_len))
      continue
    if not any(m["role"] == "user" for m in ex.messages):
      counts["no_user_turn"] += 1  # allowed, but hosted APIs warn: usually a data mistake
    if n > max_len:
      first_over = first_over or f"{ex.where} ({n} tokens)"
      if not keep_over_length(counts, length_policy,
                              f"{ex.where}: example is {n} tokens, longer than max_len {max_len} "
                              "(length_policy='error'; use 'truncate' or 'drop')"):
        continue
      tex = dataclasses.replace(tex, tokens=tex.tokens[:max_len], loss_mask=tex.loss_mask[:max_len])
    if not tex.loss_mask.any():
      counts["no_trained_tokens"] += 1  # e.g. the prompt alone fills max_len; nothing to learn
      continue
    out.append(tex)
  counts["first_over_length"] = first_over
  return out, counts


def _why_none_left(counts, max_len, length_policy):
  """What emptied a split in tokenize_examples, from its counts."""
  if not counts["examples"]:
    return "no examples to tokenize"
  parts = []
  if counts["dropped"]:
    parts.append(f"{counts['dropped']} dropped as longer than max_len {max_len} "
                 f"(length_policy={length_policy!r}; 'truncate' keeps them)")
  if counts["no_trained_tokens"]:
    parts.append(f"{counts['no_trained_tokens']} with no token to train within max_len {max_len} "
                 "(the prompt fills it; raise data.seq_len)")
  return f"all {counts['examples']} examples were cut by the length policy: " + ", ".join(parts)


def _windows(tex, max_len):
  if len(tex.tokens) <= max_len:
    return [tex]
  out = []
  for start in range(0, len(tex.tokens) - 1, max_len - 1):
    mask = tex.loss_mask[start:start + max_len].copy()
    mask[0] = 0  # this token was the previous window's last target
    out.append(template.TokenizedExample(f"{tex.where}+{start}", tex.tokens[start:start + max_len],
                                         mask))
  return out


@dataclasses.dataclass
class Dataset:
  examples: list  # TokenizedExample (tokens, loss_mask, where)
  rows: dict  # packing.FIELDS -> array [n_rows, seq_len]
  summary: dict
  seq_len: int

  def batches(self, batch_size, *, seed=0, shuffle=True, repeat=True, state=None):
    """A resumable Loader over the rows (see ftjax.data.loader)."""
    return Loader(self.rows, batch_size, seed=seed, shuffle=shuffle, repeat=repeat, state=state)

  def describe(self):
    s = self.summary
    line = (f"{s['kept']} examples -> {s['rows']} rows of {s['seq_len']} "
            f"({s['fill']:.0%} filled), {s['tokens']} tokens, {s['trained_tokens']} trained")
    if s["over_length"]:
      line += (f"; {s['over_length']} over {s['max_len']} tokens ({s['truncated']} truncated, "
               f"{s['dropped']} dropped; first {s['first_over_length']})")
    if s["no_trained_tokens"]:
      line += f"; {s['no_trained_tokens']} skipped with nothing to train"
    if s["no_user_turn"]:
      line += f"; warning: {s['no_user_turn']} conversations have no user turn"
    return line


def build_dataset(path, tokenizer, *, seq_len, format="auto", pack=True, length_policy="truncate",
                  system_prompt=None, fields=None, pad_id=None):
  """Load, validate, tokenise and pack. max_len is seq_len + 1 tokens: one row's worth."""
  examples = load_examples(path, format=format, fields=fields, system_prompt=system_prompt)
  return dataset_from_examples(examples, tokenizer, seq_len=seq_len, pack=pack,
                               length_policy=length_policy, pad_id=pad_id, files=expand(path),
                               name=path)


def dataset_from_examples(examples, tokenizer, *, seq_len, pack=True, length_policy="truncate",
                          pad_id=None, files=(), name="data"):
  """Tokenise and pack already validated Examples (e.g. the ones `ftjax.data.selection` kept)."""
  tokenized, counts = tokenize_examples(examples, tokenizer, max_len=seq_len + 1,
                                        length_policy=length_policy)
  if not tokenized:
    raise FtjaxError(f"{name}: {_why_none_left(counts, seq_len + 1, length_policy)}", code="empty_split")
  if pad_id is None:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  rows = packing.pack(tokenized, seq_len, pack=pack, pad_id=pad_id)
  n_rows = rows["inputs"].shape[0]
  summary = dict(counts, kept=len(tokenized), files=list(files), max_len=seq_len + 1,
                 seq_len=seq_len, packed=pack, rows=n_rows,
                 tokens=int(sum(len(t.tokens) for t in tokenized)),
                 trained_tokens=int(rows["loss_mask"].sum()),
                 fill=float((rows["segment_ids"] > 0).sum() / max(1, n_rows * seq_len)))
  return Dataset(tokenized, rows, summary, seq_len)
