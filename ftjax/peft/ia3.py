"""IA3 (Liu et al. 2022, "(IA)^3"): learned per-feature scaling vectors, initialised to ones.

A target layer's output is scaled, y = base(x) · l  (l: [out]; keys and values of attention),
except for `feedforward_modules`, whose *input* is scaled, y = base(x · l)  (l: [in]; the FFN's
hidden activations feeding `down_proj`). As in HF PEFT, the output scale also scales the bias.
Merging multiplies the kernel's output columns (and the bias) or its input rows by l.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.peft.core import (AdapterLayer, AdapterParam, WrapperConfig, as_list, as_tuple,
                             attach_modules_to_save, find_targets, refuse_unsupported,
                             replace_module, stack_sizes, torch_names)

# HF PEFT's defaults by model_type: (target_modules, feedforward_modules).
DEFAULT_TARGETS = {"llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
                   **{t: ("q_proj", "v_proj", "down_proj") for t in ("qwen2", "qwen3", "gemma")}}
DEFAULT_FEEDFORWARD = ("down_proj",)


@dataclasses.dataclass(frozen=True)
class IA3Config(WrapperConfig):
  """HF PEFT's `IA3Config`: target_modules as in LoraConfig; feedforward_modules (a regex or
  names, a subset of the targets) get their input scaled instead of their output."""

  peft_type: ClassVar[str] = "IA3"
  method: ClassVar[str] = "IA3"
  supported: ClassVar[tuple] = (nnx.Linear,)
  default_targets: ClassVar[dict] = DEFAULT_TARGETS

  target_modules: str | tuple[str, ...] | None = None
  feedforward_modules: str | tuple[str, ...] | None = None
  init_ia3_weights: bool = True
  modules_to_save: tuple[str, ...] | None = None
  task_type: str | None = None

  def __post_init__(self):
    for key in ("target_modules", "feedforward_modules", "modules_to_save"):
      value = getattr(self, key)
      if isinstance(value, (list, set)):
        object.__setattr__(self, key, tuple(sorted(value)))
    if (not isinstance(self.target_modules, (str, type(None)))
        and not isinstance(self.feedforward_modules, (str, type(None)))
        and not set(self.feedforward_modules) <= set(self.target_modules)):
      raise FtjaxError(f"IA3Config: feedforward_modules={self.feedforward_modules} must be a "
                       f"subset of target_modules={self.target_modules}")
    if not self.init_ia3_weights:
      raise FtjaxError("IA3Config: init_ia3_weights=False (random scales) is not supported")

  def feedforward(self, model: nnx.Module) -> str | tuple[str, ...]:
    """feedforward_modules, or HF PEFT's default for the model's family."""
    if self.feedforward_modules is not None:
      return self.feedforward_modules
    if getattr(getattr(model, "config", None), "model_type", None) not in DEFAULT_TARGETS:
      raise FtjaxError("IA3Config.feedforward_modules is required for this model (names or a "
                       "regex; () when no layer is a feed-forward one)")
    return DEFAULT_FEEDFORWARD

  def attach(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
    del rngs  # IA3 starts at ones: nothing random
    ff = self.feedforward(model)
    stacks = stack_sizes(model)
    wrapped = set()
    for path, module, _ in find_targets(model, self.targets(model), self.supported, self.method):
      names, _ = torch_names(path, stacks)
      # HF PEFT's rule: a regex fully matches the name, or the name ends with a listed one.
      hits = {re.fullmatch(ff, n) is not None if isinstance(ff, str)
              else any(n.endswith(t) for t in ff) for n in names}
      if len(hits) > 1:
        raise FtjaxError(f"IA3Config: feedforward_modules selects {names[0]} in some layers but "
                         "not all; the layers are stacked and share one adapter shape")
      replace_module(model, path, IA3Linear(module, feedforward=hits.pop()))
      wrapped.add(path)
    attach_modules_to_save(model, self.modules_to_save, wrapped)

  def to_peft(self, model: nnx.Module, adapter_name: str = "default") -> dict:
    ff = self.feedforward(model)
    return {"peft_type": self.peft_type, "task_type": self.task_type,
            "target_modules": self.saved_targets(model, adapter_name),
            "feedforward_modules": ff if isinstance(ff, str) else sorted(ff),
            "init_ia3_weights": True, "fan_in_fan_out": False, "inference_mode": True,
            "modules_to_save": as_list(self.modules_to_save)}

  @classmethod
  def from_peft(cls, raw: dict) -> "IA3Config":
    refuse_unsupported(raw, {"fan_in_fan_out": False,
                             "exclude_modules": None})
    if raw.get("target_modules") is None or raw.get("feedforward_modules") is None:
      raise FtjaxError("missing key 'target_modules' or 'feedforward_modules'")
    return cls(target_modules=as_tuple(raw["target_modules"]),
               feedforward_modules=as_tuple(raw["feedforward_modules"]),
               modules_to_save=as_tuple(raw.get("modules_to_save") or None),
               task_type=raw.get("task_type"))


class IA3Param(AdapterParam):
  """An IA3 scaling vector."""


class IA3Linear(AdapterLayer):
  """IA3 around an `nnx.Linear`: scales its output features, or its input features when
  `feedforward`. In a layer stack the vector has the kernel's leading layer axis."""

  def __init__(self, base_layer: nnx.Linear, *, feedforward: bool):
    kernel = base_layer.kernel
    names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    axis = -2 if feedforward else -1
    shape = (*kernel.shape[:-2], kernel.shape[axis])
    self.base_layer = base_layer
    self.ia3_l = IA3Param(jnp.ones(shape, jnp.float32), out_sharding=(*names[:-2], names[axis]),
                          eager_sharding=False)
    self.feedforward = feedforward
    self.disabled = False

  def __call__(self, x):
    if self.off:
      return self.base_layer(x)
    scale = self.ia3_l[...]
    if self.feedforward:
      return self.base_layer((x * scale).astype(x.dtype))
    y = self.base_layer(x)
    return (y * scale).astype(y.dtype)

  def fold(self, inverse: bool = False) -> None:
    """Scales the kernel's input rows or output columns (and the bias) by l, or by 1/l."""
    base = self.base_linear()
    scale = self.ia3_l[...]
    scale = 1.0 / scale if inverse else scale
    weight = jnp.asarray(base.kernel[...], jnp.float32)
    weight = weight * (scale[..., :, None] if self.feedforward else scale[..., None, :])
    base.kernel.set_value(weight.astype(base.kernel.dtype))
    if base.bias is not None and not self.feedforward:
      base.bias.set_value((jnp.asarray(base.bias[...], jnp.float32) * scale).astype(base.bias.dtype))

  def unfold(self) -> None:
    self.fold(inverse=True)

  # HF PEFT layout: ia3_l [out, 1] for an output scale, [1, in] for an input (feedforward) scale.
  def peft_tensors(self) -> dict:
    scale = self.ia3_l[...]
    return {"ia3_l": scale[..., None, :] if self.feedforward else scale[..., :, None]}

  def load_peft_tensors(self, tensors: dict) -> None:
    self.ia3_l.set_value(jnp.asarray(np.asarray(tensors["ia3_l"]).reshape(self.ia3_l.shape), jnp.float32))
