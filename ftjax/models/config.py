"""One config for the whole Llama family, built from a HF `config.json` (or GGUF metadata).

The decoder differs between families only in a handful of switches, so each family is a
`ModelConfig` value, not a subclass:

| family        | switches                                                         |
|---------------|------------------------------------------------------------------|
| llama 2/3/3.1 | defaults; llama3 RoPE scaling from `rope_scaling`/`rope_parameters` |
| mistral       | defaults (sliding window recorded; longer inputs are refused)    |
| qwen2 / 2.5   | `qkv_bias=True`                                                  |
| qwen3         | `qk_norm=True`, explicit `head_dim`                               |
| gemma (1)     | `embed_scale`, `norm_offset=1`, gelu-tanh MLP, tied head          |
| gemma2        | gemma's, plus `sandwich_norms`, `layer_types` (sliding / full),   |
|               | `attn_logit_softcap`, `final_logit_softcap`, `query_pre_attn_scalar` |
| gemma3 (text) | gemma2's, plus `qk_norm` and `rope_local_theta` (sliding layers)  |
| phi3 / 3.5 / 4-mini | `fused_projections` (`qkv_proj`, `gate_up_proj` as in HF),  |
|               | `partial_rotary_factor`, longrope RoPE scaling (short/long factors) |
| mixtral       | `num_experts`, `num_experts_per_tok`, `norm_topk_prob=True`:      |
|               | a routed MoE MLP (`block_sparse_moe`), `router_aux_loss_coef`     |
| qwen3_moe     | qwen3's, plus the MoE MLP (`mlp`) with `moe_intermediate_size`    |
|               | and `norm_topk_prob` from config.json                             |

Per-layer differences (`layer_types`) are data the layer scan slices (`layer_windows`,
`layer_is_local`), never a Python branch per layer: the stack stays one compiled body.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from ftjax.errors import FtjaxError
from ftjax.files import read_json

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                           "mixtral", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen3_moe")
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")
# Multimodal configs whose `text_config` is a supported decoder: their text model loads alone.
TEXT_MODEL_OF = {"gemma3": "gemma3_text"}
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # Hashable tuple of (key, value) pairs from HF's rope_scaling; () for plain RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_offset: float = 0.0  # gemma stores RMSNorm weights as (w - 1)
  activation: str = "silu"  # "silu" or "gelu_tanh"
  embed_scale: bool = False  # gemma multiplies embeddings by sqrt(hidden_size)
  max_position_embeddings: int = 4096
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # generation_config.json's eos_token_id(s) where they add to config.json's (Llama 3 instruct
  # stops on <|eot_id|> too): stop tokens for generation, never written back to config.json.
  generation_eos_token_ids: tuple[int, ...] = ()
  # gemma2 / gemma3: tanh soft-capping of attention scores and of the final logits (None: off).
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None  # scores scale by its -1/2 power, not head_dim's
  # gemma2 / gemma3: post_attention_layernorm normalises the attention output (before the
  # residual add) and pre/post_feedforward_layernorm wrap the MLP: four norms per layer.
  sandwich_norms: bool = False
  # One of LAYER_TYPES per layer; () means every layer alike (Mistral's sliding_window then
  # applies to all). "sliding_attention" layers use sliding_window and rope_local_theta.
  layer_types: tuple[str, ...] = ()
  rope_local_theta: float | None = None  # gemma3: plain RoPE base of the sliding layers
  # phi3: one `qkv_proj` ([q | k | v] outputs) and one `gate_up_proj` ([gate | up]) per layer,
  # kept fused as HF stores them, so LoRA on `qkv_proj` is PEFT's one A/B over the fused output.
  fused_projections: bool = False
  # phi3 (Phi-4-mini: 0.75): RoPE rotates the first rotary_dim dims of each head, the rest pass.
  partial_rotary_factor: float = 1.0
  # mixtral / qwen3_moe: every layer's MLP is `num_experts` experts (each a gated MLP of
  # intermediate_size) behind a softmax router that sends each token to its top
  # `num_experts_per_tok`; norm_topk_prob re-normalises those weights to sum to 1 (mixtral
  # always). 0 experts: the dense MLP. router_aux_loss_coef weighs the load-balancing loss in
  # training (ftjax.losses); output_router_logits is kept only to write config.json back.
  num_experts: int = 0
  num_experts_per_tok: int = 0
  norm_topk_prob: bool = False
  router_aux_loss_coef: float = 0.0
  output_router_logits: bool = False

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def moe_module(self) -> str:
    """The MoE block's attribute name in a layer, as transformers names it."""
    return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)  # HF's int(), not round()

  def layer_windows(self) -> tuple[int, ...]:
    """Each layer's attention window, 0 for global layers (only with layer_types)."""
    return tuple(int(self.sliding_window or 0) if kind == "sliding_attention" else 0
                 for kind in self.layer_types)

  def layer_is_local(self) -> tuple[bool, ...]:
    return tuple(kind == "sliding_attention" for kind in self.layer_types)

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  def num_params(self) -> int:
    d, f, v, layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
    attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
    if self.qkv_bias:
      attn += self.q_size + 2 * self.kv_size
    if self.qk_norm:
      attn += 2 * self.head_dim
    mlp = 3 * d * f * max(self.num_experts, 1) + d * self.num_experts  # experts + router
    per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * d
    head = 0 if self.tie_word_embeddings else d * v
    return v * d + layers * per_layer + d + head

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # --- HF config.json ---------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
    model_type = hf.get("model_type")
    if model_type in TEXT_MODEL_OF and isinstance(hf.get("text_config"), dict):
      # Gemma3ForConditionalGeneration: the text model, with the outer config's ids as fallback.
      text = hf["text_config"]
      outer = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
      return cls.from_hf_dict({**outer, **text, "model_type": TEXT_MODEL_OF[model_type]}, source)
    if model_type not in SUPPORTED_ARCHITECTURES:
      raise FtjaxError(
          f"{source}: unsupported architecture model_type={model_type!r}; "
          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
      d = int(hf["hidden_size"])
      heads = int(hf["num_attention_heads"])
      kw = dict(
          model_type=model_type,
          vocab_size=int(hf["vocab_size"]),
          hidden_size=d,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=heads,
          num_kv_heads=int(hf.get("num_key_value_heads") or heads),
          head_dim=int(hf.get("head_dim") or d // heads),
      )
      kw.update(_moe(hf, model_type, kw["num_layers"], source))
    except KeyError as e:
      raise FtjaxError(f"{source}: missing required key {e.args[0]!r}") from None
    theta, scaling, local_theta = _rope(hf, model_type, source)
    is_gemma = model_type in GEMMA_FAMILIES
    sandwich = model_type in ("gemma2", "gemma3_text")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
      # Gemma 1 checkpoints say "gelu" but were trained with the tanh approximation;
      # transformers maps both to gelu_pytorch_tanh for gemma.
      act = "gelu_tanh"
    elif act != "silu":
      raise FtjaxError(f"{source}: unsupported activation {act!r}; supported: silu, gelu_pytorch_tanh")
    sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    eos = hf.get("eos_token_id")
    layer_types = _layer_types(hf, model_type, kw["num_layers"], source)
    return cls(
        **kw,
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(scaling.items())),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
        qkv_bias=bool(hf.get("attention_bias", False)) or model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        norm_offset=1.0 if is_gemma else 0.0,
        activation=act,
        embed_scale=is_gemma,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        attn_logit_softcap=_positive(hf.get("attn_logit_softcapping")) if sandwich else None,
        final_logit_softcap=_positive(hf.get("final_logit_softcapping")) if sandwich else None,
        query_pre_attn_scalar=(float(hf.get("query_pre_attn_scalar") or 256) if sandwich else None),
        sandwich_norms=sandwich,
        layer_types=layer_types,
        rope_local_theta=local_theta,
        fused_projections=model_type == "phi3",
        partial_rotary_factor=_partial_rotary_factor(hf, source),
    )

  @classmethod
  def from_hf_file(cls, path: str) -> "ModelConfig":
    return cls.from_hf_dict(read_json(path), source=path)

  def to_hf_dict(self) -> dict:
    """The config.json that transformers needs to rebuild this model."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
            "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[self.model_type]
    scaling = dict(self.rope_scaling) or None
    hf = {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rope_theta": self.rope_theta,
        "rope_scaling": scaling,
        # transformers 5 reads this; older versions ignore it.
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta},
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "gelu_pytorch_tanh" if self.activation == "gelu_tanh" else "silu",
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32",
    }
    if self.model_type in GEMMA_FAMILIES:
      hf["hidden_activation"] = hf["hidden_act"]
    if self.sandwich_norms:  # gemma2 / gemma3
      hf.update(attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                # transformers' strict config wants an int where the value is one
                query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types))
    if self.model_type == "gemma3_text":
      hf["rope_local_base_freq"] = self.rope_local_theta
      hf["rope_parameters"] = {
          "full_attention": hf["rope_parameters"],
          "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta}}
    if self.model_type == "phi3":
      hf["partial_rotary_factor"] = self.partial_rotary_factor
      hf["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
      hf["sliding_window"] = self.sliding_window
      if scaling and "original_max_position_embeddings" in scaling:
        hf["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if self.model_type in ("llama", "qwen3", "qwen3_moe"):
      hf["attention_bias"] = self.qkv_bias
    if self.model_type in ("mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"):
      hf["sliding_window"] = self.sliding_window
      hf["use_sliding_window"] = False if self.model_type not in ("mistral", "mixtral") else None
    if self.is_moe:
      hf.update(self._moe_hf_dict())
    return hf

  def _moe_hf_dict(self) -> dict:
    out = {"num_experts_per_tok": self.num_experts_per_tok,
           "router_aux_loss_coef": self.router_aux_loss_coef,
           "output_router_logits": self.output_router_logits}
    if self.model_type == "mixtral":
      return {**out, "num_local_experts": self.num_experts}
    # qwen3_moe: intermediate_size is the experts' width; a dense-layer width is not used
    # (ftjax refuses mlp_only_layers), so it is written as the experts' too.
    return {**out, "num_experts": self.num_experts, "moe_intermediate_size": self.intermediate_size,
            "norm_topk_prob": self.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": []}

  def head_scale(self) -> float:
    return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)


def _int_if_whole(value: float | None):
  return int(value) if value is not None and float(value).is_integer() else value


def _positive(value) -> float | None:
  return float(value) if value else None


def _rope_scaling(params: dict, source: str) -> tuple[float | None, dict]:
  """(rope_theta or None, scaling dict without it; {} for plain RoPE) of one rope dict."""
  scaling = dict(params)
  theta = scaling.pop("rope_theta", None)
  scaling.pop("partial_rotary_factor", None)  # phi3's transformers 5 keeps it here; read apart
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "su":  # Phi-3's older name, as transformers renames it
    rope_type = "longrope"
  if rope_type not in ("default", "linear", "llama3", "longrope"):
    raise FtjaxError(f"{source}: unsupported rope scaling type {rope_type!r}; "
                     "supported: default, linear, llama3, longrope")
  if rope_type == "longrope":
    missing = [k for k in ("short_factor", "long_factor") if not isinstance(scaling.get(k), (list, tuple))]
    if missing:
      raise FtjaxError(f"{source}: longrope rope scaling needs {' and '.join(missing)} (lists of numbers)")
    # hashable: ModelConfig is a cache key
    scaling.update(short_factor=tuple(scaling["short_factor"]), long_factor=tuple(scaling["long_factor"]))
  scaling = {} if rope_type == "default" else {**scaling, "rope_type": rope_type}
  scaling.pop("type", None)
  return theta, scaling


def _partial_rotary_factor(hf: dict, source: str) -> float:
  """phi3's partial_rotary_factor: top-level (transformers 4) or in rope_parameters (5)."""
  factor = hf.get("partial_rotary_factor", (hf.get("rope_parameters") or {}).get("partial_rotary_factor"))
  factor = 1.0 if factor is None else float(factor)
  if not 0.0 < factor <= 1.0:
    raise FtjaxError(f"{source}: partial_rotary_factor must be in (0, 1], got {factor}")
  return factor


def _rope(hf: dict, model_type: str, source: str) -> tuple[float, dict, float | None]:
  """(rope_theta, rope_scaling, rope_local_theta) from either transformers layout: 4's
  rope_theta / rope_scaling (/ gemma3's rope_local_base_freq), or 5's `rope_parameters`
  (keyed by layer type for gemma3, where the scaling belongs to the full-attention layers)."""
  rope = dict(hf.get("rope_parameters") or {})
  if model_type == "gemma3_text":
    if "full_attention" in rope:
      theta, scaling = _rope_scaling(rope["full_attention"], f"{source}: rope_parameters.full_attention")
      local, local_scaling = _rope_scaling(rope.get("sliding_attention") or {},
                                           f"{source}: rope_parameters.sliding_attention")
      if local_scaling:
        raise FtjaxError(f"{source}: rope_parameters.sliding_attention has rope scaling "
                         f"{local_scaling}; ftjax supports plain RoPE on the sliding layers")
    else:
      _, scaling = _rope_scaling(hf.get("rope_scaling") or {}, source)
      theta, local = hf.get("rope_theta"), hf.get("rope_local_base_freq")
    return float(theta or 1_000_000.0), scaling, float(local or 10_000.0)
  theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
  _, scaling = _rope_scaling(hf.get("rope_scaling") or rope, source)
  if scaling.get("rope_type") == "longrope" and "original_max_position_embeddings" not in scaling:
    if "original_max_position_embeddings" not in hf:  # transformers 4 keeps it at the top level
      raise FtjaxError(f"{source}: longrope rope scaling needs original_max_position_embeddings")
    scaling["original_max_position_embeddings"] = int(hf["original_max_position_embeddings"])
  return float(theta), scaling, None


def _moe(hf: dict, model_type: str, num_layers: int, source: str) -> dict:
  """mixtral / qwen3_moe: the ModelConfig fields of the routed expert MLP ({} for dense
  families). Every layer must be a MoE layer: the layer stack is one scanned body."""
  if model_type not in MOE_FAMILIES:
    return {}
  if model_type == "mixtral":
    experts, norm_topk, width = int(hf["num_local_experts"]), True, int(hf["intermediate_size"])
  else:
    # transformers 5 writes qwen3_moe's num_experts as num_local_experts
    experts = int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"])
    norm_topk = bool(hf.get("norm_topk_prob", False))
    width = int(hf["moe_intermediate_size"])
    dense = [i for i in range(num_layers) if i in (hf.get("mlp_only_layers") or [])
             or (i + 1) % int(hf.get("decoder_sparse_step") or 1)]
    if dense:
      raise FtjaxError(f"{source}: layers {dense} are dense MLP layers (mlp_only_layers / "
                       "decoder_sparse_step); ftjax supports qwen3_moe with every layer a MoE layer")
  top_k = int(hf["num_experts_per_tok"])
  if not 0 < top_k <= experts:
    raise FtjaxError(f"{source}: num_experts_per_tok={top_k} must be in 1..{experts} (the number of experts)")
  return dict(num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk,
              intermediate_size=width, router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
              output_router_logits=bool(hf.get("output_router_logits", False)))


def _layer_types(hf: dict, model_type: str, num_layers: int, source: str) -> tuple[str, ...]:
  """gemma2 / gemma3: each layer's attention kind, from `layer_types` or the older pattern
  (gemma2 alternates from a sliding layer 0; gemma3 makes every 6th layer global)."""
  if model_type not in ("gemma2", "gemma3_text"):
    return ()
  if hf.get("use_bidirectional_attention"):
    raise FtjaxError(f"{source}: use_bidirectional_attention=true (an embedding model) is not "
                     "supported; ftjax's decoder is causal")
  kinds = hf.get("layer_types")
  if kinds is None:
    pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
    kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
  if len(kinds) != num_layers or any(k not in LAYER_TYPES for k in kinds):
    raise FtjaxError(f"{source}: layer_types must list one of {LAYER_TYPES} per layer "
                     f"({num_layers}), got {kinds!r}")
  if "sliding_attention" in kinds and not hf.get("sliding_window"):
    raise FtjaxError(f"{source}: layer_types has sliding_attention layers but no sliding_window")
  return tuple(kinds)


def load_hf_config(model_dir: str) -> ModelConfig:
  cfg = ModelConfig.from_hf_file(os.path.join(model_dir, "config.json"))
  return cfg.replace(generation_eos_token_ids=generation_eos_ids(model_dir))


def generation_eos_ids(model_dir: str) -> tuple[int, ...]:
  """The eos_token_id(s) of a HF directory's generation_config.json (() when it has none)."""
  path = os.path.join(model_dir, "generation_config.json")
  if not os.path.isfile(path):
    return ()
  data = read_json(path)
  eos = data.get("eos_token_id") if isinstance(data, dict) else None
  ids = eos if isinstance(eos, list) else [eos]
  if not all(isinstance(i, int) for i in ids if i is not None):
    raise FtjaxError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
  return tuple(int(i) for i in ids if i is not None)
