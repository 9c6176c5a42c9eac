"""Bottleneck adapter layers (Houlsby et al. 2019; Pfeiffer et al. 2021).

A small residual MLP on a layer's output: y + up(act(down(y))), down: [out, m], up: [m, out]
with m = out / reduction_factor. `up` starts at zero, so the model starts as the base. Houlsby
places one after the attention block and one after the MLP (on the outputs of `o_proj` and
`down_proj`, before the residual add), Pfeiffer only after the MLP; on other models
`target_modules` names the layers whose outputs get one.

HF PEFT has no bottleneck adapters, so their files use ftjax's own layout in PEFT's folder
shape: adapter_config.json with "peft_type": "BOTTLENECK_ADAPTER" and adapter_model.safetensors
with, per adapted layer, `base_model.model.<layer>.adapter_down.weight` [m, out],
`...adapter_down.bias` [m], `...adapter_up.weight` [out, m] and `...adapter_up.bias` [out]
(torch Linear layout). `ftjax.peft.load_adapter` reads them; `peft` cannot.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.peft.core import AdapterLayer, AdapterParam, WrapperConfig, as_list, as_tuple

ARCHITECTURES = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
               "silu": jax.nn.silu, "tanh": jnp.tanh}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma")


@dataclasses.dataclass(frozen=True)
class BottleneckAdapterConfig(WrapperConfig):
  """Bottleneck adapters after the target layers' outputs. architecture: "houlsby" (after
  attention and MLP) or "pfeiffer" (after the MLP), which choose ftjax's decoders' targets;
  `target_modules` (PEFT's matching rules) overrides them, and is needed for other models."""

  peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"
  method: ClassVar[str] = "bottleneck adapter"
  supported: ClassVar[tuple] = (nnx.Linear,)

  reduction_factor: int = 16
  non_linearity: str = "relu"
  architecture: str = "houlsby"
  target_modules: str | tuple[str, ...] | None = None
  modules_to_save: tuple[str, ...] | None = None
  task_type: str | None = "CAUSAL_LM"

  def __post_init__(self):
    for key in ("target_modules", "modules_to_save"):
      if isinstance(getattr(self, key), (list, set)):
        object.__setattr__(self, key, tuple(sorted(getattr(self, key))))
    if self.architecture not in ARCHITECTURES:
      raise FtjaxError(f"BottleneckAdapterConfig: architecture={self.architecture!r}; expected "
                       f"one of {tuple(ARCHITECTURES)}")
    if self.non_linearity not in ACTIVATIONS:
      raise FtjaxError(f"BottleneckAdapterConfig: non_linearity={self.non_linearity!r}; expected "
                       f"one of {tuple(ACTIVATIONS)}")
    if self.reduction_factor < 1:
      raise FtjaxError(f"BottleneckAdapterConfig: reduction_factor={self.reduction_factor}; must be >= 1")

  @property
  def default_targets(self) -> dict:
    return {t: ARCHITECTURES[self.architecture] for t in DECODERS}

  def wrap(self, module: nnx.Module, rngs: nnx.Rngs, names=()) -> AdapterLayer:
    return BottleneckLinear(module, reduction_factor=self.reduction_factor,
                            non_linearity=self.non_linearity, rngs=rngs)

  def to_peft(self, model: nnx.Module, adapter_name: str = "default") -> dict:
    return {"peft_type": self.peft_type, "task_type": self.task_type,
            "reduction_factor": self.reduction_factor, "non_linearity": self.non_linearity,
            "architecture": self.architecture, "target_modules": self.saved_targets(model, adapter_name),
            "modules_to_save": as_list(self.modules_to_save),
            "format": "ftjax bottleneck adapter (not a HF PEFT type)"}

  @classmethod
  def from_peft(cls, raw: dict) -> "BottleneckAdapterConfig":
    return cls(reduction_factor=int(raw["reduction_factor"]), non_linearity=raw["non_linearity"],
               architecture=raw["architecture"], target_modules=as_tuple(raw.get("target_modules")),
               modules_to_save=as_tuple(raw.get("modules_to_save") or None),
               task_type=raw.get("task_type"))


class BottleneckParam(AdapterParam):
  """A bottleneck adapter's weight or bias."""


class BottleneckLinear(AdapterLayer):
  """y + up(act(down(y))) on an `nnx.Linear`'s output y [..., out]."""

  mergeable: ClassVar[bool] = False  # the non-linearity cannot be folded into a weight

  def __init__(self, base_layer: nnx.Linear, *, reduction_factor: int, non_linearity: str,
               rngs: nnx.Rngs):
    kernel = base_layer.kernel
    names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    *lead, _, out = kernel.shape
    m = max(1, out // reduction_factor)
    lead, lead_names = tuple(lead), tuple(names[:-2])
    bound = 1.0 / math.sqrt(out)  # torch.nn.Linear's default init for the down projection
    param = lambda value, *axes: BottleneckParam(value, out_sharding=(*lead_names, *axes),
                                                 eager_sharding=False)
    keys = jax.random.split(rngs.params())
    self.base_layer = base_layer
    self.adapter_down = param(jax.random.uniform(keys[0], (*lead, out, m), jnp.float32, -bound, bound),
                              names[-1], "adapter")
    self.adapter_down_bias = param(jax.random.uniform(keys[1], (*lead, m), jnp.float32, -bound, bound),
                                   "adapter")
    self.adapter_up = param(jnp.zeros((*lead, m, out), jnp.float32), "adapter", names[-1])
    self.adapter_up_bias = param(jnp.zeros((*lead, out), jnp.float32), names[-1])
    self.non_linearity = non_linearity
    self.disabled = False

  def delta(self, x, y):
    del x  # the adapter reads the base output
    act = ACTIVATIONS[self.non_linearity]
    h = act(jnp.dot(y, self.adapter_down[...].astype(y.dtype)) + self.adapter_down_bias[...].astype(y.dtype))
    return jnp.dot(h, self.adapter_up[...].astype(y.dtype)) + self.adapter_up_bias[...].astype(y.dtype)

  def peft_tensors(self) -> dict:
    return {"adapter_down.weight": jnp.swapaxes(self.adapter_down[...], -1, -2),
            "adapter_down.bias": self.adapter_down_bias[...],
            "adapter_up.weight": jnp.swapaxes(self.adapter_up[...], -1, -2),
            "adapter_up.bias": self.adapter_up_bias[...]}

  def load_peft_tensors(self, tensors: dict) -> None:
    for suffix, var, transposed in (("adapter_down.weight", self.adapter_down, True),
                                    ("adapter_down.bias", self.adapter_down_bias, False),
                                    ("adapter_up.weight", self.adapter_up, True),
                                    ("adapter_up.bias", self.adapter_up_bias, False)):
      value = np.asarray(tensors[suffix])
      var.set_value(jnp.asarray(np.swapaxes(value, -1, -2) if transposed else value, jnp.float32))
