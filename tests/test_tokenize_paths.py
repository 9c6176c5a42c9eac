"""The fast tokenising paths give exactly what the per-example path gives.

`template.tokenize_many` renders each conversation shape once and pastes contents in
(ftjax/data/skeleton.py) and finds the pieces of byte-level BPE encodings from token byte lengths
(ftjax/data/bytelevel.py). The reference is the per-example path: two Jinja renders per example
(`template._template_pieces`), the whole string encoded with character offsets, each token
assigned to the piece its first character is in. Tokens and loss masks must be identical, for
templates that paste contents as they are, trim them, look inside them, or escape them, and for
tokenizers the byte-length shortcut does not apply to.
"""

import re

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

from ftjax.data import bytelevel, skeleton, template
from ftjax.data.formats import Example
from ftjax.tokenizer import Tokenizer
from tiny import CHATML

SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TRIM = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n\n' + "
        "message['content'] | trim + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}")
THINK = ("{% for message in messages %}{% set content = message['content'] %}"
         "{% if message['role'] == 'assistant' and '</think>' in content %}"
         "{% set content = content.split('</think>')[-1] %}{% endif %}"
         "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOJSON = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] | tojson + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
IF_EMPTY = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
            "{% if message['content'] %}{{ message['content'] }}{% else %}(nothing){% endif %}"
            "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Natalia sold clips to 48 of her friends in April", "café ☕ 日本語 naïve résumé",
          "the answer is {x} and {0}", "user assistant system think"] * 20


def _msg(role, content, weight=None):
  return {"role": role, "content": content,
          "weight": int(role == "assistant") if weight is None else weight}


def _examples():
  out = [Example(f"d.jsonl:{i}", messages=[_msg("user", f"question {i}: how many clips?"),
                                           _msg("assistant", f"{i * 7} clips. #### {i * 7}")])
         for i in range(12)]
  odd = [
      [_msg("system", "Be brief."), _msg("user", "café?"), _msg("assistant", "☕ 日本語 naïve")],
      [_msg("user", "braces"), _msg("assistant", "the answer is {x} and {0} }{")],
      [_msg("user", 'quotes " \' \\ < & >'), _msg("assistant", 'a "quoted" \\ answer')],
      [_msg("user", "  padded  "), _msg("assistant", "\n\nleading newlines and trailing space ")],
      [_msg("user", "   "), _msg("assistant", "whitespace-only question")],
      [_msg("user", ""), _msg("assistant", "empty question")],
      [_msg("user", "hi"), _msg("assistant", "hello", 0), _msg("user", "and now?"),
       _msg("assistant", "now this")],
      [_msg("assistant", "assistant first"), _msg("user", "ok"), _msg("assistant", "done")],
      [_msg("user", "think"), _msg("assistant", "<think>hmm</think>the result")],
  ]
  out += [Example(f"odd.jsonl:{i}", messages=m) for i, m in enumerate(odd)]
  out.append(Example("t.txt:1", text="a plain document"))
  return out


def _tokenizer(template_source, *, pre="bytelevel", normalizer=None, lstrip_end=False, extra=()):
  backend = Backend(models.BPE(unk_token="<unk>" if pre == "metaspace" else None))
  if pre == "bytelevel":
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:  # sentencepiece-style: spaces spelled '▁', one prepended
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = []
  if normalizer:
    backend.normalizer = normalizer
  trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=alphabet,
                                special_tokens=SPECIALS + (["<unk>"] if pre == "metaspace" else []))
  backend.train_from_iterator(CORPUS, trainer)
  if lstrip_end:
    backend.add_special_tokens([AddedToken("<|im_end|>", lstrip=True, special=True)])
  backend.add_special_tokens(list(extra))
  return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                   chat_template=template_source)


def _reference(example, tok):
  """The per-example path: two renders, the whole string encoded with offsets."""
  if example.text is not None:
    return template._text_example(example, tok.encode(example.text), tok)
  pieces = template._template_pieces(example, tok)
  if all(isinstance(p, str) for p, _, _ in pieces):
    enc = template._rust_backend(tok).encode("".join(p for p, _, _ in pieces), add_special_tokens=False)
    tokens, mask = template._assign_encoding(pieces, enc, tok)
  else:  # an EOS id appended after the rendering: each text piece encoded on its own
    ids = [p if isinstance(p, list) else tok.encode(p, add_special_tokens=False) for p, _, _ in pieces]
    tokens, mask = template._join_pieces(pieces, ids, tok)
  mask[0] = 0
  return tokens, mask


def _assert_same(tok, examples):
  for ex, got in zip(examples, template.tokenize_many(examples, tok)):
    want = _reference(ex, tok)
    if isinstance(want, template.TokenizedExample):
      want = (want.tokens.tolist(), want.loss_mask.tolist())
    assert got.tokens.tolist() == list(want[0]), ex.where
    assert got.loss_mask.tolist() == list(want[1]), ex.where


@pytest.mark.parametrize("source", [CHATML, SMOL, TRIM, THINK, TOJSON, IF_EMPTY],
                         ids=["chatml", "default-system", "trim", "think", "tojson", "if-empty"])
def test_same_tokens_and_masks_for_every_template(source):
  _assert_same(_tokenizer(source), _examples())


@pytest.mark.parametrize("source", [SMOL, TOJSON], ids=["default-system", "tojson"])
def test_one_render_per_shape_not_two_per_example(source, monkeypatch):
  examples = [ex for ex in _examples() if ex.where.startswith("d.jsonl")] * 20  # one shape, 240
  renders = []
  real_render = template._render
  monkeypatch.setattr(template, "_render", lambda *a: renders.append(1) or real_render(*a))
  template.tokenize_many(examples, _tokenizer(source))
  # SMOL: the shape's pieces (2 renders), the padded probe (1), the first two examples checked
  # (2), then every 256th; a template that escapes contents takes the per-example path.
  assert len(renders) == 5 if source == SMOL else len(renders) >= 2 * len(examples)


def test_skeleton_guards():
  tok = _tokenizer(THINK)
  skeletons = skeleton.Skeletons(tok, template._template_pieces, template._render)
  ex = _examples()
  assert skeleton.content_literals(THINK) == ("</think>",)
  assert skeleton.content_literals(CHATML) == ()
  assert skeletons.pieces(ex[0]) is not None
  assert skeletons.pieces(ex[-2]) is None  # holds '</think>': the template looks inside it
  assert skeletons.pieces(ex[16]) is None  # whitespace-only content: no shape
  escaping = skeleton.Skeletons(_tokenizer(TOJSON), template._template_pieces, template._render)
  assert escaping.pieces(ex[0]) is None


@pytest.mark.parametrize("kind", ["bytelevel", "nfc", "lstrip", "metaspace"])
def test_byte_level_cuts_fall_back_where_lengths_do_not_add_up(kind):
  tok = {"bytelevel": lambda: _tokenizer(SMOL),
         "nfc": lambda: _tokenizer(SMOL, normalizer=normalizers.NFC()),
         "lstrip": lambda: _tokenizer(SMOL, lstrip_end=True),
         "metaspace": lambda: _tokenizer(SMOL, pre="metaspace")}[kind]()
  examples = _examples()[:-1]
  if kind == "nfc":  # a decomposed é: NFC changes the text, so its byte lengths don't add up
    examples.append(Example("nfc.jsonl:1", messages=[_msg("user", "cafe\u0301"), _msg("assistant", "ok")]))
  _assert_same(tok, examples)
  backend = template._rust_backend(tok)
  pieces = [template._template_pieces(ex, tok) for ex in examples]
  fast = bytelevel.encode_pieces(backend, tok.eos_token_id, pieces)
  taken = [r is not None for r in fast]
  if kind == "metaspace":
    assert bytelevel.byte_lengths(backend) is None and not any(taken)
  elif kind == "nfc":
    assert taken == [True] * (len(examples) - 1) + [False]
  elif kind == "lstrip":  # "...space <|im_end|>", "\n<|im_end|>": the token swallows the space
    swallowed = [bool(re.search(r"\s<\|im_end\|>", "".join(p for p, _, _ in ps))) for ps in pieces]
    assert sum(swallowed) == 3 and taken == [not s for s in swallowed]
  else:
    assert all(taken)


def test_a_start_every_example_shares_is_encoded_once():
  """SMOL injects a default system prompt: every rendering starts with it, up to the user turn's
  <|im_start|>. It is encoded once, cut only right after an added token (where the tokenizer
  cuts its input anyway), and not at all when a longer added token would cross the cut."""
  examples = [ex for ex in _examples() if ex.where.startswith("d.jsonl")]
  system = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>"
  for extra, expected in (((), system), (["<|im_start|>user"], system + "user"),
                          (["<|im_start|>user\nquestion 1"], "")):  # examples 1, 10, 11 hold it
    tok = _tokenizer(SMOL, extra=extra)
    fulls = ["".join(p for p, _, _ in template._template_pieces(ex, tok)) for ex in examples]
    assert bytelevel.shared_prefix(fulls, bytelevel.byte_lengths(template._rust_backend(tok))[2]) == expected
    _assert_same(tok, examples)
  assert bytelevel.shared_prefix(["a<|x|>bc", "a<|x|>bd"], ("<|x|>",)) == "a<|x|>"
  assert bytelevel.shared_prefix(["a<|x|>bc", "a<|x|>bd"], ("<|x|>", "<|x|>bc")) == ""
  assert bytelevel.shared_prefix(["a<|x|>bc", "z<|x|>bd"], ("<|x|>",)) == ""


def test_chunks_and_repeats(monkeypatch):
  """Encoding runs in chunks of examples on a worker thread, each distinct string once: small
  chunks, and repeats within and across chunks, give the same tokens and masks."""
  monkeypatch.setattr(bytelevel, "_CHUNK", 4)
  examples = _examples()[:-1]
  _assert_same(_tokenizer(SMOL), examples + examples[::-1] + examples[:3])
