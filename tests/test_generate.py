"""KV-cache generation against a naive loop that recomputes the whole sequence every token, and
against transformers: greedy tokens on the real SmolLM2, sampling warpers, stop tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.generate import generate_ids
from ftjax.models import CausalLM
from ftjax.models.config import ModelConfig

CFGS = {
    "llama": ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                         max_position_embeddings=256, eos_token_id=None),
    "qwen3": ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=64, intermediate_size=96,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True,
                         rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=True),
}

PROMPTS = [[5, 17, 3, 44, 9, 12, 80], [7], [60, 2, 33], [11, 11, 11, 11, 11]]


def _model(family, dtype=jnp.float32, **changes):
  cfg = CFGS[family].replace(**changes)
  return _build(cfg, dtype)


@functools.cache  # tests only read the model: build each config once
def _build(cfg, dtype):
  # A wide init spreads the logits, so argmax is not decided by float rounding.
  return CausalLM(cfg, init_std=0.3, dtype=dtype, rngs=nnx.Rngs(1))


_forward = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens),
                   static_argnums=0)


def _naive_greedy(model, prompt, n, eos=()):
  """Whole-sequence forward per token; a fixed right-padded buffer (causal attention never
  looks right) keeps it to one compile."""
  seq = list(prompt)
  out = []
  for _ in range(n):
    buf = np.zeros((1, 48), np.int32)
    buf[0, :len(seq)] = seq
    logits = _forward(*nnx.split(model), jnp.asarray(buf))
    token = int(jnp.argmax(logits[0, len(seq) - 1]))
    out.append(token)
    seq.append(token)
    if token in eos:
      break
  return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_greedy_matches_full_recompute_with_left_padding(family):
  model = _model(family)
  got = generate_ids(model, PROMPTS, max_new_tokens=12, eos_ids=())
  want = [_naive_greedy(model, p, 12) for p in PROMPTS]
  assert got == want
  # Unpadded, one row at a time, gives the same tokens as the padded batch.
  assert generate_ids(model, [PROMPTS[1]], max_new_tokens=12, eos_ids=()) == [want[1]]


def test_shared_prompt_prefix_is_prefilled_once_with_the_same_result():
  """Prompts sharing 20 tokens (a system prompt, few-shot examples): the prefix is computed once
  and copied into every row; the tokens must equal the naive loop's."""
  from ftjax.generate import _shared_prefix_len
  model = _model("llama")
  prefix = list(np.random.RandomState(0).randint(0, 97, 20))
  prompts = [prefix + p for p in PROMPTS]
  assert _shared_prefix_len(prompts) == 16  # rounded down to the width bucket
  got = generate_ids(model, prompts, max_new_tokens=6, eos_ids=())
  want = [_naive_greedy(model, p, 6) for p in prompts]
  assert got == want


def test_rows_stop_at_their_own_eos():
  model = _model("llama")
  free = generate_ids(model, PROMPTS, max_new_tokens=12, eos_ids=())
  eos = free[0][3]  # row 0 emits it at step 4; other rows stop wherever they first emit it
  got = generate_ids(model, PROMPTS, max_new_tokens=12, eos_ids=[eos])
  for row, full in zip(got, free):
    cut = full.index(eos) + 1 if eos in full else len(full)
    assert row == full[:cut]
  assert got[0][-1] == eos and len(got[0]) <= 4
  # And the config's eos_token_id is the default stop token.
  assert generate_ids(_model("llama", eos_token_id=eos), PROMPTS, max_new_tokens=12) == got


def test_sampling_is_seeded_and_in_vocab():
  model = _model("llama")
  a = generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=3, eos_ids=())
  b = generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=3, eos_ids=())
  c = generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=4, eos_ids=())
  assert a == b and a != c
  assert all(0 <= t < model.config.vocab_size for row in a for t in row)
  assert all(len(row) == 12 for row in a)


def test_empty_prompt_is_an_error():
  model = _model("llama")
  with pytest.raises(FtjaxError, match="at least one token"):
    generate_ids(model, [[1, 2], []], max_new_tokens=2)


def test_max_new_tokens_and_sampling_settings_are_checked():
  model = _model("llama")
  for bad, match in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p=0.0"),
                     (dict(top_k=-1), "top_k=-1"), (dict(temperature=-1.0), "temperature=-1.0")]:
    with pytest.raises(FtjaxError, match=match):
      generate_ids(model, PROMPTS, **{"max_new_tokens": 4, **bad})


# --- sampling: transformers' logits warpers are the reference ----------------------------------

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 40, 1.0), (1.3, 20, 0.8),
                                                     (0.5, 0, 0.5)])
def test_warped_logits_match_transformers_warpers(temperature, top_k, top_p):
  import torch
  from transformers.generation import logits_process as lp
  from ftjax.generate import warp_logits
  logits = np.random.RandomState(0).randn(64, 500).astype(np.float32)
  warpers = lp.LogitsProcessorList(
      [lp.TemperatureLogitsWarper(temperature)] + ([lp.TopKLogitsWarper(top_k)] if top_k else [])
      + ([lp.TopPLogitsWarper(top_p)] if top_p < 1 else []))
  want = warpers(torch.zeros((64, 1), dtype=torch.long), torch.tensor(logits)).numpy()
  kept = np.isfinite(want)
  assert 2 < kept.sum(axis=1).mean() and kept.sum(axis=1).max() < 500  # the filters cut, not to 1
  # Eager with a Python top_p, and jitted with a traced one as the decode loop calls it.
  jitted = jax.jit(warp_logits, static_argnums=2)
  for got in (warp_logits(jnp.asarray(logits), temperature, top_k, top_p),
              jitted(jnp.asarray(logits), jnp.float32(temperature), top_k, jnp.float32(top_p))):
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isfinite(got), kept)
    # The same division in f32 on both sides: equal up to one rounding.
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)


def test_samples_follow_the_warped_distribution():
  """20000 draws of one row: each token's frequency is within 0.015 of its warped probability
  (a binomial std of at most sqrt(0.25 / 20000) = 0.0035: over 4 sigma), never outside the
  top-k / nucleus."""
  from ftjax.generate import _Sampler, warp_logits
  logits = jnp.asarray(np.random.RandomState(1).randn(1, 12).astype(np.float32))
  sampler = _Sampler(sample=True, top_k=6, top_p=True)
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = jax.jit(jax.vmap(lambda k: sampler.pick(logits, k, 0.8, 0.9)[0]))(keys)
  freq = np.bincount(np.asarray(draws), minlength=12) / 20000
  probs = np.asarray(jax.nn.softmax(warp_logits(logits, 0.8, 6, 0.9))[0])
  assert (probs == 0).sum() >= 6 and freq[probs == 0].sum() == 0
  assert np.abs(freq - probs).max() < 0.015


def test_top_k_and_top_p_sampling_is_seeded():
  model = _model("llama")
  kw = dict(max_new_tokens=10, temperature=1.0, top_k=5, top_p=0.9, eos_ids=())
  a = generate_ids(model, PROMPTS, seed=3, **kw)
  assert a == generate_ids(model, PROMPTS, seed=3, **kw)
  assert a != generate_ids(model, PROMPTS, seed=4, **kw)
  # top_k=1 leaves only the argmax: sampling is greedy whatever the seed.
  greedy = generate_ids(model, PROMPTS, max_new_tokens=10, eos_ids=())
  assert generate_ids(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=5,
                      eos_ids=()) == greedy


# --- progress ------------------------------------------------------------------------------------

def test_progress_bar_counts_new_tokens_without_changing_them(capsys):
  """With a bar the loop runs in chunks of 8 tokens with a host sync between them; the tokens
  (sampled ones too: a token's key depends only on the seed and its index) must not change."""
  import io
  from tqdm import tqdm
  model = _model("llama")
  free = generate_ids(model, PROMPTS, max_new_tokens=20, eos_ids=())
  eos = free[0][12]  # row 0 stops in the second chunk
  kw = dict(max_new_tokens=20, temperature=1.0, seed=2, eos_ids=[eos])
  want = generate_ids(model, PROMPTS, **kw)
  stream = io.StringIO()
  with tqdm(total=4 * 20, file=stream, unit="tok") as bar:
    assert generate_ids(model, PROMPTS, progress=bar, **kw) == want
    assert bar.n == sum(map(len, want))
  assert generate_ids(model, PROMPTS, progress=True, **kw) == want
  err = capsys.readouterr().err
  assert "generating" in err and "tok" in err


# --- stop tokens: config, generation_config.json, chat template ---------------------------------

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def _tokenizer(template, specials):
  from tokenizers import Tokenizer as Backend, models as tok_models, pre_tokenizers
  from ftjax.tokenizer import Tokenizer
  vocab = {c: i for i, c in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz \n")))}
  backend = Backend(tok_models.WordLevel({**vocab, "[UNK]": len(vocab)}, unk_token="[UNK]"))
  backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  backend.add_special_tokens(specials)
  return Tokenizer(backend, bos_token=specials[0], eos_token=specials[1], chat_template=template)


def test_stop_ids_add_the_chat_templates_end_of_turn():
  """Gemma ends a reply with <end_of_turn> (its EOS is <eos>): generation must stop on both."""
  from ftjax.generate import end_of_turn_id, stop_ids, stop_token_ids
  tok = _tokenizer(GEMMA_TEMPLATE, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"])
  eot, eos = tok.token_to_id("<end_of_turn>"), tok.token_to_id("<eos>")
  assert end_of_turn_id(tok) == eot
  cfg = CFGS["llama"].replace(eos_token_id=eos)
  assert stop_ids(cfg, tok) == {eos, eot}
  assert stop_token_ids(cfg) == {eos}  # the old helper is unchanged: config ids + extras
  # A template that writes no special token after a reply adds nothing; nor does none at all.
  plain = _tokenizer("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", ["<s>", "</s>"])
  assert end_of_turn_id(plain) is None
  assert stop_ids(cfg.replace(eos_token_id=(3, 4)), plain) == {3, 4, plain.eos_token_id}


def test_generation_config_eos_ids_are_read_with_the_model(tmp_path):
  """Llama 3 instruct: config.json says <|end_of_text|>, generation_config.json adds <|eot_id|>."""
  import json
  from ftjax.generate import stop_ids
  from ftjax.models.config import load_hf_config
  (tmp_path / "config.json").write_text(json.dumps(CFGS["llama"].replace(eos_token_id=5).to_hf_dict()))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
  cfg = load_hf_config(str(tmp_path))
  assert cfg.eos_token_id == 5 and cfg.generation_eos_token_ids == (5, 9)
  assert stop_ids(cfg) == {5, 9}
  assert "generation_eos_token_ids" not in json.dumps(cfg.to_hf_dict())
  # An export keeps them: save_hf_config writes generation_config.json back, as transformers reads it.
  from ftjax.models.hf import save_hf_config
  transformers = pytest.importorskip("transformers")
  (tmp_path / "out").mkdir()
  save_hf_config(cfg, str(tmp_path / "out"))
  assert load_hf_config(str(tmp_path / "out")).generation_eos_token_ids == (5, 9)
  assert transformers.GenerationConfig.from_pretrained(str(tmp_path / "out")).eos_token_id == [5, 9]
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "<eot>"}))
  with pytest.raises(FtjaxError, match=r"generation_config.json: eos_token_id must be an int"):
    load_hf_config(str(tmp_path))


# --- the training mesh ---------------------------------------------------------------------------

def test_sharded_model_generates_the_same_ids_without_gathering():
  """A model placed on the 8-device mesh as training places it (fsdp and tensor sharded f32
  params, bf16 compute) generates what the single-device model does, with a bf16 KV cache, and
  its arrays stay where they were."""
  from ftjax.generate import _new_cache, _on_mesh_of
  from ftjax.parallel import sharding
  model = _model("llama", dtype=jnp.bfloat16)
  want = generate_ids(model, PROMPTS, max_new_tokens=8, eos_ids=())
  graphdef, state = nnx.split(model)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  pure = nnx.to_pure_dict(state)
  placed = jax.device_put(pure, sharding.tree_shardings(pure, sharding.logical_axes(state), mesh))
  nnx.replace_by_pure_dict(state, placed)
  sharded = nnx.merge(graphdef, state)
  kernel = sharded.model.layers.mlp.up_proj.kernel[...]
  assert kernel.sharding.spec[1:] == ("fsdp", "tensor") and kernel.dtype == jnp.float32
  assert generate_ids(sharded, PROMPTS, max_new_tokens=8, eos_ids=()) == want
  assert sharded.model.layers.mlp.up_proj.kernel[...] is kernel  # not replaced by a gathered copy
  cache = _on_mesh_of(nnx.state(sharded), _new_cache(*nnx.split(sharded), 4, 8))
  assert cache["k"].dtype == jnp.bfloat16  # [l, b, s, kv heads, h]: batch and heads sharded
  assert tuple(cache["k"].sharding.spec) == (None, ("data", "fsdp"), None, "tensor", None)


# --- the real SmolLM2-135M-Instruct against transformers ------------------------------------------

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
                "List three colours."]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
  """ftjax's SmolLM2 (the built-in GGUF), written by save_pretrained and read by transformers:
  both hold exactly the same f32 weights."""
  import torch
  import transformers
  from ftjax import models
  try:
    model, tok = models.load("smollm2-135m-instruct")
  except FtjaxError as e:
    pytest.skip(f"SmolLM2 GGUF not available: no network/pip and no FTJAX_CACHE copy ({e})")
  path = str(tmp_path_factory.mktemp("smollm2"))
  models.save_pretrained(model, path, tok)
  # One torch thread: its OpenMP workers spin against XLA's on a small shared CPU.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  yield model, tok, ref
  torch.set_num_threads(threads)


def test_smollm2_greedy_equals_transformers_and_batched_equals_one_by_one(smol):
  """Chat prompts of unequal length, 20 new tokens, stopped at the chat's stop ids. transformers
  runs each prompt alone (no padding to get wrong); ftjax runs them as one left-padded batch
  and one by one."""
  import torch
  from ftjax.generate import encode_prompts, stop_ids
  model, tok, ref = smol
  ids = encode_prompts(tok, CHAT_PROMPTS, chat=True)
  assert len({len(p) for p in ids}) == len(ids)
  stop = stop_ids(model.config, tok)
  batched = generate_ids(model, ids, max_new_tokens=20, eos_ids=stop, pad_id=tok.pad_token_id)
  for prompt, got in zip(ids, batched):
    with torch.no_grad():
      out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                         eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id)
    assert got == out[0, len(prompt):].tolist()
    assert generate_ids(model, [prompt], max_new_tokens=20, eos_ids=stop,
                        pad_id=tok.pad_token_id) == [got]
  assert any(row[-1] in stop for row in batched)  # some row ends on its own, before 20 tokens
  assert "Paris" in tok.decode(batched[0])



@pytest.mark.parametrize("bad,match", [
    (dict(temperature=float("nan")), r"temperature=nan: expected a finite number"),
    (dict(temperature=float("inf")), r"temperature=inf"),
    (dict(top_p=float("nan")), r"top_p=nan"), (dict(top_p=1.5), r"top_p=1.5"),
    (dict(top_k=2.5), r"top_k=2.5")])
def test_non_finite_or_out_of_range_sampling_settings_are_refused(bad, match):
  # nan fails every comparison, so `temperature < 0` let it through and `nan > 0` then decoded
  # greedily; inf would sample uniformly (logits / inf = 0). Checked before any model work.
  with pytest.raises(FtjaxError, match=match):
    generate_ids(_model("llama"), PROMPTS, **{"max_new_tokens": 2, "temperature": 1.0, **bad})


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"),
                                        ("--top-p", "nan"), ("--temperature", "-0.5")])
def test_cli_refuses_non_finite_sampling_flags_before_loading(flag, value, capsys):
  from ftjax.generate import main
  # --model names nothing loadable: the flag check must fail first, with its own message.
  with pytest.raises(SystemExit) as exit_info:
    main(["--model", "/nonexistent/model", "--prompt", "hi", flag, value])
  assert exit_info.value.code != 0
  err = capsys.readouterr().err
  assert f"{flag}={value}" in err and "expected" in err, err


class _IdTokenizer:
  """The little of a tokenizer `answer_ids` uses: token ids decode to their numbers."""
  pad_token_id, eos_token_id, chat_template = 0, None, None

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(map(str, ids))


def test_eval_prompts_go_in_the_fewest_batches_memory_allows_with_the_same_answers(monkeypatch):
  """eval.batch_size 0: as many rows per generate_ids call as the memory budget holds: all 8
  prompts in one call when it holds them, 2 near-equal batches of 4 when it holds 5 rows; the
  answers are the same (padding is masked out; one by one equals batched in the tests above)."""
  from ftjax import generate as g
  from ftjax.evaluation import generation
  model = _model("llama")
  prompts = [p * k for p in PROMPTS for k in (1, 2)]  # 8 prompts of 1 to 14 tokens: one width
  longest = max(map(len, prompts))
  per_row = g.decode_bytes_per_row(model.config, longest, longest, 5)
  calls, real = [], generation.generate_ids

  def counting(model, prompts, *args, **kwargs):
    calls.append(len(prompts))
    return real(model, prompts, *args, **kwargs)
  monkeypatch.setattr(generation, "generate_ids", counting)
  answers = []
  for rows, sizes in ((100, [8]), (5, [4, 4])):
    monkeypatch.setattr(g, "memory_budget", lambda rows=rows: rows * per_row + per_row // 2)
    calls.clear()
    answers.append(generation.answer_ids(model, _IdTokenizer(), prompts, 5, 0, "auto"))
    assert calls == sizes
  assert answers[0] == answers[1] and all(answers[0])
  assert g.rows_per_batch(model, prompts, 5, budget=0) == 1  # never fewer than one row


def test_decode_memory_estimate_covers_the_kv_cache_twice():
  """The per-row estimate holds the KV cache of prompt + new tokens twice over (the prefill
  returns a new cache beside its input), whatever else it adds."""
  from ftjax.generate import decode_bytes_per_row
  model = _model("llama")
  cache = model.init_cache(1, 32 + 7)  # a 20-token prompt rounds up to a 32-wide bucket
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  assert decode_bytes_per_row(model.config, 20, 20, 7) >= 2 * cache_bytes
