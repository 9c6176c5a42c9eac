"""Named adapters on one base model, HF PEFT's lifecycle: attach, add, switch, delete.

Every attached adapter has a name ("default" unless given). Several can sit on one base: a
layer adapted twice holds a chain of wrappers (each the next one's base_layer), and the
decoder's virtual-token slots take one prompt and one prefix. `set_adapter` chooses which are
active, without reloading anything; inactive ones compute nothing and, through
`trainable(model)`, train nothing. Combinations act together when activated together (e.g.
LoRA + prompt tuning: `set_adapter(model, ["lora", "prompt"])`).

The model records its configs in `model.peft_config` ({name: config}, as PEFT's PeftModel
does; a FrozenDict, since it is part of the model's static graph) and the active names in
`model.peft_active`.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx
from flax.core import FrozenDict

from ftjax.errors import FtjaxError
from ftjax.peft.bottleneck import BottleneckAdapterConfig
from ftjax.peft.core import (AdapterParam, PeftConfig, adapter_layers, check_adapter_name,
                              replace_module)
from ftjax.peft.ia3 import IA3Config
from ftjax.peft.lora import LoraConfig
from ftjax.peft.prompt import PrefixTuningConfig, PromptTuningConfig

# adapter_config.json's peft_type -> the config class that reads it
CONFIG_TYPES = {c.peft_type: c for c in (LoraConfig, IA3Config, PromptTuningConfig,
                                         PrefixTuningConfig, BottleneckAdapterConfig)}


def configs(model: nnx.Module) -> dict[str, PeftConfig]:
  """{adapter name: config} of the adapters attached to `model`."""
  return dict(getattr(model, "peft_config", None) or {})


def active_adapters(model: nnx.Module) -> tuple[str, ...]:
  return tuple(getattr(model, "peft_active", None) or ())


def _attach(model: nnx.Module, config: PeftConfig, adapter_name: str, rngs) -> None:
  """Attaches `config` and labels what it added with `adapter_name`: the wrappers, and their
  own params through the `adapter_name` metadata (what `trainable` selects by)."""
  check_adapter_name(adapter_name)
  if not isinstance(config, PeftConfig):
    raise FtjaxError(f"unsupported config {type(config).__name__}; supported: "
                     f"{', '.join(c.__name__ for c in CONFIG_TYPES.values())}")
  before = {id(layer) for _, layer in adapter_layers(model)}
  config.attach(model, nnx.Rngs(rngs) if isinstance(rngs, int) else rngs)
  for _, layer in adapter_layers(model):
    if id(layer) in before:
      continue
    layer.adapter_name = adapter_name
    for path, var in nnx.to_flat_state(nnx.state(layer, AdapterParam)):
      if "base_layer" not in (str(p) for p in path):  # not an inner wrapper's
        var.set_metadata(adapter_name=adapter_name)


def get_peft_model(model: nnx.Module, config: PeftConfig, *, adapter_name: str = "default",
                   rngs: nnx.Rngs | int = 0) -> nnx.Module:
  """Attaches the adapter `config` describes to `model` in place, active, and returns the model.

  LoRA / DoRA wrap every `nnx.Linear` (LoRA also `nnx.Einsum`) that `config.target_modules`
  selects, IA3 and bottleneck adapters every `nnx.Linear`; prompt and prefix tuning fill the
  decoder's virtual-token slots. At init the outputs equal the base model's wherever the
  method's init guarantees it. `rngs` seeds the adapter's init (and, for layers outside a layer
  stack, LoRA's dropout stream).
  """
  if configs(model) or any(True for _ in adapter_layers(model)):
    raise FtjaxError("get_peft_model: the model already has an adapter; add another with "
                     "ftjax.peft.add_adapter(model, name, config)")
  _attach(model, config, adapter_name, rngs)
  model.peft_config = FrozenDict({adapter_name: config})
  model.peft_active = (adapter_name,)
  return model


def add_adapter(model: nnx.Module, adapter_name: str, config: PeftConfig, *,
                rngs: nnx.Rngs | int = 0) -> nnx.Module:
  """Attaches one more adapter, inactive until `set_adapter` (as HF PEFT's add_adapter)."""
  known = configs(model)
  if not known:
    return get_peft_model(model, config, adapter_name=adapter_name, rngs=rngs)
  if adapter_name in known:
    raise FtjaxError(f"add_adapter: the model already has an adapter named {adapter_name!r}")
  _attach(model, config, adapter_name, rngs)
  for _, layer in adapter_layers(model):
    if layer.adapter_name == adapter_name:
      layer.disabled = True
  model.peft_config = FrozenDict({**known, adapter_name: config})
  return model


def set_adapter(model: nnx.Module, adapter_names: str | Sequence[str]) -> nnx.Module:
  """Makes exactly `adapter_names` active (one name or several, which then act together)."""
  names = (adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names)
  unknown = [n for n in names if n not in configs(model)]
  if unknown:
    raise FtjaxError(f"set_adapter: no adapter named {unknown[0]!r}; the model has "
                     f"{sorted(configs(model))}")
  for _, layer in adapter_layers(model):
    layer.disabled = layer.adapter_name not in names
  model.peft_active = names
  return model


def delete_adapter(model: nnx.Module, adapter_name: str) -> nnx.Module:
  """Removes one adapter (its wrappers, params and config); the others stay as they were."""
  known = configs(model)
  if adapter_name not in known:
    raise FtjaxError(f"delete_adapter: no adapter named {adapter_name!r}; the model has {sorted(known)}")
  for path, layer in list(adapter_layers(model)):
    if layer.adapter_name == adapter_name:
      replace_module(model, path, layer.base_layer)
  del known[adapter_name]
  model.peft_config = FrozenDict(known)
  model.peft_active = tuple(n for n in active_adapters(model) if n != adapter_name)
  return model


def trainable(model: nnx.Module):
  """An nnx filter: the params of the active adapters, i.e. what a train step should update
  (inactive adapters must not move, not even by weight decay)."""
  active = set(active_adapters(model))

  def select(path, var) -> bool:
    return isinstance(var, AdapterParam) and var.get_metadata().get("adapter_name") in active

  return select
