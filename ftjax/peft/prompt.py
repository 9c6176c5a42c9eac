"""Virtual-token methods: prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021).

Both fill a slot of ftjax's decoder (`Decoder.prompt` / `Decoder.prefix`, see
ftjax/models/llama.py); the decoder handles positions, masks, packing and the KV cache:

  prompt tuning   n trained embeddings put before every sequence ("soft prompt")
  prefix tuning   n trained keys and values put before the real ones in every layer, optionally
                  produced by an MLP from n embeddings (`prefix_projection`) while training;
                  saving writes the MLP's output, as HF PEFT does, so the projection folds away

HF PEFT stores both as one tensor, `prompt_embeddings`: [n, hidden] for prompt tuning, and
[n, layers * 2 * kv_heads * head_dim] (layer-major, then key/value) for prefix tuning.
Neither can be merged into the base weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.models.resolve import tokenizer_for
from ftjax.peft.core import AdapterLayer, AdapterParam, PeftConfig, retyped_copy

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


class PromptParam(AdapterParam):
  """A virtual-token param (prompt embeddings, prefix keys/values or their MLP)."""


def _decoder(model: nnx.Module, method: str) -> nnx.Module:
  """The module with virtual-token slots (ftjax's Decoder)."""
  for _, module in nnx.iter_modules(model):
    if hasattr(type(module), "virtual_token_slots"):
      return module
  raise FtjaxError(f"{method} needs a model with virtual-token slots (ftjax's decoders, "
                   f"ftjax.models.CausalLM); {type(model).__name__} has none")


def _free_slot(model: nnx.Module, slot: str, method: str) -> nnx.Module:
  """The decoder, whose `slot` must still be empty (it holds one adapter)."""
  decoder = _decoder(model, method)
  if getattr(decoder, slot) is not None:
    raise FtjaxError(f"{method}: the decoder's {slot} slot already holds adapter "
                     f"{getattr(decoder, slot).adapter_name!r}; delete it first")
  return decoder


class _VirtualTokens(AdapterLayer):
  """A decoder slot's adapter: no base layer, not mergeable, keys without a module prefix."""

  base_layer = None
  mergeable: ClassVar[bool] = False
  peft_prefixed: ClassVar[bool] = False

  @property
  def num_virtual_tokens(self) -> int:
    return 0 if self.disabled else self.size


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(PeftConfig):
  """HF PEFT's `PromptTuningConfig`. prompt_tuning_init: "RANDOM" (N(0, 1), PEFT's default),
  "SAMPLE_VOCAB" (embeddings of random vocabulary tokens) or "TEXT" (the embeddings of
  `prompt_tuning_init_text`'s tokens, repeated or cut to num_virtual_tokens; the tokenizer comes
  from `tokenizer_name_or_path`: a model name, HF folder or .gguf ftjax can load)."""

  peft_type: ClassVar[str] = "PROMPT_TUNING"

  num_virtual_tokens: int = 8
  prompt_tuning_init: str = "RANDOM"
  prompt_tuning_init_text: str | None = None
  tokenizer_name_or_path: str | None = None
  task_type: str | None = "CAUSAL_LM"

  def __post_init__(self):
    if self.num_virtual_tokens < 1:
      raise FtjaxError(f"PromptTuningConfig: num_virtual_tokens={self.num_virtual_tokens}; must be >= 1")
    if self.prompt_tuning_init not in INITS:
      raise FtjaxError(f"PromptTuningConfig: prompt_tuning_init={self.prompt_tuning_init!r}; "
                       f"expected one of {INITS}")
    if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
      raise FtjaxError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text "
                       "and tokenizer_name_or_path")

  def _init_table(self, decoder, rngs: nnx.Rngs):
    n, embedding = self.num_virtual_tokens, decoder.embed_tokens.embedding
    if self.prompt_tuning_init == "RANDOM":
      return jax.random.normal(rngs.params(), (n, embedding.shape[-1]), jnp.float32)
    if self.prompt_tuning_init == "SAMPLE_VOCAB":
      ids = jax.random.randint(rngs.params(), (n,), 0, embedding.shape[0])
    else:
      ids = list(tokenizer_for(self.tokenizer_name_or_path).encode(self.prompt_tuning_init_text))
      if not ids:
        raise FtjaxError("PromptTuningConfig: prompt_tuning_init_text has no tokens")
      ids = jnp.asarray((ids * math.ceil(n / len(ids)))[:n])
    return jnp.asarray(embedding[...], jnp.float32)[ids]

  def attach(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
    decoder = _free_slot(model, "prompt", "prompt tuning")
    decoder.prompt = PromptEmbedding(self._init_table(decoder, rngs))

  def to_peft(self, model: nnx.Module, adapter_name: str = "default") -> dict:
    cfg = _decoder(model, "prompt tuning").config
    return {"peft_type": self.peft_type, "task_type": self.task_type,
            "num_virtual_tokens": self.num_virtual_tokens, "token_dim": cfg.hidden_size,
            "num_transformer_submodules": 1, "num_attention_heads": cfg.num_heads,
            "num_layers": cfg.num_layers, "prompt_tuning_init": self.prompt_tuning_init,
            "prompt_tuning_init_text": self.prompt_tuning_init_text,
            "tokenizer_name_or_path": self.tokenizer_name_or_path, "inference_mode": True}

  @classmethod
  def from_peft(cls, raw: dict) -> "PromptTuningConfig":
    # A saved adapter is loaded, not initialised: its init settings do not matter any more.
    return cls(num_virtual_tokens=int(raw["num_virtual_tokens"]), task_type=raw.get("task_type"))


class PromptEmbedding(_VirtualTokens):
  """The soft prompt: [n, hidden] embeddings the decoder puts before every sequence."""

  def __init__(self, table):
    self.prompt_embeddings = PromptParam(table, out_sharding=(None, "embed"), eager_sharding=False)
    self.size = table.shape[0]
    self.disabled = False

  def __call__(self):
    return self.prompt_embeddings[...]

  def peft_tensors(self) -> dict:
    return {"prompt_embeddings": self.prompt_embeddings[...]}

  def load_peft_tensors(self, tensors: dict) -> None:
    self.prompt_embeddings.set_value(jnp.asarray(tensors["prompt_embeddings"], jnp.float32))


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(PeftConfig):
  """HF PEFT's `PrefixTuningConfig`: num_virtual_tokens keys and values per layer, initialised
  N(0, 1) as PEFT's embedding table; with `prefix_projection` they are the output of a two-layer
  tanh MLP (hidden width `encoder_hidden_size`, default the kv width) over n embeddings."""

  peft_type: ClassVar[str] = "PREFIX_TUNING"

  num_virtual_tokens: int = 8
  prefix_projection: bool = False
  encoder_hidden_size: int | None = None
  task_type: str | None = "CAUSAL_LM"

  def __post_init__(self):
    if self.num_virtual_tokens < 1:
      raise FtjaxError(f"PrefixTuningConfig: num_virtual_tokens={self.num_virtual_tokens}; must be >= 1")

  def attach(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
    decoder = _free_slot(model, "prefix", "prefix tuning")
    decoder.prefix = PrefixEncoder(decoder.config, self.num_virtual_tokens, self.prefix_projection,
                                   self.encoder_hidden_size, rngs)

  def to_peft(self, model: nnx.Module, adapter_name: str = "default") -> dict:
    cfg = _decoder(model, "prefix tuning").config
    return {"peft_type": self.peft_type, "task_type": self.task_type,
            "num_virtual_tokens": self.num_virtual_tokens, "token_dim": cfg.kv_size,
            "num_transformer_submodules": 1, "num_attention_heads": cfg.num_kv_heads,
            "num_layers": cfg.num_layers, "encoder_hidden_size": self.encoder_hidden_size or cfg.kv_size,
            "prefix_projection": self.prefix_projection, "inference_mode": True}

  @classmethod
  def from_peft(cls, raw: dict) -> "PrefixTuningConfig":
    # The file holds the projected table (PEFT and ftjax save it so): load it as a plain prefix.
    return cls(num_virtual_tokens=int(raw["num_virtual_tokens"]), prefix_projection=False,
               task_type=raw.get("task_type"))


class PrefixEncoder(_VirtualTokens):
  """Per-layer prefix keys and values: [l, 2, n, kv_heads, head_dim] from a [n, l·2·kv·h] table,
  either trained directly or produced by the projection MLP."""

  def __init__(self, cfg, n: int, projection: bool, hidden: int | None, rngs: nnx.Rngs):
    self.shape = (n, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
    width = cfg.num_layers * 2 * cfg.kv_size
    if projection:
      self.embedding = PromptParam(jax.random.normal(rngs.params(), (n, cfg.kv_size)))
      hidden = hidden or cfg.kv_size
      linear = lambda a, b: retyped_copy(nnx.Linear(a, b, kernel_init=_torch_linear_init(a),
                                                    bias_init=_torch_linear_init(a), rngs=rngs),
                                         PromptParam)
      self.transform_in, self.transform_out = linear(cfg.kv_size, hidden), linear(hidden, width)
    else:
      self.prompt_embeddings = PromptParam(jax.random.normal(rngs.params(), (n, width)))
    self.projection = projection
    self.size = n
    self.disabled = False

  def table(self):
    """[n, l·2·kv·h], HF PEFT's `prompt_embeddings` layout."""
    if self.projection:
      return self.transform_out(jnp.tanh(self.transform_in(self.embedding[...])))
    return self.prompt_embeddings[...]

  def __call__(self):
    return self.table().reshape(self.shape).transpose(1, 2, 0, 3, 4)

  def peft_tensors(self) -> dict:
    return {"prompt_embeddings": self.table()}

  def load_peft_tensors(self, tensors: dict) -> None:
    if self.projection:
      raise FtjaxError("a saved prefix is a plain table: load it with prefix_projection=False")
    self.prompt_embeddings.set_value(jnp.asarray(np.asarray(tensors["prompt_embeddings"]), jnp.float32))


def _torch_linear_init(fan_in: int):
  """torch.nn.Linear's default init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
