"""Batched tokenisation (template.tokenize_many) and the on-disk token cache (ftjax/data/cache.py)."""

import os

import numpy as np
import pytest

from ftjax.data import build_dataset, cache, formats, quickstart_task, template
from ftjax.data.formats import Example
from ftjax.data.sources import Record
from ftjax.tokenizer import Tokenizer
from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def _msg(role, content, weight=None):
  return {"role": role, "content": content, "weight": int(role == "assistant") if weight is None else weight}


def _examples():
  out = [Example(f"q.jsonl:{i + 1}", messages=[_msg("system", "Extract."), _msg("user", e["input"]),
                                               _msg("assistant", e["output"])])
         for i, e in enumerate(quickstart_task.make_examples(30, seed=11))]
  out.append(Example("m.jsonl:1", messages=[_msg("user", "hi"), _msg("assistant", "hello", 0),
                                           _msg("user", "and now?"), _msg("assistant", "  spaced  ")]))
  out.append(Example("t.txt:1", text="a plain document, every token trained"))
  out.append(Example("s.jsonl:1", messages=[_msg("user", "short"), _msg("assistant", "e")]))
  return out


def _piecewise(ex, tok):
  """What ftjax did before batching: each piece encoded on its own, offsets only on a mismatch."""
  pieces = template._template_pieces(ex, tok)
  ids = [p if isinstance(p, list) else tok.encode(p, add_special_tokens=False) for p, _, _ in pieces]
  whole = tok.encode("".join(p for p, _, _ in pieces), add_special_tokens=False)
  tokens, mask = template._join_pieces(pieces, ids, tok)
  if tokens != whole:
    enc = template._rust_backend(tok).encode("".join(p for p, _, _ in pieces), add_special_tokens=False)
    tokens, mask = template._assign_encoding(pieces, enc, tok)
  mask[0] = 0
  return tokens, mask


def test_batched_equals_one_at_a_time(tok):
  examples = _examples()
  batched = template.tokenize_many(examples, tok)
  for ex, tex in zip(examples, batched):
    single = template.tokenize_example(ex, tok)
    assert tex.where == ex.where
    np.testing.assert_array_equal(tex.tokens, single.tokens)
    np.testing.assert_array_equal(tex.loss_mask, single.loss_mask)
    if ex.text is None:
      tokens, mask = _piecewise(ex, tok)
      assert tex.tokens.tolist() == tokens and tex.loss_mask.tolist() == mask, ex.where
  # without a chat template (the plain format) and through a tokenizer without the Rust batch API
  plain = Tokenizer(tok.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")

  class Duck:  # encode() only, as a duck-typed tokenizer offers
    chat_template, eos_token_id, bos_token_id, pad_token_id = None, plain.eos_token_id, None, 0
    def encode(self, text, add_special_tokens=True):
      return plain.encode(text, add_special_tokens=add_special_tokens)
  for a, b in zip(template.tokenize_many(examples, plain), template.tokenize_many(examples, Duck())):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_rerun_reads_the_cache(tok, token_cache, monkeypatch):
  examples = _examples()
  first = cache.tokenize(examples, tok)
  files = os.listdir(token_cache)
  assert len(files) == 1 and files[0].endswith(".npz")
  cache._last.clear()  # as a new process: only the file is left

  def no_tokenising(*args):
    raise AssertionError("tokenised again")
  monkeypatch.setattr(template, "tokenize_many", no_tokenising)
  moved = [Example(f"elsewhere.jsonl:{i}", ex.messages, ex.text) for i, ex in enumerate(examples)]
  again = cache.tokenize(moved, tok)  # same content under another name: still a hit
  assert [t.where for t in again] == [ex.where for ex in moved]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_any_key_change_misses(tok, token_cache, monkeypatch):
  examples = _examples()
  base = cache.key(examples, tok)
  changed_data = examples[:-1] + [Example("s.jsonl:1", messages=[_msg("user", "short"),
                                                                 _msg("assistant", "f")])]
  reweighted = [Example(ex.where, [dict(m, weight=0) if m["role"] == "assistant" else m
                                   for m in ex.messages], None) if ex.messages else ex
                for ex in examples]
  system = formats.to_examples(
      [Record("a:1", {"input": "x", "output": "y"})], system_prompt="Be brief.")
  other_template = Tokenizer(tok.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             chat_template=tok.chat_template + "{{ '' }}")
  other_vocab = tiny_tokenizer(vocab_size=380)
  keys = {base, cache.key(changed_data, tok), cache.key(reweighted, tok),
          cache.key(system, tok), cache.key(system[:0] + [Example("a:1", system[0].messages[1:])], tok),
          cache.key(examples, other_template), cache.key(examples, other_vocab)}
  assert len(keys) == 7
  monkeypatch.setattr(cache, "VERSION", cache.VERSION + 1)  # template.py changed what it makes
  assert cache.key(examples, tok) not in keys
  assert cache.key(list(examples), tok) == cache.key(examples, tok)  # deterministic


def test_build_dataset_uses_the_cache(tok, token_cache, tmp_path, monkeypatch):
  quickstart_task.write_splits(str(tmp_path / "d"), n_train=20, n_eval=2, seed=4)
  path = str(tmp_path / "d" / "train.jsonl")
  ds = build_dataset(path, tok, seq_len=128)
  calls = []
  many = template.tokenize_many
  monkeypatch.setattr(template, "tokenize_many", lambda *a: calls.append(1) or many(*a))
  cache._last.clear()
  again = build_dataset(path, tok, seq_len=100)  # seq_len acts after tokenising: still a hit
  assert not calls and again.summary["examples"] == ds.summary["examples"]
  monkeypatch.setenv("FTJAX_TOKEN_CACHE", "off")
  build_dataset(path, tok, seq_len=128)
  assert calls == [1]


def test_damaged_file_is_rewritten(tok, token_cache):
  examples = _examples()[:3]
  cache.tokenize(examples, tok)
  (path,) = [token_cache / f for f in os.listdir(token_cache)]
  path.write_bytes(b"not a zip")
  cache._last.clear()
  out = cache.tokenize(examples, tok)
  assert len(out) == 3 and path.stat().st_size > 100
