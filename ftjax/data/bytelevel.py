"""Which tokens of a byte-level BPE encoding fall in which piece, without character offsets.

template.py cuts each rendered example into pieces (context, trained content, end of turn) and
must assign every token of the whole string's encoding to a piece: a token belongs to the piece
its first character is in. Asking the Rust tokenizer for character offsets costs a third more
than encoding without them (`encode_batch_fast`). For byte-level BPE (GPT-2, SmolLM2, Llama 3,
Qwen, Mistral's tekken) offsets are not needed: every token stands for a fixed run of bytes of
the text (its vocabulary string, one character per byte), so a running sum of token byte lengths
gives where each token starts, and one `searchsorted` over all examples at once finds the cuts.

The byte lengths must add up to each text's UTF-8 length, which holds unless a normalizer or an
added token's lstrip/rstrip changed the text; an example where they don't is returned as None and
template.py assigns it by offsets instead. Identical renderings are encoded once.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import unicodedata
import weakref

import numpy as np
from ftjax.tokenizer import BYTES_TO_UNICODE

# Piece kinds as codes (template.py's "ctx" | "content" | "end" | "end1", weight folded in).
CTX, CONTENT, END, END1 = 0, 1, 2, 3
_CHUNK = 1024  # examples per encode call (their strings not encoded before)
_UNKNOWN = 1 << 30  # byte length of a token that is not plain byte-level: no sum can match
_tables = weakref.WeakKeyDictionary()  # Rust tokenizer -> (byte lengths, normalizer) or None


def byte_lengths(backend):
  """(int64 [vocab] bytes per token id, normalizer: None | "NFC", the added tokens a text may be
  cut after), or None when `backend` is not byte-level BPE (sentencepiece-style vocabularies
  spell spaces as '▁' and prepend one)."""
  try:
    return _tables[backend]
  except KeyError:
    pass
  spec = json.loads(backend.to_str())
  model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
  pre_types = {p.get("type") for p in pre.get("pretokenizers", [pre])}
  norm_type = None if norm is None else norm.get("type")
  table = None
  if model.get("type") == "BPE" and "ByteLevel" in pre_types and norm_type in (None, "NFC"):
    alphabet = set(BYTES_TO_UNICODE.values())
    lengths = np.full(backend.get_vocab_size(with_added_tokens=True), _UNKNOWN, np.int32)
    for token, i in model["vocab"].items():
      if i < len(lengths) and all(ch in alphabet for ch in token):
        lengths[i] = len(token)
    added = backend.get_added_tokens_decoder()
    for i, token in added.items():
      if i < len(lengths):
        lengths[i] = len(token.content.encode("utf-8"))
    # The tokenizer cuts its input at added tokens before anything else and encodes the parts
    # in between on their own; so a text cut right after one encodes as its two halves do,
    # unless a token eats neighbouring whitespace or a normalizer rewrites across the cut.
    plain = norm_type is None and not any(t.lstrip or t.rstrip or t.single_word for t in added.values())
    table = (lengths, norm_type, tuple(t.content for t in added.values()) if plain else ())
  _tables[backend] = table
  return table


def encode_pieces(backend, eos_id, examples_pieces):
  """[(tokens int32 [n], loss_mask int32 [n]) or None] for each example's pieces, a list of
  (text, kind, weight) whose texts join to the rendering. None: assign that one by offsets."""
  table = byte_lengths(backend)
  if table is None:
    return [None] * len(examples_pieces)
  lengths, normalizer, cut_after = table
  fulls = ["".join(text for text, _, _ in pieces) for pieces in examples_pieces]
  # A start every rendering shares (a template's default system prompt) is encoded once.
  prefix = shared_prefix(list(dict.fromkeys(fulls)), cut_after)
  head = np.array(backend.encode(prefix, add_special_tokens=False).ids if prefix else [], np.int32)
  out = []
  with concurrent.futures.ThreadPoolExecutor(1) as worker:
    # The Rust tokenizer releases the GIL: it encodes the distinct strings of chunk k+1 (on
    # every core) while this thread assigns the tokens of chunk k to pieces, so only the last
    # chunk's assignment is not hidden behind encoding.
    seen = {}  # full string -> (future of its chunk's encodings, index in it)
    chunks = []
    for lo in range(0, len(fulls), _CHUNK):
      new = [f for f in dict.fromkeys(fulls[lo:lo + _CHUNK]) if f not in seen]
      future = worker.submit(backend.encode_batch_fast, [f[len(prefix):] for f in new],
                             add_special_tokens=False)
      seen.update((f, (future, i)) for i, f in enumerate(new))
      chunks.append(range(lo, min(lo + _CHUNK, len(fulls))))
    arrays = {}  # future -> its encodings as int32 arrays
    for rows in chunks:
      ids = []
      for e in rows:
        future, i = seen[fulls[e]]
        if future not in arrays:
          arrays[future] = [np.array(enc.ids, np.int32) for enc in future.result()]
        ids.append(arrays[future][i])
      out += _assign([examples_pieces[e] for e in rows], [fulls[e] for e in rows], ids, head,
                     lengths, normalizer, eos_id)
  return out


def _assign(examples_pieces, fulls, ids, head, lengths, normalizer, eos_id):
  """encode_pieces for examples whose strings encode (after `head`) to `ids`."""
  nbytes, piece_ex, piece_at, piece_kind = [], [], [], []
  for e, (pieces, full) in enumerate(zip(examples_pieces, fulls)):
    texts = [text for text, _, _ in pieces]
    sizes = map(len, texts) if full.isascii() else (len(t.encode("utf-8")) for t in texts)
    at = list(itertools.accumulate(sizes, initial=0))
    piece_at += at[:-1]
    piece_ex += [e] * len(pieces)
    piece_kind += [_CODES[kind] if weight else CTX for _, kind, weight in pieces]
    nbytes.append(at[-1])
  counts = np.array([len(head) + len(a) for a in ids], np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)])
  if not starts[-1]:
    return [None] * len(examples_pieces)
  tokens = np.concatenate([x for a in ids for x in (head, a)])

  token_bytes = lengths[tokens]
  token_end = np.cumsum(token_bytes, dtype=np.int64)
  token_start = token_end - token_bytes
  nonempty = counts > 0
  sums = np.zeros(len(counts), np.int64)
  sums[nonempty] = np.add.reduceat(token_bytes, starts[:-1][nonempty], dtype=np.int64)
  ok = nonempty & (sums == np.asarray(nbytes))
  if normalizer == "NFC":
    ok &= np.fromiter((unicodedata.is_normalized("NFC", f) for f in fulls), bool, len(fulls))

  # Piece e.k starts at the first token of example e starting at or after its first byte.
  piece_ex, piece_kind = np.asarray(piece_ex), np.asarray(piece_kind)
  example_byte0 = np.where(nonempty, token_start[np.minimum(starts[:-1], len(tokens) - 1)], 0)
  first = np.searchsorted(token_start, example_byte0[piece_ex] + np.asarray(piece_at), "left")
  first = np.clip(first, starts[piece_ex], starts[piece_ex + 1])
  last = np.append(first[1:], 0)  # one past the piece's last token: the next piece's first
  ends_example = np.append(piece_ex[1:] != piece_ex[:-1], True)
  last[ends_example] = starts[piece_ex[ends_example] + 1]

  # An end-of-turn piece trains through its first EOS, or only its first token without one.
  stop = last.copy()
  eos_at = np.flatnonzero(tokens == eos_id) if eos_id is not None else np.zeros(0, np.int64)
  next_eos = eos_at[np.minimum(np.searchsorted(eos_at, first), len(eos_at) - 1)] if len(eos_at) else None
  one = np.minimum(first + 1, last)
  is_end = piece_kind == END
  if next_eos is not None:
    stop[is_end] = np.where(next_eos[is_end] < last[is_end], next_eos[is_end] + 1, one[is_end])
  else:
    stop[is_end] = one[is_end]
  stop[piece_kind == END1] = one[piece_kind == END1]
  trained = (piece_kind != CTX) & (stop > first)
  edges = np.zeros(len(tokens) + 1, np.int32)
  edges[first[trained]] += 1  # trained ranges are disjoint and non-empty: no index repeats
  edges[stop[trained]] -= 1
  mask = np.cumsum(edges[:-1], dtype=np.int32)
  mask[starts[:-1][nonempty]] = 0  # the first token is never a target: nothing precedes it
  return [(tokens[s:t], mask[s:t]) if good else None
          for s, t, good in zip(starts[:-1], starts[1:], ok)]


def shared_prefix(strings, cut_after):
  """The longest start of every string that ends with one of the added tokens `cut_after`, and
  where no added token starts before the cut and ends after it in any string ("" if none)."""
  if not strings or not cut_after:
    return ""
  first, last = min(strings), max(strings)  # the common prefix of all is theirs
  n = 0
  while n < min(len(first), len(last)) and first[n] == last[n]:
    n += 1
  common = first[:n]
  cut = max((common.rfind(t) + len(t) for t in cut_after if t and t in common), default=0)
  for t in cut_after:  # a longer added token across the cut would be matched whole
    for k in range(1, len(t)):
      if common[:cut].endswith(t[:k]) and any(s.startswith(t[k:], cut) for s in strings):
        return ""
  return common[:cut]


_CODES = {"ctx": CTX, "content": CONTENT, "end": END, "end1": END1}
