"""ftjax.tokenizer against transformers: exact token ids and identical chat-template text.

Every tokenizer here is trained in the test (SentencePiece, `tokenizers` BPE) and written to the
formats users bring (a `.model`, a GGUF), then loaded both by ftjax and by transformers.
"""

import json
import random

import numpy as np
import pytest

from ftjax.errors import FtjaxError
from ftjax.tokenizer import Tokenizer, load_tokenizer, read_gguf_metadata

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
gguf = pytest.importorskip("gguf")

CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATION = [
  {"role": "system", "content": "You are terse."},
  {"role": "user", "content": "What is the capital of France?"},
  {"role": "assistant", "content": "Paris."},
  {"role": "user", "content": "And of Italy?"},
]

SAMPLES = [
  "Hello world",
  "the quick brown fox jumps over the lazy dog",
  " leading space",
  "   three leading spaces",
  "trailing spaces   ",
  "double  inner   spaces",
  "line one\nline two\n\nline four",
  "\nstarts with a newline",
  "tabs\tand\r\nwindows newlines",
  "digits 0123456789 and 3.14159 and 1,000,000",
  "Caf\u00e9 na\u00efve \u00fcber r\u00e9sum\u00e9",
  "\u6f22\u5b57\u3068\u304b\u306a \u4e2d\u6587",
  "emoji \U0001F600\U0001F680 and symbols \u2211\u221e\u2192",
  "unknown chars \u0b85\u0b86 \u16a0\u16a1 \u2603",
  "punctuation!?;:'\"()[]{}<>@#$%^&*",
  "I'm sure you'll see they've gone",
  "CamelCaseWords and snake_case_words",
  "x",
  "",
  "a very long line " * 20,
  "def f(x):\n    return x ** 2\n",
  "full-width \uff21\uff22\uff23 and ligature \ufb01",
]

WORDS = ("the of and to in is was he she it that for on with as his her they at be this from have or by "
         "one had not but what all were when we there can an your which their said if do will each about how "
         "up out them then many some so these would other into has more two like him see time could no make "
         "than first been its who now people my made over did down only way find use may water long little "
         "very after words called just where most know Paris France Italy capital question answer").split()


def _corpus_lines(n=3000):
  """Deterministic English-ish text with capitals, digits, punctuation and a little unicode."""
  rng = random.Random(1234)
  extras = ["caf\u00e9", "na\u00efve", "\u00fcber", "r\u00e9sum\u00e9", "\u6f22\u5b57", "'s", "(ok)", "x**2"]
  lines = []
  for _ in range(n):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 16))]
    if rng.random() < 0.3:
      words[0] = words[0].capitalize()
    if rng.random() < 0.3:
      words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
    if rng.random() < 0.15:
      words.append(rng.choice(extras))
    lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ""]))
  return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("\n".join(_corpus_lines()), encoding="utf-8")
  return path


def _train_spm(corpus, out_dir, **options):
  out_dir.mkdir(parents=True, exist_ok=True)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=600,
                                 character_coverage=1.0, minloglevel=2, **options)
  return out_dir / "tokenizer.model"


# Llama's own tokenizer.model settings: BPE, no normalization, spaces kept, byte fallback.
SPM_LLAMA_LIKE = dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                      remove_extra_whitespaces=False)
# SentencePiece's defaults (NFKC, squeezed spaces), unigram, with user-defined and control pieces.
SPM_DEFAULTS = dict(model_type="unigram", user_defined_symbols=["<think>", "</think>"],
                    control_symbols=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module", params=["llama_like", "nfkc_unigram"])
def spm_model(request, corpus, tmp_path_factory):
  options = SPM_LLAMA_LIKE if request.param == "llama_like" else SPM_DEFAULTS
  return _train_spm(corpus, tmp_path_factory.mktemp(request.param), **options)


def _assert_same_ids(ours, hf, samples=SAMPLES):
  for text in samples:
    for special in (True, False):
      assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), (
        text, special)
    ids = hf.encode(text)
    for skip in (True, False):
      assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)


# -- SentencePiece ---------------------------------------------------------------------------------


def test_sentencepiece_matches_sentencepiece_and_transformers(spm_model):
  ours = load_tokenizer(spm_model)
  processor = spm.SentencePieceProcessor(model_file=str(spm_model))
  hf = transformers.AutoTokenizer.from_pretrained(str(spm_model.parent))
  samples = SAMPLES + ["<think>inside</think> after", "a<think>b"]
  for text in samples:
    assert ours.encode(text, add_special_tokens=False) == processor.encode(text), text
  _assert_same_ids(ours, hf, samples + ["<|im_start|>user\nhi<|im_end|>", "<s>bos in text</s>"])
  assert ours.vocab_size == len(hf) == processor.get_piece_size()
  assert (ours.bos_token_id, ours.eos_token_id) == (processor.bos_id(), processor.eos_id())
  assert ours.pad_token_id == ours.eos_token_id  # no pad piece: fall back to EOS
  assert not ours.add_bos_token  # transformers adds no BOS unless a config asks for it


def test_sentencepiece_matches_llama_tokenizer(corpus, tmp_path):
  """`LlamaTokenizer` drops SentencePiece's dummy prefix on text that starts with whitespace
  (its Metaspace sees a "▁" already there); everywhere else it must agree with us."""
  model = _train_spm(corpus, tmp_path / "llama", **SPM_LLAMA_LIKE)
  hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "llama"))
  assert hf.encode("Hello world", add_special_tokens=False)  # the vocabulary really was loaded
  _assert_same_ids(load_tokenizer(model), hf, [s for s in SAMPLES if not s[:1].isspace()])


def test_sentencepiece_folder_with_config_adds_bos(corpus, tmp_path):
  model_dir = tmp_path / "with_config"
  _train_spm(corpus, model_dir, **SPM_LLAMA_LIKE)
  (model_dir / "tokenizer_config.json").write_text(json.dumps({
    "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML}))
  ours = load_tokenizer(model_dir)
  hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  assert ours.add_bos_token and ours.encode("hi")[0] == ours.bos_token_id == hf.bos_token_id
  _assert_same_ids(ours, hf)
  assert ours.apply_chat_template(CONVERSATION) == hf.apply_chat_template(CONVERSATION, tokenize=False)


# -- GGUF ------------------------------------------------------------------------------------------


def _train_byte_level_bpe(corpus):
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train([str(corpus)], trainer)
  data = json.loads(tok.to_str())
  vocab = data["model"]["vocab"]
  tokens = [None] * len(vocab)
  for token, index in vocab.items():
    tokens[index] = token
  merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
  return tokens, merges


def _write_gguf(path, tokenizer_model, tokens, token_types, *, merges=None, scores=None, pre=None,
                add_bos=None, bos=1, eos=2, pad=None, unk=None, template=CHATML):
  """A tiny llama-architecture GGUF: the metadata transformers needs, one dummy tensor."""
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_context_length(64)
  writer.add_embedding_length(8)
  writer.add_block_count(1)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_head_count_kv(1)
  writer.add_rope_dimension_count(4)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(len(tokens))
  writer.add_tokenizer_model(tokenizer_model)
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(token_types)
  if merges is not None:
    writer.add_token_merges(merges)
  if scores is not None:
    writer.add_token_scores(scores)
  writer.add_bos_token_id(bos)
  writer.add_eos_token_id(eos)
  if pad is not None:
    writer.add_pad_token_id(pad)
  if unk is not None:
    writer.add_unk_token_id(unk)
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  if template is not None:
    writer.add_chat_template(template)
  writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def byte_level_bpe(corpus):
  return _train_byte_level_bpe(corpus)


@pytest.mark.parametrize("pre,add_bos", [("smollm", False), ("llama-bpe", True)])
def test_gguf_gpt2_tokenizer_matches_transformers(byte_level_bpe, tmp_path, pre, add_bos):
  tokens, merges = byte_level_bpe
  tokens = tokens + ["<think>"]  # a user-defined token, matched whole but not special
  types = [3 if t.startswith("<|") else 4 if t == "<think>" else 1 for t in tokens]
  path = _write_gguf(tmp_path / "tiny.gguf", "gpt2", tokens, types, merges=merges, pre=pre, add_bos=add_bos,
                     bos=0, eos=2, pad=2)
  ours = load_tokenizer(path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
  chat_samples = ["<|im_start|>user\nhi<|im_end|>\n", "a<think>b</think>", "<|endoftext|>end"]
  _assert_same_ids(ours, hf, SAMPLES + chat_samples)
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                       hf.pad_token_id) == (0, 2, 2)
  assert ours.add_bos_token == add_bos and ours.vocab_size == len(hf)
  chat = CONVERSATION[1:3]
  text = ours.apply_chat_template(chat, add_generation_prompt=True)
  assert text == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  assert text.endswith("<|im_start|>assistant\n")
  assert ours.encode(text, add_special_tokens=False) == hf.apply_chat_template(
    chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_gguf_llama_sentencepiece_tokenizer_matches_transformers(corpus, tmp_path):
  from sentencepiece import sentencepiece_model_pb2

  model = _train_spm(corpus, tmp_path / "spm", **SPM_LLAMA_LIKE)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model.read_bytes())
  tokens = [p.piece for p in proto.pieces]
  path = _write_gguf(tmp_path / "spm.gguf", "llama", tokens, [p.type for p in proto.pieces],
                     scores=[p.score for p in proto.pieces], bos=1, eos=2, unk=0, template=None)
  ours = load_tokenizer(path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
  # Text after a control token gets no "▁" prefix here (LlamaTokenizer's non-legacy Metaspace).
  _assert_same_ids(ours, hf, SAMPLES + ["<s>bos in text</s> more", "hi</s>there", "a <unk> b"])
  assert ours.add_bos_token and ours.encode("hi")[0] == 1  # llama.cpp's default for SentencePiece
  with pytest.raises(FtjaxError, match="no chat template"):
    ours.apply_chat_template(CONVERSATION)


def test_read_gguf_metadata_plain_values(byte_level_bpe, tmp_path):
  tokens, merges = byte_level_bpe
  path = _write_gguf(tmp_path / "m.gguf", "gpt2", tokens, [1] * len(tokens), merges=merges, add_bos=False)
  fields = read_gguf_metadata(path)
  assert fields["general.architecture"] == "llama"
  assert fields["tokenizer.ggml.tokens"] == tokens and fields["tokenizer.ggml.merges"] == merges
  assert fields["tokenizer.ggml.token_type"] == [1] * len(tokens)
  assert fields["tokenizer.ggml.add_bos_token"] is False
  assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["llama.block_count"] == 1
  assert fields["tokenizer.chat_template"] == CHATML
  assert read_gguf_metadata(gguf.GGUFReader(str(path)))["tokenizer.ggml.tokens"] == tokens


def test_gguf_unsupported_tokenizer_model_is_named():
  with pytest.raises(FtjaxError, match="'bert'"):
    Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# -- tokenizer.json round trip ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["gguf", "sentencepiece"])
def test_save_round_trips_through_transformers(source, byte_level_bpe, corpus, tmp_path):
  if source == "gguf":
    tokens, merges = byte_level_bpe
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    ours = load_tokenizer(_write_gguf(tmp_path / "t.gguf", "gpt2", tokens, types, merges=merges, add_bos=False))
  else:
    model = _train_spm(corpus, tmp_path / "spm", **SPM_DEFAULTS)
    ours = Tokenizer.from_sentencepiece(model, chat_template=CHATML, add_bos_token=True)
  out = tmp_path / "saved"
  ours.save(out)
  hf = transformers.AutoTokenizer.from_pretrained(str(out))
  _assert_same_ids(ours, hf)
  for prompt in (False, True):
    assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=prompt) == hf.apply_chat_template(
      CONVERSATION, add_generation_prompt=prompt, tokenize=False)
  again = load_tokenizer(out)
  assert again.chat_template == CHATML and again.add_bos_token == ours.add_bos_token
  for text in SAMPLES:
    assert again.encode(text) == ours.encode(text), text


def test_chat_template_helpers_render_like_transformers(byte_level_bpe, tmp_path):
  """raise_exception, tojson (no HTML escaping), bos/eos variables and tools reach the template."""
  tokens, merges = byte_level_bpe
  template = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with a user turn') }}{% endif %}"
    "{{ bos_token }}{% if tools %}{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | tojson }}{{ eos_token }}\n{% endfor %}")
  types = [3 if t.startswith("<|") else 1 for t in tokens]
  path = _write_gguf(tmp_path / "t.gguf", "gpt2", tokens, types, merges=merges, template=template)
  ours = load_tokenizer(path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
  tools = [{"type": "function", "function": {"name": "f<&>", "parameters": {}}}]
  chat = [{"role": "user", "content": "a <b> & \u00e9"}]
  assert ours.apply_chat_template(chat, tools=tools) == hf.apply_chat_template(chat, tools=tools, tokenize=False)
  with pytest.raises(Exception, match="must start with a user turn"):
    ours.apply_chat_template([{"role": "assistant", "content": "x"}])


# -- errors ----------------------------------------------------------------------------------------


def test_missing_path_is_an_ftjax_error(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FtjaxError, match=str(missing)):
    load_tokenizer(missing)


def test_folder_without_tokenizer_files_is_an_ftjax_error(tmp_path):
  with pytest.raises(FtjaxError, match=f"{tmp_path}.*no tokenizer.json or tokenizer.model"):
    load_tokenizer(tmp_path)


def test_unrecognised_file_is_an_ftjax_error(tmp_path):
  other = tmp_path / "weights.bin"
  other.write_bytes(b"\0")
  with pytest.raises(FtjaxError, match=str(other)):
    load_tokenizer(other)
