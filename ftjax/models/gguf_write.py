"""GGUF files (llama.cpp / Ollama / LM Studio) out: the merged model, its tokenizer and template.

    ftjax.models.save_gguf(model, "out/model.gguf", tokenizer, type="q8_0")

Metadata keys, tensor names and quantisation all come from the installed `gguf` package (its
GGUFWriter, name table and `gguf.quants`), so nothing here spells a llama.cpp string by hand.
The layout is what llama.cpp's convert_hf_to_gguf.py writes for the same HF checkpoint: q/k rows
permuted for the llama architecture, gemma's norms stored as (1 + w), no `output.weight` when
the head is tied, 1-D tensors (norms, biases) kept in F32; Gemma 2 / 3's soft-caps, window
and layer pattern and Phi-3's partial rotary, window and longrope factors as its Gemma2Model /
Gemma3Model / Phi3MiniModel write them; Mixtral's and Qwen3-MoE's experts stacked per layer
with the router kept in F32, as its LlamaModel / Qwen3MoeModel write them. ftjax.models.gguf
reads these files back by inverting exactly those steps.
"""

from __future__ import annotations

import json
import math
import os
import re

import gguf
import jax
import numpy as np
from flax import nnx

from ftjax import tokenizer as tok_lib
from ftjax.errors import FtjaxError
from ftjax.models.gguf import NORM_PLUS_ONE, gguf_names, llama_cpp_query_pre_attn_scalar
from ftjax.models.params import param_specs
from ftjax.tree import flatten, get_path

Q = gguf.GGMLQuantizationType

# --gguf TYPE -> (tensor type of the 2-D weights, general.file_type). q4_k_m / q5_k_m are not
# offered: gguf-py has no quantize() for the K-quants, and a re-implementation could not be
# checked to match llama.cpp's quantizer byte for byte (use llama.cpp's llama-quantize on an f16
# export for those).
TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

# ftjax model_type -> llama.cpp architecture (Mistral and Mixtral are written as llama, as
# convert_hf_to_gguf does; their sliding window is not recorded, so llama.cpp attends to the
# whole context; Mixtral's experts under llama.expert_count).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
             "mixtral": "llama", "qwen3_moe": "qwen3moe"}


def check_type(type: str) -> None:  # noqa: A002
  if type not in TYPES:
    raise FtjaxError(f"GGUF type {type!r} is not supported; choose one of {', '.join(TYPES)} "
                     "(for q4_k_m / q5_k_m, run llama.cpp's llama-quantize on an f16 export)")


def save_gguf(model, path: str, tokenizer, type: str = "f16", name: str | None = None) -> dict:  # noqa: A002
  """Writes a float `model` without adapters with `tokenizer`'s vocabulary, special ids and chat
  template as one GGUF file at `path`, atomically (a temporary file renamed when complete).
  Returns {"path", "bytes", "type", "eot_token"} for the caller. ftjax.models.save_gguf is the
  entry point for a trained model: it folds adapters in and dequantises a 4-bit base first
  (models/ never imports peft/: docs/design.md, "Layers")."""
  check_type(type)
  cfg = model.config
  expected = {s.path for s in param_specs(cfg)}
  extra = sorted(p for p, _ in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
                 if p not in expected)
  if extra:
    raise FtjaxError(f"save_gguf: the model has params a plain {cfg.model_type} model lacks (e.g. "
                     f"{extra[0]}): adapters or a 4-bit base. ftjax.models.save_gguf folds "
                     "adapters in and dequantises first")
  if cfg.model_type not in GGUF_ARCH:
    raise FtjaxError(f"save_gguf: model_type {cfg.model_type!r} has no llama.cpp architecture; "
                     f"supported: {', '.join(GGUF_ARCH)}")
  arch = GGUF_ARCH[cfg.model_type]
  tmp = path + ".partial"
  writer = gguf.GGUFWriter(tmp, arch)
  try:
    _add_model_metadata(writer, cfg, type, name or os.path.splitext(os.path.basename(path))[0])
    eot = _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    _add_tensors(writer, model, cfg, arch, TYPES[type][0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return {"path": path, "bytes": os.path.getsize(path), "type": type, "eot_token": eot}


# -- model -----------------------------------------------------------------------------------------

def _add_model_metadata(w: gguf.GGUFWriter, cfg, type_name: str, name: str) -> None:
  w.add_name(name)
  w.add_file_type(TYPES[type_name][1])
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_block_count(cfg.num_layers)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.rotary_dim)  # phi3: the rotated part of each head only
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  _add_rope_scaling(w, cfg)
  if cfg.model_type in ("gemma2", "gemma3_text"):
    _add_gemma2_metadata(w, cfg)
  if cfg.is_moe:
    _add_moe_metadata(w, cfg)
  if cfg.model_type == "phi3":
    # convert_hf_to_gguf writes 0 for "no window" (how llama.cpp tells Phi-4 from Phi-3)
    w.add_sliding_window(int(cfg.sliding_window or 0))


def _add_moe_metadata(w: gguf.GGUFWriter, cfg) -> None:
  """TextModel / Qwen2MoeModel.set_gguf_parameters' expert keys: the count, the top-k and
  (qwen3moe) the experts' width. llama.cpp always re-normalises the top-k router weights of
  both architectures (build_moe_ffn's norm_w, with no GGUF key to turn it off), so a Qwen3-MoE
  with norm_topk_prob off would give other logits there and is refused."""
  if not cfg.norm_topk_prob:
    raise FtjaxError(f"save_gguf: {cfg.model_type} has norm_topk_prob=False, but llama.cpp always "
                     "re-normalises the top-k router weights and GGUF has no key for it: the file "
                     "would give other logits")
  w.add_expert_count(cfg.num_experts)
  w.add_expert_used_count(cfg.num_experts_per_tok)
  if cfg.model_type == "qwen3_moe":
    w.add_expert_feed_forward_length(cfg.intermediate_size)


def _add_rope_scaling(w: gguf.GGUFWriter, cfg) -> None:
  scaling = dict(cfg.rope_scaling)
  kind = scaling.get("rope_type")
  if kind == "linear":  # gemma3: llama.cpp applies it to the global layers only, as HF does
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(scaling["factor"]))
  elif kind == "llama3":  # llama.cpp carries it as a per-frequency divisor tensor
    w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(cfg, scaling))
  elif kind == "longrope" and cfg.model_type == "phi3":
    _add_longrope(w, cfg, scaling)
  elif kind:
    raise FtjaxError(f"save_gguf: rope scaling {kind!r} has no GGUF form here (linear, llama3, "
                     "and phi3's longrope do)")
  if cfg.model_type == "phi3":
    w.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings",
                                                    cfg.max_position_embeddings)))


def _add_longrope(w: gguf.GGUFWriter, cfg, scaling: dict) -> None:
  """Phi3MiniModel.generate_extra_tensors: the long / short per-frequency factors as tensors,
  and the attention factor, which llama.cpp derives from max / original context (HF from
  `factor` or `attention_factor` when given: a value llama.cpp would not use is refused)."""
  orig = int(scaling["original_max_position_embeddings"])
  attn = _longrope_attention_factor(cfg.max_position_embeddings / orig, orig)
  ours = scaling.get("attention_factor") or _longrope_attention_factor(
      scaling.get("factor") or cfg.max_position_embeddings / orig, orig)
  if abs(ours - attn) > 1e-6:
    raise FtjaxError(f"save_gguf: longrope attention factor {ours} differs from {attn}, the one "
                     "llama.cpp derives from max_position_embeddings / original context")
  w.add_rope_scaling_attn_factors(attn)
  for key, kind in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                    ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
    factors = np.asarray(scaling[key], np.float32)
    if factors.shape != (cfg.rotary_dim // 2,):
      raise FtjaxError(f"save_gguf: longrope {key} has {factors.size} values, expected "
                       f"{cfg.rotary_dim // 2} (half the rotary dims)")
    w.add_tensor(gguf.TENSOR_NAMES[kind] + ".weight", factors)


def _longrope_attention_factor(factor: float, orig: int) -> float:
  return math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0


def _add_gemma2_metadata(w: gguf.GGUFWriter, cfg) -> None:
  """Gemma2Model / Gemma3Model.set_gguf_parameters' keys, plus the layer pattern and the local
  RoPE base (gguf-py keys llama.cpp's defaults stand in for when absent: every 2nd / 6th layer
  global, base 10000), so a layout other than the released models' is not lost."""
  expected = llama_cpp_query_pre_attn_scalar(cfg.model_type, cfg.num_layers, cfg.hidden_size,
                                              cfg.num_heads, cfg.head_dim)
  if cfg.query_pre_attn_scalar != expected:
    raise FtjaxError(f"save_gguf: query_pre_attn_scalar={cfg.query_pre_attn_scalar:g}, but llama.cpp "
                     f"derives {expected:g} for this {cfg.model_type} size and GGUF has no key "
                     "for it: the file would give other logits")
  if cfg.attn_logit_softcap:
    w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
  if cfg.final_logit_softcap:
    w.add_final_logit_softcapping(cfg.final_logit_softcap)
  if cfg.sliding_window:
    w.add_sliding_window(int(cfg.sliding_window))
  w.add_sliding_window_pattern(list(cfg.layer_is_local()))
  if cfg.model_type == "gemma3_text":
    w.add_rope_freq_base_swa(float(cfg.rope_local_theta))


def _llama3_rope_freqs(cfg, s: dict) -> np.ndarray:
  """llama.cpp's LlamaModel.generate_extra_tensors: the divisor of each RoPE frequency."""
  h = cfg.head_dim
  freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
  old, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"],
                            s["high_freq_factor"], s["factor"])
  wavelen = 2 * math.pi / freqs
  smooth = (old / wavelen - low) / (high - low)
  return np.where(wavelen < old / high, 1.0,
                  np.where(wavelen > old / low, factor,
                           1 / ((1 - smooth) / factor + smooth))).astype(np.float32)


def _permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's LlamaModel.permute: each head's rows from HF's rotate-half pairs (i, i + h/2)
  to interleaved pairs (2i, 2i + 1); ftjax.models.gguf._unpermute_qk is its inverse."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_layout(name: str, w: np.ndarray, spec, cfg, arch: str) -> np.ndarray:
  """A param as llama.cpp stores it: HF's [out, in] layout (a MoE projection [experts, out, in],
  HF's per-expert weights stacked) plus the architecture's fix-ups."""
  if spec.transpose:
    w = np.swapaxes(w, -1, -2)
  if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
    w = _permute_qk(w, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
  if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
    w = w + 1  # convert_hf_to_gguf stores gemma's RMSNorm scale as (1 + w)
  return np.ascontiguousarray(w, np.float32)


# Tensors convert_hf_to_gguf keeps in F32 whatever the type (its prepare_tensors' "always in
# float32" list, which follows llama.cpp's quantizer): here the MoE router, ffn_gate_inp.
_ALWAYS_F32 = re.compile(re.escape(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP] + ".weight")
                         .replace(re.escape("{bid}"), r"\d+"))


def _encode_tensor(name: str, w: np.ndarray, qtype) -> tuple[np.ndarray, object]:
  """(data, raw_dtype) for GGUFWriter.add_tensor. As convert_hf_to_gguf: 1-D tensors and the
  router stay F32; a tensor whose rows do not fill whole quantisation blocks falls back to F16."""
  if w.ndim < 2 or qtype == Q.F32 or _ALWAYS_F32.fullmatch(name):
    return w, None
  if qtype == Q.F16:
    return w.astype(np.float16), None
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  if w.shape[-1] % block:
    return w.astype(np.float16), None
  return gguf.quants.quantize(w, qtype), qtype


def _add_tensors(w: gguf.GGUFWriter, model, cfg, arch: str, qtype) -> None:
  """Every param under its llama.cpp name, one (layer) tensor on the host at a time."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for name, (spec, layer) in gguf_names(cfg, arch).items():
    leaf = get_path(params, spec.path)
    value = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]), np.float32)
    data, raw = _encode_tensor(name, _hf_layout(name, value, spec, cfg, arch), qtype)
    if raw is None:
      w.add_tensor(name, data)
    else:
      w.add_tensor(name, data, raw_dtype=raw)


# -- tokenizer -------------------------------------------------------------------------------------

# A byte-level BPE's split regex (ftjax.tokenizer's table, the one its GGUF reader uses) ->
# the tokenizer.ggml.pre name llama.cpp knows it by.
_PRE_NAMES = {"_LLAMA3_SPLIT": "llama-bpe", "_QWEN2_SPLIT": "qwen2", "_TEKKEN_SPLIT": "tekken",
              "_GPT4O_SPLIT": "gpt-4o", "_QWEN35_SPLIT": "qwen35"}


def _pre_tokenizer_name(pre: dict | None) -> str:
  """tokenizer.ggml.pre for a tokenizer.json pre_tokenizer, or a clear error: a wrong name
  would make llama.cpp split text differently, i.e. give other token ids, silently."""
  parts = pre.get("pretokenizers", [pre]) if pre else []
  kinds = [p.get("type") for p in parts]
  if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
    return "gpt-2"
  if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") \
      and parts[1].get("use_regex", True):
    return "smollm"  # SmolLM2: digits one by one, then GPT-2's split
  if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
    regex = parts[0].get("pattern", {}).get("Regex")
    for attr, name in _PRE_NAMES.items():
      if regex == getattr(tok_lib, attr):
        return name
  raise FtjaxError(f"save_gguf: the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) matches "
                   "none llama.cpp knows (gpt-2, smollm, llama-bpe, qwen2, tekken, gpt-4o, qwen35)")


def _vocab_tables(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
  """Tokens and llama.cpp token types for ids 0..n_vocab-1: added special tokens are CONTROL,
  other added tokens USER_DEFINED (stored as text), ids the tokenizer lacks `[PAD{i}]` UNUSED
  (as convert_hf_to_gguf pads a vocabulary to the embedding's rows)."""
  backend = tokenizer.backend
  vocab = backend.get_vocab(with_added_tokens=False)
  added = backend.get_added_tokens_decoder()
  if tokenizer.vocab_size > n_vocab:
    raise FtjaxError(f"save_gguf: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                     f"embedding only {n_vocab} rows")
  tokens = [f"[PAD{i}]" for i in range(n_vocab)]
  types = [int(gguf.TokenType.UNUSED)] * n_vocab
  for token, i in vocab.items():
    tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
  for i, token in added.items():
    tokens[i] = token.content
    types[i] = int(gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED)
  return tokens, types


def _add_sentencepiece_vocab(w: gguf.GGUFWriter, tokenizer, spec: dict, n_vocab: int) -> None:
  """tokenizer.ggml.model "llama" (llama.cpp's SentencePiece tokenizer): tokens, scores and
  token types as convert_hf_to_gguf writes them from a tokenizer.model, plus the merges (as its
  Llama-HF path writes them) so that readers rebuilding a BPE from the file need not guess them.

  llama.cpp's SentencePiece tokenizer repeatedly joins the adjacent pair whose joined text is the
  highest-scoring token; a BPE applies its merges in rank order. A token's score here is minus
  the rank of the first merge that makes it, so both join in the same order (a .model file's own
  scores are in that order too: transformers ranks the merges by them). Tokens no merge makes
  (characters, bytes, control and user-defined tokens) score 0, as in a .model file."""
  tokens, types = _vocab_tables(tokenizer, n_vocab)
  unk = tokenizer._id("unk_token")
  for i, token in enumerate(tokens):
    if i == unk:
      types[i] = int(gguf.TokenType.UNKNOWN)
    elif types[i] == gguf.TokenType.NORMAL and _BYTE_PIECE.fullmatch(token):
      types[i] = int(gguf.TokenType.BYTE)
  scores = [0.0] * n_vocab
  ids = {t: i for i, t in enumerate(tokens)}
  made = set()
  for rank, merge in enumerate(_merge_list(spec)):
    token = merge.replace(" ", "", 1)
    if token in ids and token not in made:
      made.add(token)
      scores[ids[token]] = -float(rank + 1)
  for i, kind in enumerate(types):
    if kind == gguf.TokenType.UNUSED:
      scores[i] = -1000.0  # convert_hf_to_gguf's score of a [PADi] filler
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_add_space_prefix(_adds_space_prefix(spec))


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _adds_space_prefix(spec: dict) -> bool:
  """Whether the tokenizer puts "▁" before the text (SentencePiece's add_dummy_prefix:
  Llama 2 does, Gemma does not): a Metaspace pre-tokenizer that prepends, or a normalizer that
  prepends "▁" (transformers' Llama converter)."""
  def walk(node):
    if isinstance(node, dict):
      yield node
      for key in ("pretokenizers", "normalizers"):
        for child in node.get(key) or []:
          yield from walk(child)
  for node in walk(spec.get("pre_tokenizer")):
    if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
      return True
  return any(n.get("type") == "Prepend" and n.get("prepend") == "▁"
             for n in walk(spec.get("normalizer")))


def _end_of_turn(tokenizer) -> str | None:
  """The special token the chat template closes an assistant turn with (<|im_end|>,
  <|eot_id|>, <end_of_turn>), found by rendering a turn; None without a template."""
  if not tokenizer.chat_template:
    return None
  marker = "\u2063ftjax-end\u2063"
  try:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": marker}])
  except Exception:  # noqa: BLE001 - a template that refuses this conversation: no stop id found
    return None
  tail = text.split(marker, 1)[-1]
  specials = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
  for i in tokenizer.encode(tail, add_special_tokens=False):
    token = tokenizer.backend.id_to_token(i)
    if token in specials:
      return token
  return tokenizer.eos_token


def _is_byte_level(spec: dict) -> bool:
  return spec.get("model", {}).get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel"


def _decoders(spec: dict) -> list[dict]:
  decoder = spec.get("decoder") or {}
  return decoder.get("decoders", [decoder])


def _is_sentencepiece_bpe(spec: dict) -> bool:
  """A SentencePiece BPE vocabulary (Llama 2, Mistral v1, Gemma), as ftjax.tokenizer builds it
  from a tokenizer.model or transformers' converter writes it to tokenizer.json: byte-fallback
  BPE whose decoder turns "▁" back into spaces."""
  model = spec.get("model", {})
  return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and any(
      d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁"
      for d in _decoders(spec))


def _merge_list(spec: dict) -> list[str]:
  return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer, n_vocab: int) -> str | None:
  """tokenizer.ggml.* and the chat template; returns the end-of-turn token."""
  spec = json.loads(tokenizer.backend.to_str())
  if _is_byte_level(spec):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    tokens, types = _vocab_tables(tokenizer, n_vocab)
    w.add_token_list(tokens)
    w.add_token_types(types)
  elif _is_sentencepiece_bpe(spec):
    _add_sentencepiece_vocab(w, tokenizer, spec, n_vocab)
  else:
    model = spec.get("model", {})
    raise FtjaxError("save_gguf: the tokenizer is neither byte-level BPE (GPT-2 style: SmolLM, "
                     "Llama 3, Qwen) nor SentencePiece byte-fallback BPE (Llama 2, Mistral v1, "
                     f"Gemma); it is {model.get('type')} with a "
                     f"{(spec.get('decoder') or {}).get('type')} decoder (a SentencePiece "
                     "unigram vocabulary would be read back from GGUF as a BPE: other ids)")
  w.add_token_merges(_merge_list(spec))
  ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
         "pad": tokenizer._id("pad_token"), "unk": tokenizer._id("unk_token")}
  for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                   ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
    if ids[key] is not None:
      add(ids[key])
  w.add_add_bos_token(bool(tokenizer.add_bos_token))
  w.add_add_eos_token(bool(tokenizer.add_eos_token))
  eot = _end_of_turn(tokenizer)
  if eot is not None:
    w.add_eot_token_id(tokenizer.token_to_id(eot))
  template = tokenizer.chat_template
  if isinstance(template, dict):
    w.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
  elif template:
    w.add_chat_template(template)
  return eot


# -- Ollama ----------------------------------------------------------------------------------------

# Ollama's own Go templates for the chat formats a jinja template can be recognised by (its
# template library's chatml / llama3-instruct / gemma-instruct); Ollama prepends the Modelfile's
# SYSTEM as a system message when a request has none.
_OLLAMA_TEMPLATES = {
    "<|im_start|>": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                     "{{ end }}<|im_start|>assistant\n"),
    "<|start_header_id|>": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>"
                            "\n\n{{ .Content }}<|eot_id|>{{ end }}"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "<start_of_turn>": ("{{- range .Messages }}<start_of_turn>"
                        "{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
                        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"),
}


def _default_system(tokenizer) -> str | None:
  """The system prompt a ChatML template inserts when a conversation has none (SmolLM2's)."""
  try:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
  except Exception:  # noqa: BLE001
    return None
  head = "<|im_start|>system\n"
  return text[len(head):text.index("<|im_end|>")] if text.startswith(head) else None


def write_modelfile(gguf_path: str, tokenizer, eot_token: str | None) -> str:
  """An Ollama `Modelfile` beside the GGUF file: FROM it, the chat format as a Go TEMPLATE when
  the jinja template is a known one (else Ollama falls back to the file's own
  tokenizer.chat_template), and a `PARAMETER stop` per end token. Returns its path."""
  template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
  lines = [f"FROM ./{os.path.basename(gguf_path)}"]
  go = next((t for marker, t in _OLLAMA_TEMPLATES.items() if template and marker in template), None)
  if go is not None:
    lines.append(f'TEMPLATE """{go}"""')
    system = _default_system(tokenizer) if go is _OLLAMA_TEMPLATES["<|im_start|>"] else None
    if system:
      lines.append(f'SYSTEM """{system}"""')
  elif template:
    lines.append("# No TEMPLATE: this chat format has no known Go form; Ollama uses the GGUF "
                 "file's tokenizer.chat_template.")
  for stop in dict.fromkeys(t for t in (eot_token, tokenizer.eos_token) if t):
    lines.append(f"PARAMETER stop {json.dumps(stop)}")
  path = os.path.join(os.path.dirname(os.path.abspath(gguf_path)), "Modelfile")
  with open(path + ".partial", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".partial", path)
  return path
