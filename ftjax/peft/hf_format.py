"""HF PEFT's on-disk adapter format, both ways: what `peft.PeftModel.from_pretrained` reads and
what `PeftModel.save_pretrained` writes.

A folder with `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
"base_model.model.<module name>.<tensor>", e.g.
"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" [r, in] (torch layout);
the adapter's name ("default") is not part of the saved keys.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ftjax.errors import FtjaxError
from ftjax.files import ADAPTER, atomic_dir, read_json
from ftjax.peft.core import PeftConfig, adapter_layers, stack_sizes, torch_names, unload
from ftjax.peft.named import CONFIG_TYPES, active_adapters, add_adapter, configs, delete_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _named(model: nnx.Module, adapter_name: str | None, what: str) -> str:
  """`adapter_name`, or the model's only (or only active) adapter when None."""
  known = configs(model)
  if not known:
    raise FtjaxError(f"{what}: the model has no adapter attached (use ftjax.peft.get_peft_model "
                     "or load_adapter first)")
  if adapter_name is None:
    candidates = list(known) if len(known) == 1 else list(active_adapters(model))
    if len(candidates) != 1:
      raise FtjaxError(f"{what}: the model has adapters {sorted(known)}; name one (adapter_name=)")
    adapter_name = candidates[0]
  if adapter_name not in known:
    raise FtjaxError(f"{what}: no adapter named {adapter_name!r}; the model has {sorted(known)}")
  return adapter_name


def adapter_state_dict(model: nnx.Module, adapter_name: str | None = None) -> dict[str, np.ndarray]:
  """Every tensor of one adapter under its HF PEFT key, as contiguous f32 numpy arrays."""
  adapter_name = _named(model, adapter_name, "adapter_state_dict")
  stacks = stack_sizes(model)
  out = {}
  for path, layer in adapter_layers(model):
    if layer.adapter_name != adapter_name:
      continue
    names, stacked = torch_names(path, stacks)
    selected = layer.layer_selected() or [True] * len(names)
    for suffix, value in jax.device_get(layer.peft_tensors()).items():
      value = np.asarray(value, np.float32)
      for key, tensor, on in zip(_keys(layer, names, suffix), value if stacked else [value], selected):
        if on:  # layers_to_transform: only the adapted layers are in the file
          out[key] = np.ascontiguousarray(tensor)
  return out


def _keys(layer, names: list[str], suffix: str) -> list[str]:
  """The file's keys of one adapter tensor, one per layer of a stack."""
  if not layer.peft_prefixed:  # prompt / prefix tuning: the bare name
    return [suffix]
  rename = getattr(layer, "peft_name", lambda name: name)  # the MoE blocks' transformers 5 names
  return [f"{PREFIX}{rename(name)}.{suffix}" for name in names]


def save_adapter(model: nnx.Module, out_dir: str, base_model_name_or_path: str | None = None,
                 *, adapter_name: str | None = None, overwrite: bool = False) -> None:
  """Writes one attached adapter (default: the only or only active one) in HF PEFT's format,
  whole or not at all. `out_dir`: new, empty or a previous adapter export (replaced); a folder
  holding anything else is refused unless `overwrite`, and even then only the adapter's two
  files are replaced there (ftjax.files.atomic_dir)."""
  adapter_name = _named(model, adapter_name, "save_adapter")
  config = configs(model)[adapter_name]
  with atomic_dir(out_dir, ADAPTER, overwrite) as tmp:
    save_file(adapter_state_dict(model, adapter_name), os.path.join(tmp, WEIGHTS_FILE),
              metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump({**config.to_peft(model, adapter_name),
                 "base_model_name_or_path": base_model_name_or_path}, f, indent=2)


def read_config(adapter_dir: str) -> PeftConfig:
  """The config of the adapter saved in `adapter_dir`, for any method ftjax reads."""
  path = os.path.join(adapter_dir, CONFIG_FILE)
  raw = read_json(path, f" (is {adapter_dir} a PEFT adapter folder?)")
  kind = CONFIG_TYPES.get(raw.get("peft_type"))
  if kind is None:
    raise FtjaxError(f"{path}: peft_type={raw.get('peft_type')!r}; supported: "
                     f"{', '.join(map(repr, CONFIG_TYPES))}")
  _check_numbers(raw, path)
  try:
    return kind.from_peft(raw)
  except KeyError as e:
    raise FtjaxError(f"{path}: missing key {e.args[0]!r}") from None
  except (FtjaxError, TypeError, ValueError) as e:
    raise FtjaxError(f"{path}: {e}") from None


# Numeric adapter_config.json keys: a string there ("16") would only fail deep inside the first
# forward pass (or, for lora_alpha, scale by a str), far from the file that holds it.
_NUMERIC_KEYS = ("r", "lora_alpha", "lora_dropout", "num_virtual_tokens", "reduction_factor")
_NUMERIC_MAPS = ("rank_pattern", "alpha_pattern")


def _check_numbers(raw: dict, path: str) -> None:
  def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)

  for key in _NUMERIC_KEYS:
    if raw.get(key) is not None and not number(raw[key]):
      raise FtjaxError(f"{path}: {key}={raw[key]!r} is not a number; write it without quotes, "
                       "e.g. 16")
  for key in _NUMERIC_MAPS:
    for pattern, value in (raw.get(key) or {}).items():
      if not number(value):
        raise FtjaxError(f"{path}: {key}[{pattern!r}]={value!r} is not a number")


def load_adapter(model: nnx.Module, adapter_dir: str, *, adapter_name: str = "default",
                 rngs=0) -> nnx.Module:
  """Attaches the adapter saved in `adapter_dir` (by ftjax or by HF PEFT) to `model` in place
  and returns it: active on a model without adapters, inactive beside existing ones (then
  `set_adapter`). Every tensor of the file must find its module, and every adapted module its
  tensors; a failed load leaves the model as it was."""
  config = read_config(adapter_dir)
  if adapter_name in configs(model):
    raise FtjaxError(f"load_adapter: the model already has an adapter named {adapter_name!r}")
  model = add_adapter(model, adapter_name, config, rngs=rngs)
  try:
    _load_tensors(model, adapter_dir, adapter_name)
  except BaseException:
    if len(configs(model)) > 1:
      delete_adapter(model, adapter_name)
    else:
      unload(model)
    raise
  return model


# Fields of a saved adapter's config that must equal the attached one's for its tensors to mean
# the same thing (shapes are checked tensor by tensor; the scale and the wrapper are not).
_SAME = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
         "num_virtual_tokens", "feedforward_modules", "reduction_factor")


def load_adapter_weights(model: nnx.Module, adapter_dir: str, adapter_name: str) -> None:
  """Fills `model`'s attached adapter `adapter_name` with the tensors saved in `adapter_dir`
  (ftjax's or HF PEFT's): a run that continues training a previous adapter. The saved config
  must be the same method with the same rank / scale settings (_SAME); every tensor must find
  its module, with its shape."""
  # As applied to this model: a MoE "all-linear" config saves as peft rewrites it (experts.py)
  resolve = lambda c: c.resolved(model) if hasattr(c, "resolved") else c  # noqa: E731
  saved, attached = resolve(read_config(adapter_dir)), resolve(configs(model)[adapter_name])
  if type(saved) is not type(attached):
    raise FtjaxError(f"{adapter_dir}: a {saved.method} adapter; this run attaches {attached.method}")
  for field in _SAME:
    if getattr(saved, field, None) != getattr(attached, field, None):
      raise FtjaxError(f"{adapter_dir}: {field}={getattr(saved, field)!r} in its adapter_config.json, "
                       f"{getattr(attached, field)!r} in this run's config; they must match to "
                       "continue training it")
  _load_tensors(model, adapter_dir, adapter_name)


def _load_tensors(model: nnx.Module, adapter_dir: str, adapter_name: str) -> None:
  weights = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise FtjaxError(f"{weights}: no such file")
  try:
    f = safe_open(weights, framework="np")
  except SafetensorError as e:
    raise FtjaxError(f"{weights}: damaged safetensors file ({e}); it is probably truncated (an "
                     "interrupted copy or download): save or download the adapter again") from None
  with f:
    available = set(f.keys())
    stacks = stack_sizes(model)
    used = set()
    for path, layer in adapter_layers(model):
      if layer.adapter_name != adapter_name:
        continue
      names, stacked = torch_names(path, stacks)
      selected = layer.layer_selected() or [True] * len(names)
      tensors = {}
      for suffix, expected in layer.peft_tensors().items():
        want = expected.shape[1:] if stacked else expected.shape
        arrays = []
        for i, key in enumerate(_keys(layer, names, suffix)):
          if not selected[i]:  # a layer layers_to_transform leaves out: keep the init
            arrays.append(np.asarray(expected[i]))
            continue
          if key not in available:
            raise FtjaxError(f"{weights}: missing tensor {key!r} (expected shape {want})")
          arrays.append(f.get_tensor(key))
          if arrays[-1].shape != want:
            raise FtjaxError(f"{weights}: tensor {key!r} has shape {arrays[-1].shape}, expected "
                             f"{want}")
          used.add(key)
        tensors[suffix] = np.stack(arrays) if stacked else arrays[0]
      layer.load_peft_tensors(tensors)
  unused = sorted(available - used)
  if unused:
    raise FtjaxError(f"{weights}: tensor {unused[0]!r} matches no adapted module of this model"
                     + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))
