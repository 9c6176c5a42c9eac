"""GGUF loading: tiny models written here the way llama.cpp's converter writes them, broken
files, and the real SmolLM2-135M-Instruct against transformers' own GGUF loader."""

import math
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
from ftjax.errors import FtjaxError
from ftjax.generate import generate, generate_ids
from ftjax import models
from ftjax.models.gguf import load_gguf

Q = gguf.GGMLQuantizationType

def _forward(cfg, params, ids):
  return models.from_params(cfg, params)(jnp.asarray(ids))

# HF module name -> GGUF tensor name (llama.cpp's standard names, spelled out independently
# of the loader, which reads gguf-py's table).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # a MoE router, [experts, d]
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Where an architecture differs: Gemma 2 / 3's four norms per layer, Phi-3's fused projections.
_ARCH_LAYER_NAMES = {
    "gemma2": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
}
_ARCH_LAYER_NAMES["gemma3"] = _ARCH_LAYER_NAMES["gemma2"]


def _gguf_name(hf_name: str, arch: str = "llama") -> str:
  module, suffix = hf_name.rsplit(".", 1)
  if module in _TOP_NAMES:
    return f"{_TOP_NAMES[module]}.{suffix}"
  _, _, i, rest = module.split(".", 3)
  return f"blk.{i}.{_ARCH_LAYER_NAMES.get(arch, {}).get(rest) or _LAYER_NAMES[rest]}.{suffix}"


def _permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> interleaved rows)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, arch, quant=None, rope_freqs=None, add_metadata=None,
               per_expert=False):
  """Writes an HF model as llama.cpp would: names, Q/K permutation (llama), gemma's norm + 1,
  no `output.weight` when tied. `quant` quantizes 2-D weights whose rows fit its block size;
  `add_metadata(writer)` adds more keys (e.g. a tokenizer); `per_expert`: MoE experts one
  tensor each, as llama.cpp's converter wrote Mixtral before 2024."""
  c = model.config
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters.get("full_attention", c.rope_parameters)["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  # phi3: only the rotated part; its converter writes no key / value length
  w.add_rope_dimension_count(int(head_dim * (getattr(c, "partial_rotary_factor", None) or 1.0)))
  if arch != "phi3":
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
  w.add_vocab_size(c.vocab_size)
  w.add_uint32("tokenizer.ggml.bos_token_id", 1)
  w.add_uint32("tokenizer.ggml.eos_token_id", 2)
  if add_metadata is not None:
    add_metadata(w)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
  tied = c.tie_word_embeddings
  for name, p in model.state_dict().items():
    if tied and name == "lm_head.weight":
      continue
    t = p.detach().numpy().astype(np.float32)
    if ".mlp.experts." in name:
      _add_experts(w, name, t, per_expert)
      continue
    if arch == "llama" and ".q_proj." in name:
      t = _permute(t, c.num_attention_heads)
    elif arch == "llama" and ".k_proj." in name:
      t = _permute(t, c.num_key_value_heads)
    if arch in ("gemma", "gemma2", "gemma3") and name.endswith("norm.weight"):
      t = t + 1
    if quant is not None and t.ndim == 2 and t.shape[1] % gguf.GGML_QUANT_SIZES[quant][0] == 0:
      w.add_tensor(_gguf_name(name, arch), gguf.quants.quantize(t, quant), raw_dtype=quant)
    else:
      w.add_tensor(_gguf_name(name, arch), t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _add_experts(w, name: str, t: np.ndarray, per_expert: bool) -> None:
  """transformers 5's fused expert params as convert_hf_to_gguf stores a layer's experts:
  gate_up_proj [e, 2f, d] (gate rows first) -> ffn_gate_exps / ffn_up_exps [e, f, d],
  down_proj [e, d, f] -> ffn_down_exps (or, `per_expert`, blk.N.ffn_gate.E.weight etc.)."""
  layer = name.split(".")[2]
  if name.endswith("gate_up_proj"):
    gate, up = np.split(t, 2, axis=1)
    stacks = {"ffn_gate": gate, "ffn_up": up}
  else:
    assert name.endswith("down_proj"), name
    stacks = {"ffn_down": t}
  for kind, x in stacks.items():
    if per_expert:
      for j, expert in enumerate(x):
        w.add_tensor(f"blk.{layer}.{kind}.{j}.weight", np.ascontiguousarray(expert))
    else:
      w.add_tensor(f"blk.{layer}.{kind}_exps.weight", np.ascontiguousarray(x))


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


IDS = np.array([[3, 17, 99, 4, 56, 21, 8, 120, 77, 1, 64, 30]])


def _ours(path):
  cfg, params = load_gguf(path)
  return cfg, np.asarray(_forward(cfg, params, IDS))


def _hf_logits(model, ids=IDS):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


# --- tiny models --------------------------------------------------------------------------

def test_q8_0_llama_matches_transformers_gguf_loader(tmp_path):
  """Same quantized bytes through both loaders; Q/K unpermuted, untied head."""
  path = write_gguf(hf_models.build("llama"), str(tmp_path / "tiny.gguf"), "llama", quant=Q.Q8_0)
  assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {Q.F32, Q.Q8_0}
  cfg, ours = _ours(path)
  assert not cfg.tie_word_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
  assert _rel(ours, _hf_logits(ref_model)) < 1e-4


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                          ("gemma", "gemma")])
def test_f32_gguf_matches_original_hf_model(tmp_path, family, arch):
  """Lossless F32 files: every family's mapping and fix-ups give back the HF model."""
  model = hf_models.build(family)
  path = write_gguf(model, str(tmp_path / f"{family}.gguf"), arch)
  cfg, ours = _ours(path)
  assert cfg.model_type == arch and cfg.tie_word_embeddings == model.config.tie_word_embeddings
  assert _rel(ours, _hf_logits(model)) < 1e-4


# The tiny gemma2 / gemma3 configs with what llama.cpp does not read from a file set as it derives
# or defaults it (as in the released models): query_pre_attn_scalar = head_dim, every 6th Gemma 3
# layer global, local RoPE base 10000. Soft-caps, windows, partial rotary stay as FAMILIES has them.
def _gemma2_llama_cpp_layout(family_config=hf_models.FAMILIES["gemma2"]):
  config = family_config()
  config.query_pre_attn_scalar = config.head_dim
  return config


_LLAMA_CPP_LAYOUT = {
    "gemma2": _gemma2_llama_cpp_layout,
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**hf_models.COMMON, "num_hidden_layers": 6}, head_dim=16, sliding_window=4,
        query_pre_attn_scalar=16,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "phi3": hf_models.FAMILIES["phi3"],
}


def _converter_keys(arch: str, c):
  """The keys convert_hf_to_gguf.py's Gemma2Model / Gemma3Model / Phi3MiniModel add beyond
  write_gguf's (spelled out here, independently of ftjax's writer)."""
  def add(w):
    if arch == "gemma2":
      w.add_attn_logit_softcapping(c.attn_logit_softcapping)
      w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma3":
      w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      w.add_rope_scaling_factor(c.rope_parameters["full_attention"]["factor"])
    if arch == "phi3":
      w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
    w.add_sliding_window(c.sliding_window)
  return add


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_converter_style_gguf_of_new_families_matches_hf_model(tmp_path, monkeypatch, family):
  """Files with only the keys llama.cpp's converter writes (no layer pattern, no local RoPE
  base: llama.cpp's defaults) load with the HF model's logits: soft-caps, windows shorter than
  the sequence, Gemma's 1 + w norms, Phi-3's fused qkv / gate_up and partial rotary."""
  monkeypatch.setitem(hf_models.FAMILIES, family, _LLAMA_CPP_LAYOUT[family])
  model = hf_models.build(family)
  c = model.config
  path = write_gguf(model, str(tmp_path / f"{family}.gguf"), family, add_metadata=_converter_keys(family, c))
  cfg, ours = _ours(path)
  assert cfg.model_type == {"gemma3": "gemma3_text"}.get(family, family)
  assert cfg.sliding_window == c.sliding_window < IDS.shape[1]
  assert _rel(ours, _hf_logits(model)) < 1e-4


def _moe_keys(arch: str, c, expert_width: bool = True):
  """The expert keys TextModel / Qwen2MoeModel.set_gguf_parameters write (spelled out here)."""
  def add(w):
    w.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3moe" and expert_width:
      w.add_expert_feed_forward_length(c.moe_intermediate_size)
  return add


@pytest.mark.parametrize("family, arch", [("mixtral", "llama"), ("qwen3_moe", "qwen3moe")])
def test_converter_style_moe_gguf_matches_hf_model(tmp_path, family, arch):
  """Mixtral (a llama file with experts) and Qwen3-MoE as convert_hf_to_gguf writes them load
  with the HF model's logits: router, stacked experts, top-2 re-normalised (llama.cpp's rule,
  hence norm_topk_prob on), and qwen3moe's expert width (32) read from
  expert_feed_forward_length, not from feed_forward_length (HF's dense width, 96)."""
  model = hf_models.build_moe(family, **({"norm_topk_prob": True} if family == "qwen3_moe" else {}))
  c = model.config
  path = write_gguf(model, str(tmp_path / f"{family}.gguf"), arch, add_metadata=_moe_keys(arch, c))
  cfg, ours = _ours(path)
  assert (cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size,
          cfg.norm_topk_prob) == (family, 4, 2, 32, True)
  assert _rel(ours, _hf_logits(model)) < 1e-4
  if arch == "llama":  # a pre-2024 Mixtral file: one tensor per expert, named in the error
    old = write_gguf(model, str(tmp_path / "old.gguf"), arch, add_metadata=_moe_keys(arch, c),
                     per_expert=True)
    with pytest.raises(FtjaxError, match=r"old.gguf: unexpected tensor 'blk.0.ffn_gate.0.weight'.*"
                                         r"one tensor per expert.*re-convert"):
      load_gguf(old)
  if arch == "qwen3moe":
    bad = write_gguf(model, str(tmp_path / "no_width.gguf"), arch,
                     add_metadata=_moe_keys(arch, c, expert_width=False))
    with pytest.raises(FtjaxError, match="no_width.gguf: missing GGUF metadata key "
                                         "'qwen3moe.expert_feed_forward_length'"):
      load_gguf(bad)


def _llama3_factors(inv_freq, factor=8.0, low=1.0, high=4.0, old=8192):
  """llama.cpp LlamaModel.generate_extra_tensors: the divisor per frequency."""
  out = []
  for freq in inv_freq:
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def test_llama3_rope_freqs_tensor(tmp_path):
  torch.manual_seed(0)
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  config = transformers.LlamaConfig(**hf_models.COMMON, rope_parameters=rope)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  h = config.hidden_size // config.num_attention_heads
  factors = _llama3_factors(1.0 / (500000.0 ** (np.arange(0, h, 2) / h)))
  assert len(set(factors.tolist())) == 3  # all three branches present
  path = write_gguf(model, str(tmp_path / "l3.gguf"), "llama", rope_freqs=factors)
  cfg, ours = _ours(path)
  assert dict(cfg.rope_scaling)["rope_type"] == "llama3"
  # Positions past the original context exercise the scaling.
  ids = (np.arange(300)[None] * 7) % config.vocab_size
  cfg, params = load_gguf(path)
  ours = _forward(cfg, params, ids)
  assert _rel(ours, _hf_logits(model, ids)) < 1e-4

  bad = str(tmp_path / "bad.gguf")
  write_gguf(model, bad, "llama", rope_freqs=factors * 1.5)
  with pytest.raises(FtjaxError, match="rope_freqs"):
    load_gguf(bad)


# --- broken files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  return write_gguf(hf_models.build("llama"), path, "llama", quant=Q.Q8_0)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01, 20 / 1e9])
def test_truncated_file_is_an_error_naming_it(tmp_path, tiny_gguf, keep):
  data = open(tiny_gguf, "rb").read()
  path = str(tmp_path / "cut.gguf")
  with open(path, "wb") as f:
    f.write(data[:max(1, int(len(data) * keep))])
  with pytest.raises(FtjaxError, match="cut.gguf"):
    load_gguf(path)


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / "junk.gguf"
  path.write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(FtjaxError, match="junk.gguf: not a readable GGUF"):
    load_gguf(str(path))
  with pytest.raises(FtjaxError, match="no such file"):
    load_gguf(str(tmp_path / "absent.gguf"))


def test_unsupported_architecture(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "falcon")
  w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(FtjaxError, match=r"architecture='falcon'; supported: llama, qwen2, qwen3, "
                                       r"gemma, gemma2, gemma3, phi3, qwen3moe$"):
    load_gguf(str(tmp_path / "f.gguf"))


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, tiny_gguf):
  src = gguf.GGUFReader(tiny_gguf)
  path = str(tmp_path / "q81.gguf")
  w = gguf.GGUFWriter(path, "llama")
  for key, field in src.fields.items():
    if not key.startswith("GGUF.") and key != "general.architecture":
      w.add_key_value(key, field.contents(), field.types[0],
                      field.types[-1] if len(field.types) > 1 else None)
  for t in src.tensors:
    if t.name == "blk.1.ffn_up.weight":  # Q8_1: a type gguf-py cannot dequantize
      block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
      rows, cols = t.data.shape[0], int(t.shape[0])
      w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=Q.Q8_1)
    else:
      w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(FtjaxError, match=r"q81.gguf: tensor 'blk.1.ffn_up.weight' has type Q8_1"):
    load_gguf(path)


# --- the real SmolLM2-135M-Instruct -------------------------------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def smol():
  from ftjax.models.resolve import builtin_path
  from ftjax.tokenizer import load_tokenizer
  try:
    path = builtin_path("smollm2-135m-instruct")
  except FtjaxError as e:
    pytest.skip(f"SmolLM2 GGUF not available: no network/pip and no FTJAX_CACHE copy ({e})")
  cfg, params = load_gguf(path)
  model = models.from_params(cfg, params)
  # torch's OpenMP threads spin against XLA's on a small shared CPU: a 5-token forward took
  # ~1-2 s with 2 threads and 0.12 s with one. The reference's speed is not under test.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  yield cfg, model, load_tokenizer(path), ref
  torch.set_num_threads(threads)


def test_smollm2_config(smol):
  cfg = smol[0]
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
  assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings and cfg.eos_token_id == 2


def test_smollm2_logits_match_transformers(smol):
  cfg, model, tok, ref = smol
  for prompt in PROMPTS[:2]:
    ids = np.array([tok.encode(prompt)])
    ours = model(jnp.asarray(ids))
    assert _rel(ours, _hf_logits(ref, ids)) < 1e-4, prompt


def test_smollm2_greedy_matches_transformers_generate(smol):
  cfg, model, tok, ref = smol
  ids = [tok.encode(p) for p in PROMPTS]
  ours = generate_ids(model, ids, max_new_tokens=20, pad_id=tok.pad_token_id)
  # One left-padded batch for transformers too: 20 steps instead of 60 keeps this test short.
  width = max(map(len, ids))
  batch = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ids])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
  with torch.no_grad():
    out = ref.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=20,
                       pad_token_id=tok.pad_token_id)
  for got, row in zip(ours, out[:, width:].tolist()):
    want = row[:row.index(cfg.eos_token_id) + 1] if cfg.eos_token_id in row else row
    assert got == want


def test_smollm2_answers_paris(smol):
  _, model, tok, _ = smol
  [answer] = generate(model, tok, ["What is the capital of France?"], max_new_tokens=20)
  assert "Paris" in answer


def test_smollm2_tokenizer_and_chat_template_match_transformers(smol):
  from ftjax.models.resolve import builtin_path
  path = builtin_path("smollm2-135m-instruct")
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  tok = smol[2]
  texts = PROMPTS + ["  leading spaces\nand\ttabs", "émigré naïve – 東京 🚀", "12345.678 + x_y",
                     "<|im_start|>user\nhi<|im_end|>"]
  for text in texts:
    assert tok.encode(text) == ref.encode(text), text
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
  for messages in (chat, chat[1:]):  # the template adds a default system prompt to the second
    ours = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.encode(ours, add_special_tokens=False) == ref.encode(ours, add_special_tokens=False)
