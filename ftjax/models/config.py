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
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from ftjax.errors import FtjaxError
from ftjax.files import read_json

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


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
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * v
    return v * d + layers * per_layer + d + head

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # --- HF config.json ---------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
    model_type = hf.get("model_type")
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
    except KeyError as e:
      raise FtjaxError(f"{source}: missing required key {e.args[0]!r}") from None
    # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = dict(hf.get("rope_scaling") or rope)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
      raise FtjaxError(f"{source}: unsupported rope scaling type {rope_type!r}; "
                       "supported: default, linear, llama3")
    scaling = {} if rope_type == "default" else {**scaling, "rope_type": rope_type}
    scaling.pop("type", None)
    is_gemma = model_type == "gemma"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
      # Gemma 1 checkpoints say "gelu" but were trained with the tanh approximation;
      # transformers maps both to gelu_pytorch_tanh for gemma.
      act = "gelu_tanh"
    elif act != "silu":
      raise FtjaxError(f"{source}: unsupported activation {act!r}; supported: silu, gelu_pytorch_tanh")
    sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    eos = hf.get("eos_token_id")
    return cls(
        **kw,
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(scaling.items())),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
        qkv_bias=bool(hf.get("attention_bias", False)) or model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        norm_offset=1.0 if is_gemma else 0.0,
        activation=act,
        embed_scale=is_gemma,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )

  @classmethod
  def from_hf_file(cls, path: str) -> "ModelConfig":
    return cls.from_hf_dict(read_json(path), source=path)

  def to_hf_dict(self) -> dict:
    """The config.json that transformers needs to rebuild this model."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM"}[self.model_type]
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
    if self.model_type == "gemma":
      hf["hidden_activation"] = hf["hidden_act"]
    if self.model_type in ("llama", "qwen3"):
      hf["attention_bias"] = self.qkv_bias
    if self.model_type in ("mistral", "qwen2", "qwen3"):
      hf["sliding_window"] = self.sliding_window
      hf["use_sliding_window"] = False if self.model_type != "mistral" else None
    return hf

  def head_scale(self) -> float:
    return 1.0 / math.sqrt(self.head_dim)


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
