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
from safetensors import safe_open
from safetensors.numpy import save_file

from ftjax.errors import FtjaxError
from ftjax.files import atomic_dir, read_json
from ftjax.peft.core import adapter_layers, stack_sizes, torch_names
from ftjax.peft.lora import LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _peft_config_dict(config: LoraConfig, target_names: list[str], base_model: str | None) -> dict:
  # A regex stays a regex (it means the same to PEFT: module names match ours); names and
  # "all-linear" are written as the list of wrapped names, as PEFT itself saves "all-linear".
  regex = isinstance(config.target_modules, str) and config.target_modules != "all-linear"
  targets = config.target_modules if regex else target_names
  return {
      "peft_type": "LORA", "task_type": config.task_type,
      "base_model_name_or_path": base_model, "r": config.r, "lora_alpha": config.lora_alpha,
      "lora_dropout": config.lora_dropout, "target_modules": targets,
      "use_rslora": config.use_rslora, "use_dora": config.use_dora, "bias": config.bias,
      "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
      "init_lora_weights": config.init_lora_weights, "rank_pattern": {}, "alpha_pattern": {},
      "layers_to_transform": None,
  }


def adapter_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """Every adapter tensor under its HF PEFT key, as contiguous f32 numpy arrays."""
  stacks = stack_sizes(model)
  out = {}
  for path, layer in adapter_layers(model):
    names, stacked = torch_names(path, stacks)
    for suffix, value in jax.device_get(layer.peft_tensors()).items():
      value = np.asarray(value, np.float32)
      for name, tensor in zip(names, value if stacked else [value]):
        out[f"{PREFIX}{name}.{suffix}"] = np.ascontiguousarray(tensor)
  return out


def save_adapter(model: nnx.Module, out_dir: str, base_model_name_or_path: str | None = None) -> None:
  """Writes the attached LoRA adapter in HF PEFT's format (written whole or not at all)."""
  config = getattr(model, "peft_config", None)
  if config is None:
    raise FtjaxError("save_adapter: the model has no adapter attached (use "
                     "ftjax.peft.get_peft_model or load_adapter first)")
  targets = sorted({path.rsplit("/", 1)[-1] for path, _ in adapter_layers(model)})
  with atomic_dir(out_dir) as tmp:
    save_file(adapter_state_dict(model), os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(_peft_config_dict(config, targets, base_model_name_or_path), f, indent=2)


# Keys of adapter_config.json that ftjax cannot honour yet when they are set: refuse, don't
# silently load a different adapter.
_UNSUPPORTED = {"modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
                "layers_pattern": None, "use_qalora": False}


def read_config(adapter_dir: str) -> LoraConfig:
  path = os.path.join(adapter_dir, CONFIG_FILE)
  raw = read_json(path, f" (is {adapter_dir} a PEFT adapter folder?)")
  if raw.get("peft_type") != "LORA":
    raise FtjaxError(f"{path}: peft_type={raw.get('peft_type')!r}; supported: 'LORA'")
  for key, default in _UNSUPPORTED.items():
    if raw.get(key) not in (default, None, {}, [], False):
      raise FtjaxError(f"{path}: {key}={raw[key]!r} is not supported yet")
  init = raw.get("init_lora_weights", True)
  targets = raw.get("target_modules")
  if targets is None:
    raise FtjaxError(f"{path}: missing key 'target_modules'")
  try:
    return LoraConfig(
        r=int(raw["r"]), lora_alpha=raw.get("lora_alpha", 8),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=float(raw.get("lora_dropout") or 0.0), use_rslora=bool(raw.get("use_rslora")),
        init_lora_weights="gaussian" if init == "gaussian" else True,
        use_dora=bool(raw.get("use_dora")),
        bias=raw.get("bias") or "none", task_type=raw.get("task_type"))
  except KeyError as e:
    raise FtjaxError(f"{path}: missing key {e.args[0]!r}") from None
  except FtjaxError as e:
    raise FtjaxError(f"{path}: {e}") from None


def load_adapter(base_model: nnx.Module, adapter_dir: str, *, rngs=0) -> nnx.Module:
  """Attaches the adapter saved in `adapter_dir` (by ftjax or by HF PEFT) to `base_model` in
  place and returns it. Every tensor of the file must find its module, and every adapted
  module its tensors."""
  from ftjax.peft import get_peft_model
  config = read_config(adapter_dir)
  model = get_peft_model(base_model, config, rngs=rngs)
  weights = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise FtjaxError(f"{weights}: no such file")
  with safe_open(weights, framework="np") as f:
    available = set(f.keys())
    stacks = stack_sizes(model)
    used = set()
    for path, layer in adapter_layers(model):
      names, stacked = torch_names(path, stacks)
      tensors = {}
      for suffix, expected in layer.peft_tensors().items():
        want = expected.shape[1:] if stacked else expected.shape
        arrays = []
        for name in names:
          key = f"{PREFIX}{name}.{suffix}"
          if key not in available:
            raise FtjaxError(f"{weights}: missing tensor {key!r} (expected shape {want})")
          arrays.append(f.get_tensor(key))
          if arrays[-1].shape != want:
            raise FtjaxError(f"{weights}: tensor {key!r} has shape {arrays[-1].shape}, expected "
                             f"{want} (r={config.r})")
          used.add(key)
        tensors[suffix] = np.stack(arrays) if stacked else arrays[0]
      layer.load_peft_tensors(tensors)
  unused = sorted(available - used)
  if unused:
    raise FtjaxError(f"{weights}: tensor {unused[0]!r} matches no adapted module of this model"
                     + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))
  return model
