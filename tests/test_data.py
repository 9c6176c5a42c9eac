"""Data pipeline: validation errors, loss masks, length policy, packing, resumable batches,
and the quickstart task generator."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ftjax.data import build_dataset, load_examples, pack, quickstart_task, tokenize_example
from ftjax.data import preference, prompts, template, tokenize_examples
from ftjax.data.formats import Example
from ftjax.data.loader import Loader
from ftjax.data.sources import Record
from ftjax.errors import FtjaxError
from ftjax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
  "{% endif %}")
# SmolLM2's own template: it injects a default system prompt when the first message is not one.
SMOLLM2_CHATML = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
  "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}")


def _backend():
  from tokenizers import Tokenizer as Backend
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = Backend(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  lines = [e["input"] + "\n" + e["output"] for e in quickstart_task.make_examples(400, seed=7)]
  lines += ["user assistant system hello world the quick brown fox"] * 20
  tok.train_from_iterator(lines, trainer)
  return tok


@pytest.fixture(scope="module")
def tok():
  """SmolLM2-like: ChatML, EOS = <|im_end|>, pad == eos, no BOS."""
  return Tokenizer(_backend(), eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML)


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _masked_text(tok, tex):
  ids = [int(t) for t, m in zip(tex.tokens, tex.loss_mask) if m]
  return tok.decode(ids, skip_special_tokens=False)


def _chat(*turns, system=None):
  msgs = [{"role": "system", "content": system, "weight": 0}] if system else []
  for i, t in enumerate(turns):
    role = "user" if i % 2 == 0 else "assistant"
    msgs.append({"role": role, "content": t, "weight": int(role == "assistant")})
  return Example("x.jsonl:1", messages=msgs)


# -- reading and validation ---------------------------------------------------------------------


def test_invalid_json_names_file_and_line(tmp_path):
  path = _write(tmp_path / "d.jsonl", ['{"input": "a", "output": "b"}', "", '{"input": "a", oops}'])
  with pytest.raises(FtjaxError, match=r"d\.jsonl:3: not valid JSON \("):
    load_examples(path)


def test_json_array_errors_keep_line_numbers(tmp_path):
  path = tmp_path / "d.json"
  path.write_text('[\n {"input": "a", "output": "b"},\n {"input": "c"}\n]\n')
  with pytest.raises(FtjaxError, match=r"d\.json:3: missing key 'output'"):
    load_examples(str(path))
  path.write_text('[\n {"input": "a", "output": "b"},\n {"input": "c" "output": 1}\n]\n')
  with pytest.raises(FtjaxError, match=r"d\.json:3: not valid JSON"):
    load_examples(str(path))


def test_missing_key_and_wrong_type(tmp_path):
  path = _write(tmp_path / "d.jsonl", ['{"input": "a", "output": "b"}', '{"input": "a"}'])
  with pytest.raises(FtjaxError, match=r"d\.jsonl:2: missing key 'output'"):
    load_examples(path)
  path = _write(tmp_path / "e.jsonl", ['{"input": "a", "output": 3}'])
  with pytest.raises(FtjaxError, match=r"e\.jsonl:1: key 'output' must be a string"):
    load_examples(path)


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(FtjaxError, match="nope.jsonl: data file not found"):
    load_examples(str(tmp_path / "nope.jsonl"))
  with pytest.raises(FtjaxError, match=r"empty\.jsonl: no records \(empty dataset\)"):
    load_examples(_write(tmp_path / "empty.jsonl", ["", "  "]))
  with pytest.raises(FtjaxError, match="cannot tell the data format"):
    load_examples(_write(tmp_path / "odd.jsonl", ['{"foo": 1}']))


@pytest.mark.parametrize("record, code", [
  ([1, 2], "data_type"),
  ({"messages": []}, "missing_messages_list"),
  ({"messages": [{"content": "hi"}]}, "message_missing_key"),
  ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "message_unrecognized_key"),
  ({"messages": [{"role": "bot", "content": "hi"}]}, "unrecognized_role"),
  ({"messages": [{"role": "user"}]}, "missing_content"),
  ({"messages": [{"role": "user", "content": "hi"}]}, "example_missing_assistant_message"),
  ({"messages": [{"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "x", "weight": 2}]}, "invalid_weight"),
])
def test_chat_error_codes(tmp_path, record, code):
  good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  path = _write(tmp_path / "c.jsonl", [json.dumps(good), json.dumps(record)])
  with pytest.raises(FtjaxError, match=rf"c\.jsonl:2: {code}"):
    load_examples(path, format="chat")


def test_formats_are_detected_per_file(tmp_path):
  io = _write(tmp_path / "io.jsonl", ['{"input": "q", "output": "a", "system": "be brief"}'])
  alpaca = _write(tmp_path / "al.jsonl", ['{"instruction": "Do", "input": "this", "output": "done"}',
                                           '{"instruction": "Just do", "output": "ok"}'])
  selfi = _write(tmp_path / "si.jsonl", [json.dumps({"instruction": "Add", "instances": [
    {"input": "1+1", "output": "2"}, {"input": "", "output": "0"}]})])
  text = tmp_path / "t.txt"
  text.write_text("some plain text\nfor pretraining\n")
  ex = load_examples([io, alpaca, selfi, str(text)], system_prompt="default sys")
  assert [m["role"] for m in ex[0].messages] == ["system", "user", "assistant"]
  assert ex[0].messages[0]["content"] == "be brief"  # the record's own system wins
  assert ex[1].messages[1]["content"] == "Do\n\nthis" and ex[1].messages[0]["content"] == "default sys"
  assert ex[2].messages[1]["content"] == "Just do"
  assert [e.messages[-1]["content"] for e in ex[3:5]] == ["2", "0"] and ex[3].where == ex[4].where
  assert ex[5].text.startswith("some plain") and ex[5].messages is None


def test_parquet_and_csv_through_datasets(tmp_path):
  import datasets

  rows = {"input": ["a", "b"], "output": ["x", "y"]}
  datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "d.parquet"))
  (tmp_path / "d.csv").write_text("input,output\na,x\nb,\n")
  ex = load_examples(str(tmp_path / "d.parquet"))
  assert [e.messages[-1]["content"] for e in ex] == ["x", "y"]
  with pytest.raises(FtjaxError, match=r"d\.csv:3: key 'output' must be a string"):
    load_examples(str(tmp_path / "d.csv"))  # empty CSV cell -> None, on line 3


# -- templating and loss masks ------------------------------------------------------------------


def test_loss_mask_is_assistant_content_plus_eos(tok):
  out = '{"date": "2024-03-03", "amount": 1234.50, "currency": "EUR", "vendor": "Acme GmbH"}'
  tex = tokenize_example(_chat("paid 1.234,50 eur to acme gmbh", out, system="sys"), tok)
  assert tex.tokens.dtype == np.int32 and tex.loss_mask.dtype == np.int32
  assert _masked_text(tok, tex) == out + "<|im_end|>"
  full = tok.apply_chat_template([{"role": "system", "content": "sys"},
                                  {"role": "user", "content": "paid 1.234,50 eur to acme gmbh"},
                                  {"role": "assistant", "content": out}])
  assert tex.tokens.tolist() == tok.encode(full, add_special_tokens=False)
  # The last token is the newline after <|im_end|>, which is not trained.
  assert tex.loss_mask[-1] == 0 and tex.tokens[np.flatnonzero(tex.loss_mask)[-1]] == tok.eos_token_id


def test_multi_turn_weights(tok):
  ex = _chat("first q", "first answer", "second q", "second answer")
  tex = tokenize_example(ex, tok)
  assert _masked_text(tok, tex) == "first answer<|im_end|>second answer<|im_end|>"
  ex.messages[1]["weight"] = 0
  tex = tokenize_example(ex, tok)
  assert _masked_text(tok, tex) == "second answer<|im_end|>"


def test_eos_trained_when_pad_equals_eos(tok, tmp_path):
  assert tok.pad_token_id == tok.eos_token_id
  path = _write(tmp_path / "d.jsonl", ['{"input": "hi", "output": "yo"}'] * 3)
  ds = build_dataset(path, tok, seq_len=64, pack=False)
  rows = ds.rows
  eos_targets = (rows["targets"] == tok.eos_token_id) & (rows["loss_mask"] > 0)
  assert eos_targets.sum(axis=1).tolist() == [1, 1, 1]
  # Padding (also the eos id) is never trained.
  assert rows["loss_mask"][rows["segment_ids"] == 0].sum() == 0


def test_default_system_prompt_template_and_assistant_first(tok):
  smol = Tokenizer(tok.backend, eos_token="<|im_end|>", chat_template=SMOLLM2_CHATML)
  tex = tokenize_example(_chat("q", "the answer"), smol)
  assert _masked_text(smol, tex) == "the answer<|im_end|>"
  first = Example("x:1", messages=[{"role": "assistant", "content": "opening line", "weight": 1}])
  assert _masked_text(smol, tokenize_example(first, smol)) == "opening line<|im_end|>"
  _, counts = tokenize_examples([first], smol, max_len=100)
  assert counts["no_user_turn"] == 1


def test_plain_format_without_chat_template(tok):
  plain = Tokenizer(tok.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  tex = tokenize_example(_chat("question", "answer"), plain)
  assert tok.decode(tex.tokens.tolist(), skip_special_tokens=False) == "question\nanswer<|im_end|>"
  assert _masked_text(plain, tex) == "answer<|im_end|>"


def test_offsets_mapping_agrees_with_pieces(tok):
  ex = _chat("paid 12 usd to hooli", '{"amount": 12.00}', "and again", "once more", system="s")
  pieces = template._template_pieces(ex, tok)
  by_pieces = template._join_pieces(
      pieces, [tok.encode(p, add_special_tokens=False) for p, _, _ in pieces], tok)
  enc = template._rust_backend(tok).encode("".join(p for p, _, _ in pieces), add_special_tokens=False)
  by_offsets = template._assign_encoding(pieces, enc, tok)
  assert by_offsets == by_pieces


def test_merge_across_cut_falls_back_to_offsets():
  from tokenizers import Tokenizer as Backend
  from tokenizers import decoders, models, pre_tokenizers

  # A BPE whose one merge "t"+"s" spans the cut between "...assistant" and "s fine".
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab["ts"] = len(vocab)
  backend = Backend(models.BPE(vocab=vocab, merges=[("t", "s")]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  glued = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{{ m['content'] }}<|im_end|>"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
  tok = Tokenizer(backend, eos_token="<|im_end|>", chat_template=glued,
                  extra_special_tokens=["<|im_start|>"])
  ex = _chat("q", "s fine")
  tex = tokenize_example(ex, tok)
  full = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in ex.messages])
  assert tex.tokens.tolist() == tok.encode(full, add_special_tokens=False)  # canonical tokens kept
  # The merged "ts" starts in the prompt, so it is not trained; the rest and EOS are.
  assert _masked_text(tok, tex) == " fine<|im_end|>"


def test_text_examples_train_every_token_and_window(tok, tmp_path):
  text = tmp_path / "t.txt"
  text.write_text(" ".join(f"word{i}" for i in range(300)))
  ex = load_examples(str(text))
  full = tokenize_example(ex[0], tok)
  assert full.tokens[-1] == tok.eos_token_id and full.loss_mask[1:].all() and not full.loss_mask[0]
  windows, counts = tokenize_examples(ex, tok, max_len=50)
  assert counts["chunked"] == 1 and all(len(w.tokens) <= 50 for w in windows)
  assert sum(int(w.loss_mask.sum()) for w in windows) == len(full.tokens) - 1


# -- length policy ------------------------------------------------------------------------------


def test_length_policies(tok, tmp_path):
  long_output = " ".join(["vendor acme gmbh"] * 60)
  path = _write(tmp_path / "d.jsonl", ['{"input": "a", "output": "short"}',
                                       json.dumps({"input": "b", "output": long_output})])
  ds = build_dataset(path, tok, seq_len=32, length_policy="truncate")
  s = ds.summary
  assert (s["examples"], s["over_length"], s["truncated"], s["dropped"], s["kept"]) == (2, 1, 1, 0, 2)
  assert max(len(e.tokens) for e in ds.examples) == 33 and "d.jsonl:2" in s["first_over_length"]
  ds = build_dataset(path, tok, seq_len=32, length_policy="drop")
  assert (ds.summary["over_length"], ds.summary["dropped"], ds.summary["kept"]) == (1, 1, 1)
  with pytest.raises(FtjaxError, match=r"d\.jsonl:2: example is \d+ tokens, longer than max_len 33"):
    build_dataset(path, tok, seq_len=32, length_policy="error")
  with pytest.raises(FtjaxError, match="length_policy 'cut'"):
    build_dataset(path, tok, seq_len=32, length_policy="cut")


# -- packing ------------------------------------------------------------------------------------


def _quickstart_file(tmp_path, n=40):
  return _write(tmp_path / "q.jsonl", [json.dumps(e) for e in quickstart_task.make_examples(n, 1)])


def test_packing_structure(tok, tmp_path):
  path = _quickstart_file(tmp_path)
  packed = build_dataset(path, tok, seq_len=256, pack=True)
  plain = build_dataset(path, tok, seq_len=256, pack=False)
  r, u = packed.rows, plain.rows
  assert r["inputs"].shape[1] == 256 and r["inputs"].shape[0] < u["inputs"].shape[0] == 40
  for k in ("inputs", "targets", "segment_ids", "positions"):
    assert r[k].dtype == np.int32
  assert r["loss_mask"].dtype == np.float32
  # Same trained targets overall, with and without packing.
  assert r["loss_mask"].sum() == u["loss_mask"].sum() == packed.summary["trained_tokens"]
  assert sorted(r["targets"][r["loss_mask"] > 0].tolist()) == sorted(u["targets"][u["loss_mask"] > 0].tolist())
  docs = {tuple(e.tokens.tolist()) for e in packed.examples}
  n_docs = 0
  for row in range(r["inputs"].shape[0]):
    seg, pos, mask = r["segment_ids"][row], r["positions"][row], r["loss_mask"][row]
    # Segments are 1, 2, ... in order with padding (0) only at the end; positions restart at 0.
    ids = [int(s) for s in np.unique(seg) if s]
    assert ids == list(range(1, len(ids) + 1))
    nonpad = np.flatnonzero(seg > 0)
    assert (seg[:nonpad[-1] + 1] > 0).all() and (np.diff(seg[nonpad]) >= 0).all()
    # No trained target crosses into another document or into padding.
    assert (mask[:-1][seg[1:] != seg[:-1]] == 0).all()
    assert (mask[seg == 0] == 0).all() and (pos[seg == 0] == 0).all()
    for s in ids:
      where = np.flatnonzero(seg == s)
      assert (pos[where] == np.arange(len(where))).all()
      toks = tuple(r["inputs"][row][where].tolist())
      with_last_target = toks + (int(r["targets"][row][where[-1]]),)
      if with_last_target not in docs:  # the target after the last token is not this document's
        assert toks in docs and mask[where[-1]] == 0
      n_docs += 1
  assert n_docs == 40


def test_pack_rejects_overlong_rows(tok):
  tex = tokenize_example(_chat("q", "a long answer " * 10), tok)
  with pytest.raises(ValueError, match="seq_len"):
    pack([tex], 8)


# -- batches ------------------------------------------------------------------------------------


def _take(loader, n, size=None):
  return [loader.next_batch(size) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_loader_deterministic_and_resumable(tok, tmp_path):
  ds = build_dataset(_quickstart_file(tmp_path, 60), tok, seq_len=64, pack=False)
  first = ds.batches(8, seed=3)
  batches = _take(first, 5)
  assert set(batches[0]) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
  assert batches[0]["inputs"].shape == (8, 64) and batches[0]["loss_mask"].dtype == np.float32
  state = json.loads(json.dumps(first.get_state()))
  assert state["epoch"] == 0 and state["row"] == 40
  cont = _take(first, 10)  # crosses into epochs 1 and 2
  resumed = ds.batches(8, seed=0, state=state)  # the seed comes from the state
  assert _same(_take(resumed, 10), cont)
  again = ds.batches(8, seed=3)
  assert _same(_take(again, 15), batches + cont)
  other = ds.batches(8, seed=4)
  assert not _same(_take(other, 5), batches)
  # An epoch visits every row exactly once.
  epoch = Loader(ds.rows, 60, seed=3).next_batch()
  assert sorted(map(bytes, epoch["inputs"])) == sorted(map(bytes, ds.rows["inputs"]))
  with pytest.raises(FtjaxError, match="rows"):
    Loader({k: v[:10] for k, v in ds.rows.items()}, 8, state=state)


def test_loader_any_batch_size_for_grad_accum(tok, tmp_path):
  ds = build_dataset(_quickstart_file(tmp_path, 30), tok, seq_len=64, pack=False)
  big = ds.batches(8, seed=1).next_batch()
  micro = ds.batches(8, seed=1)
  parts = [micro.next_batch(4), micro.next_batch(4)]
  for k in big:
    assert np.array_equal(np.concatenate([p[k] for p in parts]), big[k])


def test_eval_loader_single_pass_pads_last_batch(tok, tmp_path):
  ds = build_dataset(_quickstart_file(tmp_path, 10), tok, seq_len=64, pack=False)
  batches = list(ds.batches(4, shuffle=False, repeat=False))
  assert [b["inputs"].shape[0] for b in batches] == [4, 4, 4]
  assert np.array_equal(batches[0]["inputs"], ds.rows["inputs"][:4])
  last = batches[-1]
  assert last["loss_mask"][2:].sum() == 0 and last["segment_ids"][2:].sum() == 0
  assert sum(b["loss_mask"].sum() for b in batches) == ds.rows["loss_mask"].sum()


# -- quickstart task ----------------------------------------------------------------------------


def test_quickstart_generator_is_deterministic_without_overlap(tmp_path):
  a = quickstart_task.write_splits(str(tmp_path / "a"), 200, 50, seed=0)
  cmd = [sys.executable, os.path.join(REPO, "scripts", "make_quickstart_data.py"), "--out",
         str(tmp_path / "b"), "--train", "200", "--eval", "50"]
  subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=REPO))
  for name in ("train.jsonl", "eval.jsonl"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  train = [json.loads(line) for line in open(a[0])]
  evals = [json.loads(line) for line in open(a[1])]
  assert len(train) == 200 and len(evals) == 50
  assert not {e["input"] for e in train} & {e["input"] for e in evals}
  assert quickstart_task.make_examples(20, 5) != quickstart_task.make_examples(20, 6)
  for e in train:
    out = json.loads(e["output"])
    assert list(out) == ["date", "amount", "currency", "vendor"]
    assert e["output"] == json.dumps(out, separators=(", ", ": ")).replace(
      f'"amount": {out["amount"]}', f'"amount": {out["amount"]:.2f}')


def test_quickstart_score():
  ref = '{"date": "2024-03-03", "amount": 1234.50, "currency": "EUR", "vendor": "Acme GmbH"}'
  assert quickstart_task.score(ref + "\n", ref) == {"exact_match": 1.0, "json_valid": 1.0,
                                                    "field_accuracy": 1.0}
  loose = '{"date": "2024-03-03", "amount": 1234.5, "currency": "EUR", "vendor": "ACME"}'
  assert quickstart_task.score(loose, ref) == {"exact_match": 0.0, "json_valid": 1.0,
                                               "field_accuracy": 0.75}
  assert quickstart_task.score("paid 1.234,50 eur to acme", ref)["json_valid"] == 0.0
  assert quickstart_task.score('{"date": "2024-03-03"}', ref)["json_valid"] == 0.0


def test_quickstart_outputs_are_short(tok):
  ex = quickstart_task.make_examples(50, 0)
  assert max(len(tok.encode(e["output"])) for e in ex) < 80  # tiny test vocab: ~2x SmolLM2's count


# -- the shared real data -----------------------------------------------------------------------


def test_shared_gsm8k_with_field_mapping(shared_data, tok):
  path = os.path.join(shared_data, "gsm8k", "train.jsonl")
  ex = load_examples(path, fields={"question": "input", "answer": "output"})
  assert len(ex) == 7473 and ex[0].where == f"{path}:1"
  assert ex[0].messages[-1]["content"].endswith("#### 72")
  toks, counts = tokenize_examples(ex[:200], tok, max_len=4096)
  assert len(toks) == 200 and counts["over_length"] == 0
  for t, e in zip(toks, ex):
    assert _masked_text(tok, t) == e.messages[-1]["content"] + "<|im_end|>"


def test_shared_self_instruct_is_expanded(shared_data):
  path = os.path.join(shared_data, "self_instruct", "seed_tasks.jsonl")
  ex = load_examples(path)
  assert len(ex) == 175  # one example per instance; every seed task has exactly one
  assert ex[0].where == f"{path}:1" and ex[-1].where == f"{path}:175"
  assert len(load_examples(os.path.join(shared_data, "self_instruct",
                                        "user_oriented_instructions.jsonl"))) == 252
  assert all(m["content"] for e in ex for m in e.messages if m["role"] == "user")


def test_shared_tinyshakespeare_as_text(shared_data, tok):
  ds = build_dataset(os.path.join(shared_data, "tinyshakespeare", "input.txt"), tok, seq_len=512)
  assert ds.summary["chunked"] == 1 and ds.summary["fill"] > 0.99
  assert ds.summary["trained_tokens"] == ds.summary["tokens"] - len(ds.examples)


# -- record keys against the file's format --------------------------------------------------------


def test_a_record_of_another_format_is_mixed_format_not_read_as_the_first(tmp_path):
  from ftjax.data import formats
  from ftjax.data.sources import read_all
  # Read as input_output (the first record's format), the alpaca record trained on its input
  # alone, its instruction dropped without a word.
  path = _write(tmp_path / "m.jsonl", ['{"input": "q", "output": "a"}',
                                       '{"instruction": "Translate", "input": "chat", "output": "cat"}'])
  with pytest.raises(FtjaxError, match=r"m\.jsonl:2: mixed_format: keys \['input', 'instruction', "
                     r"'output'\] are the instruction format, but this file is input_output "
                     r"\(detected from .*m\.jsonl:1\)") as e:
    load_examples(path)
  assert e.value.code == "mixed_format"
  examples, problems = formats.validate_records(read_all(path)[0])  # what data check / skip see
  assert [(p.code, p.where[-9:]) for p in problems] == [("mixed_format", "m.jsonl:2")]
  assert len(examples) == 1
  # A forced format reads every record as that format, on purpose: no mixed_format.
  assert len(load_examples(path, format="instruction", skip_invalid=True)) == 1


@pytest.mark.parametrize("first, record, key, near", [
    ({"input": "q", "output": "a"}, {"input": "q", "output": "a", "sytem": "be brief"}, "sytem", "system"),
    ({"input": "q", "output": "a"}, {"input": "q", "Output": "a", "output": "b"}, "Output", "output"),
    ({"instruction": "i", "output": "a"}, {"instruction": "i", "ouptut": "a"}, "ouptut", "output"),
    ({"instruction": "i", "output": "a"}, {"instrcution": "i", "output": "a"}, "instrcution", "instruction"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     {"mesages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "mesages", "messages"),
])
def test_a_misspelt_key_is_unknown_key_naming_the_near_miss(tmp_path, first, record, key, near):
  path = _write(tmp_path / "k.jsonl", [json.dumps(first), json.dumps(record)])
  with pytest.raises(FtjaxError, match=rf"k\.jsonl:2: unknown_key: '{key}' is not read by the .* "
                     rf"did you mean '{near}'\?") as e:
    load_examples(path)
  assert e.value.code == "unknown_key"


def test_metadata_columns_and_other_formats_keys_are_ignored(tmp_path):
  # HF datasets carry extra columns (self_instruct's id/name/is_classification, dolly's
  # category, tatsu-lab/alpaca's rendered "text"): not misspellings, so not errors.
  path = _write(tmp_path / "meta.jsonl", [
      json.dumps({"id": "t0", "category": "qa", "source": "web", "input": "q", "output": "a"}),
      json.dumps({"id": "t1", "input": "q2", "output": "a2", "is_classification": False})])
  alpaca = _write(tmp_path / "al.jsonl", [json.dumps(
      {"instruction": "Do", "input": "x", "output": "y", "text": "### Instruction: Do ..."})])
  assert [e.messages[-1]["content"] for e in load_examples([path, alpaca])] == ["a", "a2", "y"]
  # data.fields renames first: the renamed key is read, a misspelt one still named.
  renamed = _write(tmp_path / "r.jsonl", [json.dumps({"question": "q", "answer": "a", "sys": "s"})])
  ex = load_examples(renamed, fields={"question": "input", "answer": "output", "sys": "system"})
  assert ex[0].messages[0] == {"role": "system", "content": "s", "weight": 0}
  typo = _write(tmp_path / "t.jsonl", [json.dumps({"question": "q", "answer": "a", "systme": "s"})])
  with pytest.raises(FtjaxError, match=r"t\.jsonl:1: unknown_key: 'systme' .* did you mean 'system'"):
    load_examples(typo, fields={"question": "input", "answer": "output"})
  # The same rule for CSV columns.
  (tmp_path / "c.csv").write_text("input,output,category\na,x,greeting\nb,y,\n")
  assert len(load_examples(str(tmp_path / "c.csv"))) == 2
  (tmp_path / "d.csv").write_text("input,outptu\na,x\n")
  with pytest.raises(FtjaxError, match=r"d\.csv:2: unknown_key: 'outptu'"):
    load_examples(str(tmp_path / "d.csv"))


def test_a_key_another_format_reads_beside_the_records_own_is_named(tmp_path):
  chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  # A top-level system prompt in a chat record was dropped without a word.
  path = _write(tmp_path / "c.jsonl", [json.dumps(chat), json.dumps(dict(chat, system="be brief"))])
  with pytest.raises(FtjaxError, match=r"c\.jsonl:2: unknown_key: \['system'\] are read by another "
                     r"format, not by chat \(keys messages\); a system prompt goes in messages"):
    load_examples(path)
  # A rendered "text" copy beside the messages (as many HF datasets carry) is fine.
  rendered = _write(tmp_path / "r.jsonl", [json.dumps(dict(chat, text="<user>q<assistant>a"))])
  assert load_examples(rendered)[0].messages[-1]["content"] == "a"


# --- data.length_policy: one rule for SFT examples, preference pairs and GRPO prompts -----------

@pytest.mark.parametrize("policy, kept", [("truncate", 2), ("drop", 1)])
def test_length_policy_counts_the_same_for_every_kind_of_data(tok, policy, kept):
  """SFT examples, preference pairs and GRPO prompts apply data.length_policy through one
  helper (ftjax.data.dataset.keep_over_length): the same counts, the same items kept."""
  short, long = "hi", " ".join(["word"] * 40)
  sft, sft_counts = tokenize_examples([_chat("q", short), _chat("q", long)], tok, max_len=30,
                                      length_policy=policy)
  pairs, _ = preference.read_pairs([Record(f"p:{i}", {"prompt": "q", "chosen": t, "rejected": "no"})
                                    for i, t in enumerate((short, long), 1)])
  kept_pairs, pair_counts, _ = preference.tokenize_items(pairs, tok, max_len=30, length_policy=policy)
  items, _ = prompts.read_prompts([Record(f"g:{i}", {"prompt": t}) for i, t in enumerate((short, long), 1)])
  kept_prompts, prompt_counts, _ = prompts.tokenize_prompts(items, tok, max_len=20,
                                                            length_policy=policy)
  want = {"over_length": 1, "truncated": int(policy == "truncate"), "dropped": int(policy == "drop")}
  for counts in (sft_counts, pair_counts, prompt_counts):
    assert {k: counts[k] for k in want} == want
  assert len(sft) == len(kept_pairs) == len(kept_prompts) == kept


def test_length_policy_error_has_the_over_length_code_for_every_kind_of_data(tok):
  """Under "error" each kind raises FtjaxError with code "over_length" naming the item's place
  (SFT examples raised without a code before the three loops became one)."""
  long = " ".join(["word"] * 40)
  pairs, _ = preference.read_pairs([Record("p:1", {"prompt": "q", "chosen": long, "rejected": "no"})])
  items, _ = prompts.read_prompts([Record("g:1", {"prompt": long})])
  runs = [(lambda: tokenize_examples([_chat("q", long)], tok, max_len=30, length_policy="error"), "x.jsonl:1"),
          (lambda: preference.tokenize_items(pairs, tok, max_len=30, length_policy="error"), "p:1"),
          (lambda: prompts.tokenize_prompts(items, tok, max_len=20, length_policy="error"), "g:1")]
  for run, where in runs:
    with pytest.raises(FtjaxError, match=where) as e:
      run()
    assert e.value.code == "over_length"
