"""Tokenised examples cached on disk, so a rerun (or the data check, then training) does not
tokenise the same data again.

The key is a SHA-256 of everything that decides the tokens and masks: each example's content
after reading, format detection, `data.fields` renaming and the system prompt (its messages and
weights, or its text; not its file name or line, so a moved file still hits); the tokenizer
(its whole `tokenizer.json` serialisation: vocabulary, merges, normalizer, added tokens,
post-processor), its chat template and special tokens; and `VERSION`, bumped whenever
ftjax/data/template.py changes what it produces. `data.seq_len` and the length policy are not in
it on purpose: they act after this stage (truncation, packing), so changing them reuses the
cache, correctly.

Files: `<FTJAX_TOKEN_CACHE, else FTJAX_CACHE or ~/.cache/ftjax, + /tokens>/<key>.npz`, written
under a temporary name and renamed, so a crash never leaves half a file. FTJAX_TOKEN_CACHE=off
turns the cache off. A tokenizer that is not backed by the `tokenizers` library is not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref

import numpy as np

from ftjax.data import template
from ftjax.models.resolve import cache_dir as ftjax_cache

log = logging.getLogger("ftjax.data.cache")

VERSION = 1
_fingerprints = weakref.WeakKeyDictionary()  # tokenizer -> its hash (serialising costs ~10 ms)
_last = {}  # key -> tokens of the last lookup: the check and training share one process


def cache_dir() -> str | None:
  value = os.environ.get("FTJAX_TOKEN_CACHE")
  if value == "off":
    return None
  if value:
    return value
  return os.path.join(ftjax_cache(), "tokens")


def tokenizer_fingerprint(tok) -> str | None:
  backend = template._rust_backend(tok)
  if backend is None:
    return None
  try:
    return _fingerprints[tok]
  except (KeyError, TypeError):
    pass
  h = hashlib.sha256(backend.to_str().encode())
  extra = {"chat_template": getattr(tok, "chat_template", None),
           "ids": [getattr(tok, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")]}
  h.update(json.dumps(extra, sort_keys=True, default=str).encode())
  digest = h.hexdigest()
  try:
    _fingerprints[tok] = digest
  except TypeError:  # not weak-referenceable: recompute next time
    pass
  return digest


def key(examples, tok) -> str | None:
  fingerprint = tokenizer_fingerprint(tok)
  if fingerprint is None:
    return None
  h = hashlib.sha256(f"ftjax-tokens-v{VERSION}\0{fingerprint}\0".encode())
  for ex in examples:
    h.update(json.dumps([ex.messages, ex.text], sort_keys=True).encode())
    h.update(b"\0")
  return h.hexdigest()


def tokenize(examples, tok):
  """template.tokenize_many(examples, tok), read from the cache when it holds them."""
  folder = cache_dir()
  k = key(examples, tok) if folder and examples else None
  if k is None:
    return template.tokenize_many(examples, tok)
  if k in _last:
    return _with_where(_last[k], examples)
  path = os.path.join(folder, f"{k}.npz")
  cached = _read(path, len(examples)) if os.path.isfile(path) else None
  if cached is not None:
    log.info("read %d tokenised examples from the cache %s", len(examples), path)
    return _remember(k, cached, examples)
  out = template.tokenize_many(examples, tok)
  _write(path, out)
  return _remember(k, [(t.tokens, t.loss_mask) for t in out], examples)


def _read(path, count):
  """The cached (tokens, mask) pairs, or None for a damaged entry, which is deleted (with a
  warning naming it) so that this run rewrites it: a bad file must not fail every later run."""
  try:
    with np.load(path) as f:
      tokens, mask, ends = f["tokens"], f["loss_mask"], f["ends"]
    if len(ends) != count or len(tokens) != len(mask) or (len(ends) and ends[-1] != len(tokens)):
      raise ValueError(f"holds {len(ends)} examples and {len(tokens)} tokens, expected {count} "
                       "examples")
    return _split(tokens, mask, ends)
  # BadZipFile: a truncated or overwritten .npz (np.load opens it as a zip); EOFError, zlib
  # errors and the like from a damaged member: every one means "not a usable entry".
  except Exception as e:  # noqa: BLE001
    log.warning("discarding the damaged token cache entry %s (%s: %s); tokenising again",
                path, type(e).__name__, e)
    _remove(path)
    return None


def _remove(path):
  try:
    os.remove(path)
  except OSError:
    pass  # unwritable folder: the entry is rebuilt in memory and the write below warns


def _split(tokens, mask, ends):
  starts = np.concatenate([[0], ends[:-1]])
  return [(tokens[s:e], mask[s:e]) for s, e in zip(starts, ends)]


def _remember(k, arrays, examples):
  _last.clear()
  _last[k] = arrays
  return _with_where(arrays, examples)


def _with_where(arrays, examples):
  return [template.TokenizedExample(ex.where, t.copy(), m.copy()) for ex, (t, m) in zip(examples, arrays)]


def _write(path, out):
  """Stores the entry; a failed write (full disk, read-only cache folder) only costs the next
  run a tokenisation: a warning, never the run, and no temporary file left behind."""
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(tmp, tokens=np.concatenate([t.tokens for t in out]).astype(np.int32),
             loss_mask=np.concatenate([t.loss_mask for t in out]).astype(np.int32),
             ends=np.cumsum([len(t.tokens) for t in out]).astype(np.int64))
    os.replace(tmp, path)
  except OSError as e:
    log.warning("could not write the token cache %s (%s); continuing without it (set "
                "FTJAX_TOKEN_CACHE to a writable folder, or to off)", path, e)
    _remove(tmp)
