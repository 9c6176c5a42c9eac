"""GGUF files (llama.cpp's format) in: metadata -> ModelConfig, tensors dequantized -> params.

Tensors stream one at a time from the memory-mapped file into preallocated, layer-stacked host
arrays, so peak host memory is the params plus one dequantized tensor. GGUF tensor names are
found from the HF names in `param_specs` through gguf-py's own name table, so the mapping has
no second copy here.
"""

from __future__ import annotations

import math
import os
import re

import gguf
import numpy as np

from ftjax.errors import FtjaxError
from ftjax.models.config import ModelConfig
from ftjax.models.params import param_specs
from ftjax.tree import Params, get_path, set_path
from ftjax.tokenizer import read_gguf_metadata

# GGUF general.architecture -> ftjax model_type. llama.cpp writes Mistral checkpoints as
# "llama" (same decoder; the sliding window is not recorded in the file), and Mixtral too: a
# "llama" file with {arch}.expert_count experts is read as mixtral.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                 "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "qwen3moe": "qwen3_moe"}

# The router's load-balancing loss weight is a training setting GGUF has no key for: a MoE
# model read from GGUF gets transformers' MixtralConfig / Qwen3MoeConfig default (0.001), as
# transformers' own GGUF reader gives it.
_GGUF_ROUTER_AUX_LOSS_COEF = 0.001

# Architectures whose RMSNorm scales convert_hf_to_gguf stores as (1 + w) (HF keeps w).
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3")

# Tensors that carry no weights of ours: RoPE tables, read into the config below.
_IGNORED_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def llama_cpp_query_pre_attn_scalar(model_type: str, layers: int, hidden: int, heads: int,
                                    head_dim: int) -> float:
  """The query_pre_attn_scalar llama.cpp uses for Gemma 2 / 3. No GGUF key holds it: llama.cpp
  derives it from the model size, hidden_size / heads for the 27B models (recognised by their
  layer count, 46 for Gemma 2 and 62 for Gemma 3) and head_dim for every other size (as the
  released configs have it)."""
  big = {"gemma2": 46, "gemma3_text": 62}.get(model_type) == layers
  return float(hidden // heads if big else head_dim)


def open_gguf(path: str):
  """A gguf.GGUFReader, with every way a file can be broken turned into one FtjaxError."""
  if not os.path.isfile(path):
    raise FtjaxError(f"{path}: no such file")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 - the reader raises whatever numpy hits on bad bytes
    raise FtjaxError(f"{path}: not a readable GGUF file, truncated or corrupt "
                     f"({type(e).__name__}: {e})") from None
  size = os.path.getsize(path)
  for t in reader.tensors:
    # A file cut inside the last tensor can still parse: memmap views stop at the end of file.
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise FtjaxError(f"{path}: tensor {t.name!r} runs past the end of the file "
                       f"({size} bytes): the file is truncated")
  return reader


def _llama3_scaling(factors: np.ndarray, cfg_kw: dict, path: str) -> dict:
  """Recovers HF's llama3 rope_scaling from llama.cpp's per-frequency `rope_freqs` tensor.

  The file stores only the resulting divisors, not the four parameters; every Llama 3.1/3.2/3.3
  release uses low=1, high=4, original context 8192, so those are checked against the tensor
  rather than guessed silently.
  """
  factors = np.asarray(factors, np.float64).reshape(-1)
  if np.allclose(factors, 1.0):
    return {}
  h = cfg_kw["head_dim"]
  freqs = 1.0 / (cfg_kw["rope_theta"] ** (np.arange(0, h, 2) / h))
  scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  wavelen = 2 * math.pi / freqs
  old, low, high, factor = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                            scaling["high_freq_factor"], scaling["factor"])
  smooth = (old / wavelen - low) / (high - low)
  expected = np.where(wavelen < old / high, 1.0,
                      np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
  if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
    raise FtjaxError(f"{path}: tensor 'rope_freqs.weight' does not match llama3 RoPE scaling with "
                     "low_freq_factor=1, high_freq_factor=4, original context 8192; "
                     "other RoPE scalings are not supported")
  return scaling


def gguf_config(reader, meta: dict, path: str) -> ModelConfig:
  """ModelConfig from GGUF metadata (`read_gguf_metadata`) and a few tensors' presence/shapes."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise FtjaxError(f"{path}: unsupported GGUF general.architecture={arch!r}; "
                     f"supported: {', '.join(ARCHITECTURES)}")
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise FtjaxError(f"{path}: missing tensor 'token_embd.weight'")
  try:
    hf = _hf_config(meta, tensors, arch, path)
  except (TypeError, ValueError) as e:  # a key of the wrong type, e.g. a string block_count
    raise FtjaxError(f"{path}: malformed GGUF metadata ({e})") from None
  return ModelConfig.from_hf_dict(hf, source=path)


def _hf_config(meta: dict, tensors: dict, arch: str, path: str) -> dict:
  """The config.json transformers would build from this file, so family switches live in one
  place (`ModelConfig.from_hf_dict`)."""

  def key(name, default=None):
    value = meta.get(f"{arch}.{name}", default)
    if value is None:
      raise FtjaxError(f"{path}: missing GGUF metadata key {arch}.{name!r}")
    return value

  d = int(key("embedding_length"))
  heads = int(key("attention.head_count"))
  kv_heads = key("attention.head_count_kv", heads)
  if isinstance(kv_heads, list):  # per-layer lists appear in hybrid models; ours are uniform
    if len(set(kv_heads)) != 1:
      raise FtjaxError(f"{path}: {arch}.attention.head_count_kv differs between layers")
    kv_heads = kv_heads[0]
  # key_length is the true head dim (qwen3, gemma); rope.dimension_count equals it for llama,
  # but is only the rotated part for phi3 (whose files have no key_length).
  head_dim = meta.get(f"{arch}.attention.key_length") or (
      None if arch == "phi3" else meta.get(f"{arch}.rope.dimension_count")) or d // heads
  # ggml lists dims fastest-first: token_embd is [d, vocab].
  vocab = int(tensors["token_embd.weight"].shape[-1])
  eos = meta.get("tokenizer.ggml.eos_token_id")
  hf = {
      "model_type": ARCHITECTURES[arch],
      "vocab_size": vocab,
      "hidden_size": d,
      "intermediate_size": int(key("feed_forward_length")),
      "num_hidden_layers": int(key("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(kv_heads),
      "head_dim": int(head_dim),
      "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
      "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
      "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
      "tie_word_embeddings": "output.weight" not in tensors,
      "attention_bias": "blk.0.attn_q.bias" in tensors,
      "use_sliding_window": False,
      "hidden_act": "gelu_pytorch_tanh" if arch in NORM_PLUS_ONE else "silu",
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": int(eos) if eos is not None else None,
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
  }
  scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling_type == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
  elif scaling_type != "none":
    raise FtjaxError(f"{path}: unsupported {arch}.rope.scaling.type={scaling_type!r}; "
                     "supported: none, linear (and llama3 via rope_freqs.weight)")
  if "rope_freqs.weight" in tensors:
    t = tensors["rope_freqs.weight"]
    hf["rope_scaling"] = _llama3_scaling(gguf.quants.dequantize(t.data, t.tensor_type),
                                         {"head_dim": hf["head_dim"], "rope_theta": hf["rope_theta"]},
                                         path) or None
  if arch in ("gemma2", "gemma3"):
    hf.update(_gemma2_config(meta, arch, hf))
  if arch == "phi3":
    hf.update(_phi3_config(meta, tensors, hf, path))
  if arch == "qwen3moe" or meta.get(f"{arch}.expert_count"):
    hf.update(_moe_config(meta, arch, path))
  return hf


def _moe_config(meta: dict, arch: str, path: str) -> dict:
  """Mixtral (a "llama" file with experts) / Qwen3-MoE's config.json keys from
  {arch}.expert_count / expert_used_count (and qwen3moe's expert_feed_forward_length, the
  experts' width; its feed_forward_length is HF's dense-layer intermediate_size). llama.cpp
  re-normalises the top-k weights of both (its build_moe_ffn's norm_w), so norm_topk_prob is on."""
  if arch not in ("llama", "qwen3moe"):
    raise FtjaxError(f"{path}: {arch}.expert_count is set, but ftjax reads experts only from "
                     "llama (Mixtral) and qwen3moe files")
  moe = {"num_experts_per_tok": int(_required_key(meta, f"{arch}.expert_used_count", path)),
         "router_aux_loss_coef": _GGUF_ROUTER_AUX_LOSS_COEF}
  experts = int(_required_key(meta, f"{arch}.expert_count", path))
  if arch == "llama":
    return {**moe, "model_type": "mixtral", "num_local_experts": experts}
  return {**moe, "num_experts": experts, "norm_topk_prob": True,
          "moe_intermediate_size": int(_required_key(meta, f"{arch}.expert_feed_forward_length", path))}


def _gemma2_config(meta: dict, arch: str, hf: dict) -> dict:
  """Gemma 2 / 3's extra config.json keys from Gemma2Model / Gemma3Model's GGUF keys; what a file
  lacks takes llama.cpp's default (query_pre_attn_scalar from the size, every 2nd / 6th layer
  global, local RoPE base 10000)."""
  out = {"use_sliding_window": True,
         "attn_logit_softcapping": meta.get(f"{arch}.attn_logit_softcapping"),
         "final_logit_softcapping": meta.get(f"{arch}.final_logit_softcapping"),
         "sliding_window": meta.get(f"{arch}.attention.sliding_window"),
         "query_pre_attn_scalar": llama_cpp_query_pre_attn_scalar(
             hf["model_type"], hf["num_hidden_layers"], hf["hidden_size"],
             hf["num_attention_heads"], hf["head_dim"])}
  pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
  if isinstance(pattern, list):
    out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
  elif pattern is not None:  # an int n: every n-th layer global, as llama.cpp's set_swa_pattern
    out["sliding_window_pattern"] = int(pattern)
  if arch == "gemma3":
    out["rope_parameters"] = {
        "full_attention": {"rope_type": "default", **(hf.get("rope_scaling") or {}),
                           "rope_theta": hf["rope_theta"]},
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))}}
  return out


def _phi3_config(meta: dict, tensors: dict, hf: dict, path: str) -> dict:
  """Phi-3's partial rotary (rope.dimension_count of head_dim), window (0: none, as Phi-4's
  files say) and longrope factors (the rope_factors_long / short tensors)."""
  rotary = int(meta.get("phi3.rope.dimension_count", hf["head_dim"]))
  window = int(meta.get("phi3.attention.sliding_window") or 0)
  out = {"partial_rotary_factor": rotary / hf["head_dim"], "sliding_window": window or None,
         "use_sliding_window": bool(window)}
  if "rope_factors_long.weight" in tensors:
    if "rope_factors_short.weight" not in tensors:
      raise FtjaxError(f"{path}: tensor 'rope_factors_long.weight' without 'rope_factors_short.weight'")
    factors = {k: [float(x) for x in np.asarray(tensors[f"rope_factors_{k}.weight"].data).reshape(-1)]
               for k in ("long", "short")}
    out["rope_scaling"] = {
        "rope_type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
        "original_max_position_embeddings": int(_required_key(
            meta, "phi3.rope.scaling.original_context_length", path))}
  return out


def _required_key(meta: dict, key: str, path: str):
  if meta.get(key) is None:
    raise FtjaxError(f"{path}: missing GGUF metadata key {key!r}")
  return meta[key]


def gguf_names(cfg: ModelConfig, arch: str) -> dict[str, tuple]:
  """GGUF tensor name -> (ParamSpec, layer index or None), from the specs' HF names. A MoE
  projection is one GGUF tensor per layer, [experts, out, in] (convert_hf_to_gguf stacks HF's
  per-expert weights): gguf-py names it from the HF name without the expert index."""
  arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  name_map = gguf.get_tensor_name_map(arch_id, cfg.num_layers)
  out = {}
  for spec in param_specs(cfg):
    names = ([spec.hf_name.replace(".experts.{j}.", ".experts.").format(i=i)
              for i in range(cfg.num_layers)] if spec.experts else spec.hf_names(cfg.num_layers))
    for i, hf_name in enumerate(names):
      base, suffix = hf_name.rsplit(".", 1)
      gguf_name = name_map.get_name(base)
      if gguf_name is None:  # a param of ours that gguf-py has no name for: a bug, not input
        raise RuntimeError(f"gguf-py has no tensor name for {hf_name} ({arch})")
      out[f"{gguf_name}.{suffix}"] = (spec, i if spec.stacked else None)
  return out


def hf_layout_shape(shape) -> tuple[int, ...]:
  """A kernel's shape [..., in, out] as HF / GGUF store it: [..., out, in] (a MoE projection
  keeps its leading experts axis)."""
  return (*shape[:-2], shape[-1], shape[-2])


def _unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `LlamaModel.permute` on q/k rows (weights and biases).

  llama.cpp reorders each head's rows from HF's rotate-half pairs (i, i + h/2) to interleaved
  pairs (2i, 2i + 1) for its GPT-J-style RoPE; ftjax uses HF's layout.
  """
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_ROWS_PER_CHUNK = 4096


def _dequantize_rows(t, start: int, stop: int) -> np.ndarray:
  try:
    return gguf.quants.dequantize(t.data[start:stop], t.tensor_type)
  except NotImplementedError:
    raise FtjaxError(f"tensor {t.name!r} has type {t.tensor_type.name}, which gguf-py cannot "
                     "dequantize; re-quantize the model to e.g. Q8_0, Q4_K or F16") from None


def _put_rows(t, target, shape: tuple, path: str) -> None:
  """Writes a 2-D tensor stored as our [rows, cols] into `target` a chunk of rows at a time, so
  neither the whole f32 table nor a second copy of it is ever in host memory."""
  rows = t.data.shape[0]
  for start in range(0, rows, _ROWS_PER_CHUNK):
    chunk = _dequantize_rows(t, start, min(start + _ROWS_PER_CHUNK, rows))
    if start == 0 and (rows, *chunk.shape[1:]) != shape:
      raise FtjaxError(f"{path}: tensor {t.name!r} has shape {(rows, *chunk.shape[1:])} "
                       f"(row-major), expected {shape}")
    target[start:start + chunk.shape[0]] = chunk


def _dequantize(t, rows_per_chunk: int = _ROWS_PER_CHUNK) -> np.ndarray:
  """A GGUF tensor in f32, dequantised a chunk of rows at a time: gguf-py's temporaries are
  several times the chunk, so a big embedding table does not double the peak host memory."""
  data = t.data
  if data.ndim < 2 or data.shape[0] <= rows_per_chunk:
    return gguf.quants.dequantize(data, t.tensor_type)
  first = gguf.quants.dequantize(data[:rows_per_chunk], t.tensor_type)
  out = np.empty((data.shape[0], *first.shape[1:]), first.dtype)
  out[:rows_per_chunk] = first
  for start in range(rows_per_chunk, data.shape[0], rows_per_chunk):
    out[start:start + rows_per_chunk] = gguf.quants.dequantize(
        data[start:start + rows_per_chunk], t.tensor_type)
  return out


_PER_EXPERT_TENSOR = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight")


def _per_expert_hint(name: str) -> str:
  """Mixtral files from llama.cpp's converter before 2024 hold one tensor per expert
  (blk.N.ffn_gate.E.weight); ftjax reads the stacked ffn_*_exps tensors it writes since."""
  if not _PER_EXPERT_TENSOR.fullmatch(name):
    return ""
  return (" (one tensor per expert, as llama.cpp's converter wrote Mixtral before stacking "
          "each layer's experts into ffn_gate_exps / ffn_up_exps / ffn_down_exps: re-convert "
          "the model with a current convert_hf_to_gguf.py)")


def load_gguf(path: str, dtype=np.float32, allocate=None) -> tuple[ModelConfig, Params]:
  """Reads a GGUF model file into (ModelConfig, params tree of numpy arrays of `dtype`);
  `allocate` as in ftjax.models.hf.load_hf_params."""
  reader = open_gguf(path)
  meta = read_gguf_metadata(reader)
  cfg = gguf_config(reader, meta, path)
  arch = meta["general.architecture"]
  # The parsed metadata (a numpy view per token and merge of the vocabulary: ~180 MiB for
  # SmolLM2's 49k tokens) is not needed for the tensors; dropping it keeps it out of the peak.
  del meta
  reader.fields.clear()
  wanted = gguf_names(cfg, arch)
  params: Params = {}
  for spec in param_specs(cfg):
    set_path(params, spec.path, allocate(spec, dtype) if allocate else np.empty(spec.shape, dtype))
  seen = set()
  for t in reader.tensors:
    if t.name in _IGNORED_TENSORS:
      continue
    if t.name not in wanted:
      raise FtjaxError(f"{path}: unexpected tensor {t.name!r} for a {arch} model "
                       f"with {cfg.num_layers} layers" + _per_expert_hint(t.name))
    spec, i = wanted[t.name]
    target = get_path(params, spec.path)
    if i is None and not spec.transpose and t.data.ndim == 2 and t.data.shape[0] > _ROWS_PER_CHUNK \
        and arch not in NORM_PLUS_ONE:  # a big table (the embedding): straight into its target, by chunks
      _put_rows(t, target, tuple(spec.shape), path)
      seen.add(t.name)
      continue
    try:
      w = _dequantize(t)
    except NotImplementedError:
      raise FtjaxError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf-py "
                       "cannot dequantize; re-quantize the model to e.g. Q8_0, Q4_K or F16") from None
    if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
      w = _unpermute_qk(w, cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads)
    if arch in NORM_PLUS_ONE and t.name.endswith("norm.weight"):
      w = w - 1  # llama.cpp stores gemma's (1 + w) norm scale; ftjax keeps HF's w
    expected = spec.shape[1:] if i is not None else spec.shape
    want_hf = hf_layout_shape(expected) if spec.transpose else tuple(expected)
    if tuple(w.shape) != want_hf:
      raise FtjaxError(f"{path}: tensor {t.name!r} has shape {tuple(w.shape)} (row-major), "
                       f"expected {want_hf}")
    if spec.transpose:
      w = np.swapaxes(w, -1, -2)  # [..., out, in] -> our [..., in, out]
    if i is None:
      target[...] = w
    else:
      target[i] = w
    seen.add(t.name)
  missing = [name for name in wanted if name not in seen]
  if missing:
    raise FtjaxError(f"{path}: missing tensor {missing[0]!r}"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return cfg, params
