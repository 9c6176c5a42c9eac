"""Examples -> (tokens, loss_mask) with completion-only loss.

A chat example is rendered with the tokenizer's chat template. The trained tokens are the content
of assistant messages with weight 1 plus the end-of-turn token right after each (ChatML's
`<|im_end|>`, SmolLM2's EOS): without it the model never learns to stop. The mask is built from
token positions, never by comparing ids with pad_token_id, so EOS stays trained when pad == eos.

Where an assistant message sits in the rendering is found by rendering prefixes of the conversation:
render(messages[:i], add_generation_prompt=True) ends where message i's content starts, and
render(messages[:i+1]) ends where its turn ends. The rendering is cut at those points, the whole
string is tokenised, and each token goes to the piece its first character is in (so a BPE merge
across a cut keeps the canonical tokens). A rendering holding token ids (an appended EOS), or a
tokenizer without a Rust backend, has each piece tokenised on its own instead.

Without a chat template the fallback format is "input\\noutput<eos>" (each non-assistant message
followed by a newline, each assistant message by EOS).
"""

import bisect
import contextlib
import dataclasses
import gc

import numpy as np

from ftjax.data import bytelevel, skeleton
from ftjax.errors import FtjaxError


# data.chat_template="chatml": the ChatML layout (SmolLM2's and Qwen's, without a default system
# prompt), for a tokenizer that ships no template.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATE_OPTIONS = ("data.chat_template='auto' (the tokenizer's own), 'chatml', 'plain' (no "
                    "template: 'input\\noutput<eos>'), or a path to a .jinja file")


def choose_chat_template(tok, option):
  """Applies data.chat_template to `tok` in place: "auto" keeps the tokenizer's own."""
  if option in ("", "auto"):
    return tok
  if option == "plain":
    tok.chat_template, tok.plain_format = None, True
  elif option == "chatml":
    tok.chat_template = CHATML
  elif option.endswith(".jinja"):
    try:
      with open(option, encoding="utf-8") as f:
        tok.chat_template = f.read()
    except OSError as e:
      raise FtjaxError(f"{option}: cannot read the chat template ({e.strerror})") from None
  else:
    raise FtjaxError(f"config: data.chat_template={option!r}; expected {TEMPLATE_OPTIONS}")
  return tok


def require_chat_template(tok, examples, source):
  """Conversations need a template: a tokenizer without one is an error unless the plain format
  was chosen (data.chat_template='plain'), never a silent fallback."""
  if (not getattr(tok, "chat_template", None) and not getattr(tok, "plain_format", False)
      and any(ex.text is None for ex in examples)):
    first = next(ex.where for ex in examples if ex.text is None)
    raise FtjaxError(f"{first}: {source} holds conversations but the tokenizer has no chat "
                     f"template; choose one with {TEMPLATE_OPTIONS}")


@dataclasses.dataclass
class TokenizedExample:
  where: str
  tokens: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # int32 [n]; 1 where token k is a trained target (predicted from k-1)


# Piece kinds: "ctx" never trained; "content" trained when weight 1; "end" (the text after an
# assistant content up to the end of its turn) trains its tokens through the first EOS, or only its
# first token when it holds no EOS; "end1" trains only the first token.


def tokenize_example(example, tok):
  return tokenize_many([example], tok)[0]


def tokenize_many(examples, tok):
  """TokenizedExamples of many examples, in one batch call of the Rust tokenizer (which runs on
  all cores) instead of one call per piece.

  Conversations are cut into pieces: rendered once per conversation shape when the template
  pastes contents opaquely (ftjax/data/skeleton.py), else by the renders described above. A
  rendering that is all text is encoded whole and each token goes to the piece its first
  character is in: when encoding piece by piece gives the same tokens that is the same
  assignment, and when a BPE merge crosses a cut it is the fallback anyway. Byte-level BPE finds
  the cuts from token byte lengths (ftjax/data/bytelevel.py), other tokenizers from offsets."""
  with _gc_paused():
    return _tokenize_many(examples, tok)


@contextlib.contextmanager
def _gc_paused():
  """Tokenising allocates a few container objects per example and frees none; the cyclic
  collector would meanwhile rescan every live object of the caller (records, examples) over
  and over, ~7% of the batched path on 10k examples. Any cycles made meanwhile (Jinja's, on the
  per-example path) are collected once it runs again."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


def _tokenize_many(examples, tok):
  backend = _rust_backend(tok)
  encode = _batch_encoder(tok)
  out = [None] * len(examples)
  text_at = [i for i, ex in enumerate(examples) if ex.text is not None]
  for i, ids in zip(text_at, encode([examples[i].text for i in text_at], True)):
    out[i] = _text_example(examples[i], ids, tok)

  chat_at = [i for i, ex in enumerate(examples) if ex.text is None]
  pieces = dict(zip(chat_at, _chat_pieces([examples[i] for i in chat_at], tok)))
  whole = [i for i in chat_at
           if backend is not None and all(isinstance(p, str) for p, _, _ in pieces[i])]
  if whole:
    for i, arrays in zip(whole, bytelevel.encode_pieces(backend, tok.eos_token_id,
                                                        [pieces[i] for i in whole])):
      if arrays is not None:
        out[i] = TokenizedExample(examples[i].where, *arrays)
  by_offsets = [i for i in whole if out[i] is None]
  whole_set = set(whole)
  by_pieces = [i for i in chat_at if out[i] is None and i not in whole_set]
  encodings = backend.encode_batch(["".join(p for p, _, _ in pieces[i]) for i in by_offsets],
                                   add_special_tokens=False) if by_offsets else []
  for i, enc in zip(by_offsets, encodings):
    out[i] = _finish(examples[i], *_assign_encoding(pieces[i], enc, tok))
  strings = iter(encode([p for i in by_pieces for p, _, _ in pieces[i] if isinstance(p, str)], False))
  for i in by_pieces:
    ids = [p if isinstance(p, list) else next(strings) for p, _, _ in pieces[i]]
    out[i] = _finish(examples[i], *_join_pieces(pieces[i], ids, tok))
  return out


def _chat_pieces(examples, tok):
  if not getattr(tok, "chat_template", None):
    return [_plain_pieces(ex, tok) for ex in examples]
  skeletons = skeleton.Skeletons(tok, _template_pieces, _render)
  return [_with_context(ex, lambda ex=ex: skeletons.pieces(ex) or _template_pieces(ex, tok))
          for ex in examples]


def _with_context(example, fn):
  """fn(), an FtjaxError from it (the chat template refusing this conversation, running too
  long) naming the example's file and line."""
  try:
    return fn()
  except FtjaxError as e:
    if str(e).startswith(example.where):
      raise
    raise FtjaxError(f"{example.where}: {e}", code=e.code) from None


def _finish(example, tokens, mask):
  if not tokens:
    raise FtjaxError(f"{example.where}: the example renders to no tokens")
  mask[0] = 0  # the first token is never a target: nothing precedes it
  return TokenizedExample(example.where, np.asarray(tokens, np.int32), np.asarray(mask, np.int32))


def _batch_encoder(tok):
  """strings, add_special_tokens -> [ids]: the Rust tokenizer's batch API when `tok` holds one
  (ftjax.tokenizer.Tokenizer does), else `tok.encode` one at a time (any duck-typed tokenizer)."""
  backend = _rust_backend(tok)
  if backend is not None:
    def encode(strings, add_special_tokens, _backend=backend):
      return [e.ids for e in _backend.encode_batch_fast(strings, add_special_tokens=add_special_tokens)]
    return encode
  return lambda strings, add_special_tokens: [list(tok.encode(s, add_special_tokens=add_special_tokens))
                                              for s in strings]


def _rust_backend(tok):
  try:
    import tokenizers
  except ImportError:
    return None
  for value in vars(tok).values():
    if isinstance(value, tokenizers.Tokenizer):
      return value
  return None


def _text_example(example, ids, tok):
  ids = list(ids)
  if tok.eos_token_id is not None:
    ids.append(tok.eos_token_id)  # documents end in EOS so packed neighbours are separated
  mask = np.ones(len(ids), np.int32)
  mask[0] = 0
  return TokenizedExample(example.where, np.asarray(ids, np.int32), mask)


def _plain_pieces(example, tok):
  pieces = []
  for m in example.messages:
    if m["role"] == "assistant":
      pieces.append((m["content"], "content", m["weight"]))
      pieces.append(([tok.eos_token_id], "end1", m["weight"]))
    else:
      pieces.append((m["content"] + "\n", "ctx", 0))
  return _with_bos(pieces, tok)


def _with_bos(pieces, tok):
  # Plain text has no template to carry BOS; add it exactly when the tokenizer's own encode would.
  bos = tok.bos_token_id
  if bos is not None:
    with_special = tok.encode("a", add_special_tokens=True)
    if with_special and with_special[0] == bos and tok.encode("a", add_special_tokens=False)[:1] != [bos]:
      pieces.insert(0, ([bos], "ctx", 0))
  return pieces


def _render(tok, messages, add_generation_prompt):
  msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
  return tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)


def _template_pieces(example, tok):
  messages = example.messages
  full = _render(tok, messages, False)
  cuts = []  # (start, end, kind, weight), ascending, non-overlapping
  cursor = 0
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    # An assistant-first conversation has no prefix to render (templates may reject an empty one).
    prompt = _render(tok, messages[:i], True) if i else None
    through = full if i == len(messages) - 1 else _render(tok, messages[:i + 1], False)
    if (prompt is not None and len(prompt) >= cursor and full.startswith(prompt) and full.startswith(through)
        and len(through) >= len(prompt)):
      start, turn_end, end_kind = len(prompt), len(through), "end"
    else:
      # Template is not prefix-stable (e.g. it injects a default system prompt only when
      # messages[0] is not one): locate the content by search instead.
      start, turn_end, end_kind = cursor, None, "end1"
    content_start = content_end = -1
    for cand in (m["content"], m["content"].strip()):
      k = full.find(cand, start, turn_end if turn_end is not None else len(full))
      if k >= 0:
        content_start, content_end = k, k + len(cand)
        break
    if content_start < 0:
      if turn_end is None:
        raise FtjaxError(f"{example.where}: the chat template does not reproduce the content of "
                         f"messages[{i}]; cannot tell which tokens to train")
      content_start, content_end = start, turn_end  # content rewritten: train the whole turn
    if turn_end is None:
      turn_end = _next_assistant_start(full, messages, i, content_end)
    cuts.append((content_start, content_end, "content", m["weight"]))
    cuts.append((content_end, turn_end, end_kind, m["weight"]))
    cursor = turn_end
  pieces = []
  pos = 0
  for s, e, kind, w in cuts:
    if s > pos:
      pieces.append((full[pos:s], "ctx", 0))
    pieces.append((full[s:e], kind, w))
    pos = e
  if pos < len(full):
    pieces.append((full[pos:], "ctx", 0))
  if cuts and cuts[-1][0] == cuts[-1][1] and tok.eos_token_id is not None:
    # The template emits nothing after the last assistant message: append EOS so stopping is learned.
    pieces.append(([tok.eos_token_id], "end1", cuts[-1][3]))
  return pieces


def _next_assistant_start(full, messages, i, after):
  for m in messages[i + 1:]:
    if m["role"] == "assistant":
      k = full.find(m["content"], after)
      if k >= 0:
        return k
  return len(full)


def _end_count(ids, kind, eos):
  if not ids:
    return 0
  if kind == "end" and eos in ids:
    return ids.index(eos) + 1
  return 1


def _piece_mask(ids, kind, weight, eos):
  if kind == "ctx" or not weight:
    return [0] * len(ids)
  if kind == "content":
    return [1] * len(ids)
  n = _end_count(ids, kind, eos)
  return [1] * n + [0] * (len(ids) - n)


def _join_pieces(pieces, encoded, tok):
  """(tokens, mask) from each piece's own ids: the path for renderings that hold token ids (an
  appended EOS, the plain format's BOS) or tokenizers without a Rust backend. The piecewise
  tokens decode to the same text, and the prompt part matches how a prompt is tokenised at
  inference (encoded on its own)."""
  eos = tok.eos_token_id
  tokens = [t for ids in encoded for t in ids]
  mask = [b for ids, (_, kind, w) in zip(encoded, pieces) for b in _piece_mask(ids, kind, w, eos)]
  return tokens, mask


def _assign_encoding(pieces, enc, tok):
  """`_assign_by_offsets` of a whole-string encoding, looking up only the tokens at the cuts
  (`char_to_token`) instead of walking every token's offsets."""
  ids, bounds, pos = enc.ids, [0], 0
  total = sum(len(p) for p, _, _ in pieces)
  for text, _, _ in pieces[:-1]:
    pos += len(text)
    t = enc.char_to_token(pos) if pos < total else len(ids)
    if t is None:  # a character no token covers: take the general path
      return _assign_by_offsets(pieces, ids, enc.offsets, tok)
    if t < len(ids) and enc.token_to_chars(t)[0] < pos:
      t += 1  # the token starts in the previous piece: it belongs there
    bounds.append(max(t, bounds[-1]))
  bounds.append(len(ids))
  groups = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
  mask = [b for g, (_, kind, w) in zip(groups, pieces)
          for b in _piece_mask(g, kind, w, tok.eos_token_id)]
  return list(ids), mask


def _assign_by_offsets(pieces, ids, offsets, tok):
  starts = []
  pos = 0
  for text, _, _ in pieces:
    starts.append(pos)
    pos += len(text)
  groups = [[] for _ in pieces]
  for t, (s, _) in zip(ids, offsets):
    groups[max(0, bisect.bisect_right(starts, s) - 1)].append(t)
  mask = [b for g, (_, kind, w) in zip(groups, pieces)
          for b in _piece_mask(g, kind, w, tok.eos_token_id)]
  return [t for g in groups for t in g], mask
