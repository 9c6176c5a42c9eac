"""Tokenizers from a HF folder, a SentencePiece `.model` or a GGUF file, plus chat templates.

Everything becomes one `tokenizers.Tokenizer` (the Rust library), built the way transformers 5.x
builds it from the same files, so token ids match `transformers.AutoTokenizer` exactly; the test
suite checks that. transformers itself is never imported here: it is a test-only dependency.

    tok = load_tokenizer("model.gguf")          # or a folder, or a SentencePiece .model
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                     add_special_tokens=False)
"""

import json
import os
import re

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from ftjax import template_sandbox
from ftjax.errors import FtjaxError
from ftjax.template_sandbox import BoundedSandbox

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")

# GGUF token_type values (llama.cpp's llama_token_type).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# SentencePiece piece types (sentencepiece_model.proto).
_SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED = 2, 3, 4


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the special tokens and chat template that travel with it.

  `add_bos_token`/`add_eos_token` given as bools rebuild the post-processor the way transformers
  does; left as None, the backend's own post-processor (from `tokenizer.json`) decides.
  """

  def __init__(self, backend, *, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
               chat_template=None, add_bos_token=None, add_eos_token=None, extra_special_tokens=()):
    self.backend = backend
    self.chat_template = chat_template
    self._specials = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token,
                      "pad_token": pad_token}
    # transformers adds any named or extra special token the vocabulary does not already hold as
    # an added token, so that it is matched whole in text; without this ids diverge on such text.
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = []
    for token in [*self._specials.values(), *extra_special_tokens]:
      if token is not None and token not in present:
        missing.append(AddedToken(token, special=True, normalized=False))
        present.add(token)
    if missing:
      backend.add_special_tokens(missing)
    if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
      self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
    self._explicit_flags = add_bos_token is not None or add_eos_token is not None
    # Read the flags back from what the post-processor actually does, whichever built it.
    added = backend.post_process(backend.encode("", add_special_tokens=False), add_special_tokens=True).ids
    self.add_bos_token = bool(added) and added[0] == self.bos_token_id and self.bos_token_id is not None
    self.add_eos_token = bool(added) and added[-1] == self.eos_token_id and self.eos_token_id is not None

  def _set_post_processor(self, add_bos, add_eos):
    # Same template as transformers' `TokenizersBackend.update_post_processor`.
    bos, eos = self._specials["bos_token"], self._specials["eos_token"]
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, self.backend.token_to_id(bos))] if add_bos else []) + (
      [(eos, self.backend.token_to_id(eos))] if add_eos else [])
    self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

  # -- constructors ------------------------------------------------------------------------------

  @classmethod
  def from_dir(cls, model_dir):
    """A HF tokenizer folder: `tokenizer.json` (or a SentencePiece `tokenizer.model`) and configs."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
      raise FtjaxError(f"{model_dir}: tokenizer folder does not exist")
    config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    specials = {name: _token_content(config.get(name)) for name in _NAMED_SPECIALS}
    for name, value in _read_json(os.path.join(model_dir, "special_tokens_map.json")).items():
      if name in specials and specials[name] is None:
        specials[name] = _token_content(value)
    extra = [_token_content(t) for t in
             config.get("extra_special_tokens") or config.get("additional_special_tokens") or []]
    template_file = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(template_file):  # transformers 5 saves it here, and it wins over the config
      with open(template_file, encoding="utf-8") as f:
        chat_template = f.read()
    else:
      chat_template = config.get("chat_template")

    json_file = os.path.join(model_dir, "tokenizer.json")
    spm_file = os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(json_file):
      try:
        backend = tokenizers.Tokenizer.from_file(json_file)
      except Exception as e:
        raise FtjaxError(f"{json_file}: not a valid tokenizers file ({e})") from None
      # With a tokenizer.json, transformers drops add_bos_token/add_eos_token from the config:
      # the file's post-processor is what adds special tokens.
      return cls(backend, chat_template=chat_template, extra_special_tokens=extra, **specials)
    if os.path.isfile(spm_file):
      return cls.from_sentencepiece(
        spm_file, chat_template=chat_template, add_bos_token=config.get("add_bos_token"),
        add_eos_token=config.get("add_eos_token"), extra_special_tokens=extra,
        **{k: v for k, v in specials.items() if v is not None})
    raise FtjaxError(f"{model_dir}: no tokenizer.json or tokenizer.model in this folder")

  @classmethod
  def from_sentencepiece(cls, model_file, *, chat_template=None, add_bos_token=None,
                         add_eos_token=None, extra_special_tokens=(), **special_tokens):
    """A SentencePiece `.model`, converted like transformers' `SpmConverter` (legacy mode).

    The normalizer spec is honoured (NFKC charsmap, extra-whitespace removal, dummy prefix), so
    ids equal `SentencePieceProcessor.encode` and `AutoTokenizer` on a folder holding this file.
    """
    model_file = os.fspath(model_file)
    proto = _read_spm_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    if trainer.model_type == 1:  # UNIGRAM
      model = Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                      byte_fallback=trainer.byte_fallback)
      user_defined = [p.piece for p in pieces if p.type == _SPM_USER_DEFINED]
    elif trainer.model_type == 2:  # BPE
      vocab = {p.piece: i for i, p in enumerate(pieces)}
      user_defined = [p.piece for i, p in enumerate(pieces) if p.type == _SPM_USER_DEFINED and vocab[p.piece] == i]
      # Only normal pieces are merged; a merge's rank is its result's score, ties by id.
      normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == 1 and vocab[p.piece] == i}
      ranked = []
      for token, (score, index) in normal.items():
        for cut in range(1, len(token)):
          left, right = token[:cut], token[cut:]
          if left in normal and right in normal:
            ranked.append((-score, index, left, right))
      merges = [(left, right) for _, _, left, right in sorted(ranked)]
      model = BPE(vocab=vocab, merges=merges, unk_token=trainer.unk_piece, fuse_unk=True,
                  byte_fallback=trainer.byte_fallback, dropout=None, ignore_merges=bool(user_defined))
    else:
      raise FtjaxError(f"{model_file}: SentencePiece model type {trainer.model_type} is not supported "
                       "(only unigram and BPE)")
    backend = tokenizers.Tokenizer(model)

    seq = []
    if norm.precompiled_charsmap:
      seq.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
      # SentencePiece only squeezes spaces; newlines and tabs stay as they are.
      seq += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
      seq.append(normalizers.Replace(" ", "\u2581"))
    if norm.add_dummy_prefix:
      # Metaspace skips its prefix when the text already starts with "▁"; SentencePiece does not.
      seq.append(normalizers.Replace(Regex("\\A\u2581"), "\u2581\u2581"))
    backend.normalizer = normalizers.Sequence(seq)
    pre = []
    if norm.add_dummy_prefix:
      pre.append(pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False))
    if user_defined:  # SentencePiece emits these whole and never merges across them
      pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
      pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
      backend.pre_tokenizer = pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("\u2581", " ")]
    if trainer.byte_fallback:
      dec.append(decoders.ByteFallback())
    if norm.add_dummy_prefix:
      dec += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif trainer.byte_fallback:
      dec.append(decoders.Fuse())
    backend.decoder = decoders.Sequence(dec)

    # Control pieces are special tokens, matched on the raw text (so each chunk between them gets
    # its own dummy prefix); user-defined pieces are left to the pre-tokenizer split above.
    control = [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type == _SPM_CONTROL]
    if control:
      backend.add_special_tokens(control)
    defaults = {"bos_token": (trainer.bos_id, trainer.bos_piece or "<s>"),
                "eos_token": (trainer.eos_id, trainer.eos_piece or "</s>"),
                "unk_token": (trainer.unk_id, trainer.unk_piece or "<unk>")}
    for name, (piece_id, piece) in defaults.items():
      if piece_id >= 0:
        special_tokens.setdefault(name, piece)
    return cls(backend, chat_template=chat_template, add_bos_token=add_bos_token,
               add_eos_token=add_eos_token, extra_special_tokens=extra_special_tokens, **special_tokens)

  @classmethod
  def from_gguf_fields(cls, fields):
    """GGUF tokenizer metadata (key -> plain Python value), built like transformers' GGUF loader."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise FtjaxError("GGUF metadata has no tokenizer.ggml.tokens: the file carries no tokenizer")
    token_types = fields.get("tokenizer.ggml.token_type") or ()
    architecture = fields.get("general.architecture")
    if kind == "gpt2":
      backend = _gguf_byte_level(fields)
      add_bos = fields.get("tokenizer.ggml.add_bos_token")
    elif kind == "llama" and architecture not in _GGUF_SPM_SPECIAL_ARCHS:
      backend = _gguf_sentencepiece(fields)
      # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
      add_bos = fields.get("tokenizer.ggml.add_bos_token", True)
    else:
      what = f"{kind!r}" + (f" for architecture {architecture!r}" if kind == "llama" else "")
      raise FtjaxError(f"GGUF tokenizer.ggml.model {what} is not supported (supported: 'gpt2', 'llama')")

    spelled = set(BYTES_TO_UNICODE.values()) if kind == "gpt2" else None
    # A control token outside the byte alphabet in a byte-level vocab is a llama.cpp mislabel;
    # transformers skips it, and so must we to keep the same ids.
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types)
               if k == _GGUF_CONTROL and (spelled is None or set(t) <= spelled)]
    if control:
      backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types)
            if k == _GGUF_USER_DEFINED and t in vocab]
    if user:
      backend.add_tokens(user)

    def token(key):
      index = fields.get(f"tokenizer.ggml.{key}")
      if index is None:
        return None
      if not 0 <= index < len(tokens):
        raise FtjaxError(f"GGUF tokenizer.ggml.{key} = {index} is outside the vocabulary of {len(tokens)} tokens")
      return tokens[index]

    return cls(backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
               unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
               chat_template=fields.get("tokenizer.chat_template"), add_bos_token=add_bos,
               add_eos_token=fields.get("tokenizer.ggml.add_eos_token"))

  # -- use ---------------------------------------------------------------------------------------

  def encode(self, text, add_special_tokens=True):
    """Token ids of `text`; BOS/EOS only when the tokenizer is configured to add them."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens=True):
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token):
    return self.backend.token_to_id(token)

  def _id(self, name):
    token = self._specials[name]
    return None if token is None else self.backend.token_to_id(token)

  @property
  def bos_token(self):
    return self._specials["bos_token"]

  @property
  def eos_token(self):
    return self._specials["eos_token"]

  @property
  def pad_token(self):
    return self._specials["pad_token"] or self._specials["eos_token"]

  @property
  def bos_token_id(self):
    return self._id("bos_token")

  @property
  def eos_token_id(self):
    return self._id("eos_token")

  @property
  def pad_token_id(self):
    """The pad id; batches of a tokenizer without one are padded with EOS (masked out anyway)."""
    pad = self._id("pad_token")
    return self.eos_token_id if pad is None else pad

  @property
  def vocab_size(self):
    """Every id the tokenizer can produce, added tokens included (transformers' `len(tok)`)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def apply_chat_template(self, messages, add_generation_prompt=False, tools=None, **kwargs):
    """Render `messages` to text exactly as transformers' `apply_chat_template(tokenize=False)`.

    Encode the result with `add_special_tokens=False`: the template writes its own BOS if any.
    """
    template = self.chat_template
    if isinstance(template, dict):
      template = template.get("tool_use") if tools and "tool_use" in template else template.get("default")
    if not template:
      raise FtjaxError("this tokenizer has no chat template: use a model that ships one, "
                       "or format prompts as plain text")
    if not messages:
      raise FtjaxError("cannot apply the chat template to an empty conversation")
    # transformers drops keys whose value is None: templates test for a key being defined.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {name: value for name, value in self._specials.items() if value is not None}
    variables.update(kwargs)
    # bounded time and output; errors as one FtjaxError line
    return template_sandbox.render(_compile_template(template), messages=messages, tools=tools,
                                   documents=None, add_generation_prompt=add_generation_prompt,
                                   **variables)

  def save(self, out_dir):
    """Write `tokenizer.json` + `tokenizer_config.json`, loadable by `AutoTokenizer.from_pretrained`."""
    os.makedirs(out_dir, exist_ok=True)
    self.backend.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    config.update({name: value for name, value in self._specials.items() if value is not None})
    # Informational only: transformers ignores these next to a tokenizer.json, whose
    # post-processor already adds exactly what they say.
    config["add_bos_token"] = self.add_bos_token
    config["add_eos_token"] = self.add_eos_token
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)


def load_tokenizer(path):
  """A tokenizer folder, a SentencePiece `.model` file or a `.gguf` file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FtjaxError(f"{path}: no such tokenizer file or folder")
  if os.path.isdir(path):
    return Tokenizer.from_dir(path)
  if path.endswith(".gguf"):
    return Tokenizer.from_gguf_fields(read_gguf_metadata(path))
  if path.endswith(".model"):
    return Tokenizer.from_sentencepiece(path)
  if os.path.basename(path) == "tokenizer.json":
    return Tokenizer.from_dir(os.path.dirname(path) or ".")
  raise FtjaxError(f"{path}: expected a tokenizer folder, a SentencePiece .model or a .gguf file")


def read_gguf_metadata(path_or_reader):
  """Every GGUF metadata field as a plain Python value: str, int, float, bool or a list of them."""
  import gguf
  import numpy as np

  if isinstance(path_or_reader, gguf.GGUFReader):
    reader = path_or_reader
  else:
    path = os.fspath(path_or_reader)
    if not os.path.isfile(path):
      raise FtjaxError(f"{path}: GGUF file does not exist")
    try:
      reader = gguf.GGUFReader(path, "r")
    except Exception as e:
      raise FtjaxError(f"{path}: not a readable GGUF file ({e})") from None
  string, array, boolean = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL
  out = {}
  for name, field in reader.fields.items():
    kind = field.types[0] if field.types else None
    if kind == array:
      item = field.types[-1] if len(field.types) > 1 else None
      if item == string:
        out[name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
      elif not field.data:
        out[name] = []
      elif item == array:
        continue  # nested arrays: no key llama.cpp writes for tokenizers or models uses them
      else:
        values = np.concatenate([field.parts[i] for i in field.data]).tolist()
        out[name] = [bool(v) for v in values] if item == boolean else values
    elif kind == string:
      out[name] = bytes(field.parts[field.data[0]]).decode("utf-8")
    elif kind is not None:
      value = field.parts[field.data[0]][0].item()
      out[name] = bool(value) if kind == boolean else value
  return out


# -- GGUF builders (mirroring transformers/integrations/gguf/gguf_tokenizer_mapping.py) -----------

# SentencePiece vocabularies these architectures need extra fixes for, which we do not replicate.
_GGUF_SPM_SPECIAL_ARCHS = ("gemma", "gemma2", "gemma3", "gemma4", "phi3")


def _bytes_to_unicode():
  """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


BYTES_TO_UNICODE = _bytes_to_unicode()

_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> the split regex its merges were learned with. Others (e.g. SmolLM2's
# "smollm") keep GPT-2's built-in ByteLevel regex, as transformers does.
_GGUF_PRE_SPLITS = {
  **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                   "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
  "tekken": _TEKKEN_SPLIT,
  **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
  "qwen35": _QWEN35_SPLIT,
  **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def _gguf_merges(fields, vocab):
  """The file's merges, or ones derived from the vocabulary ranked by score (transformers' rule)."""
  merges = fields.get("tokenizer.ggml.merges")
  if merges is not None:
    return [tuple(m.split(" ")) for m in merges]
  scores = fields.get("tokenizer.ggml.scores")
  tokens = fields["tokenizer.ggml.tokens"]
  if scores is None:
    raise FtjaxError("GGUF metadata has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
  ranked = []
  for token, score in dict(zip(tokens, scores)).items():
    local = [(token[:i], token[i:], score) for i in range(1, len(token))
             if token[:i] in vocab and token[i:] in vocab]
    ranked.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
  ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(left, right) for left, right, _ in ranked]


def _gguf_byte_level(fields):
  alphabet = set(BYTES_TO_UNICODE.values())
  vocab = {}
  for index, token in enumerate(fields["tokenizer.ggml.tokens"]):
    if not set(token) <= alphabet:  # a token stored as raw text: respell it in the byte alphabet
      token = "".join(BYTES_TO_UNICODE[b] for b in token.encode("utf-8"))
    vocab[token] = index
  backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=_gguf_merges(fields, vocab), dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
  split = _GGUF_PRE_SPLITS.get(fields.get("tokenizer.ggml.pre"))
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  return backend


def _gguf_sentencepiece(fields):
  # transformers hands these to LlamaTokenizer: byte-fallback BPE, no normalizer, and a Metaspace
  # that prefixes "▁" to the first chunk only (its non-legacy default).
  vocab = {token: index for index, token in enumerate(fields["tokenizer.ggml.tokens"])}
  backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=_gguf_merges(fields, vocab), fuse_unk=True,
                                     byte_fallback=True, dropout=None))
  backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
  backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(content=" ", left=1)])
  return backend


# -- helpers ---------------------------------------------------------------------------------------


def _read_json(path):
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise FtjaxError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise FtjaxError(f"{path}: expected a JSON object")
  return data


def _token_content(value):
  """A special token as configs spell it: a string, or an AddedToken dict with "content"."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_spm_proto(model_file):
  if not os.path.isfile(model_file):
    raise FtjaxError(f"{model_file}: SentencePiece model file does not exist")
  try:
    from sentencepiece import sentencepiece_model_pb2
  except ImportError as e:
    raise FtjaxError(f"{model_file}: reading a SentencePiece model needs the sentencepiece and protobuf "
                     f"packages ({e})") from None
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    with open(model_file, "rb") as f:
      proto.ParseFromString(f.read())
  except Exception as e:
    raise FtjaxError(f"{model_file}: not a SentencePiece model ({e})") from None
  if not proto.pieces:
    raise FtjaxError(f"{model_file}: SentencePiece model has no pieces")
  return proto


_TEMPLATES = {}


def _compile_template(source):
  """The template compiled in transformers' sandbox: same globals, filters and whitespace rules."""
  if source in _TEMPLATES:
    return _TEMPLATES[source]
  import datetime

  import jinja2
  import jinja2.ext

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the rendered prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; rendering ignores it."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                       extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  try:
    compiled = env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise FtjaxError(f"chat template does not parse: {e} (line {e.lineno})") from None
  _TEMPLATES[source] = compiled
  return compiled
