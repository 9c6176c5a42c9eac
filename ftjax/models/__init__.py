"""Models: the Llama-family decoder as Flax NNX modules, and loading / saving real checkpoints.

  model, tokenizer = ftjax.models.load("smollm2-135m-instruct")  # or a HF dir, .gguf, Hub id
  logits = model(token_ids)                                      # [b, t] int -> [b, t, v] f32
  ftjax.models.save_pretrained(model, "out/", tokenizer)         # a HF model directory
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.models.config import ModelConfig
from ftjax.models.llama import CausalLM, init_cache
from ftjax.models.params import Params, abstract_model, flatten, param_specs

__all__ = ["CausalLM", "ModelConfig", "from_params", "init_cache", "load", "save_pretrained"]


def from_params(cfg: ModelConfig, params: Params, *, dtype=None, place=jax.device_put,
                transform=None) -> CausalLM:
  """A CausalLM holding `params` (a nested dict as the loaders return; numpy or jax arrays).

  dtype: compute dtype (default: the params' dtype). `place` puts the params on devices
  (default: the default device; pass e.g. a sharding-aware function for a mesh). `transform`:
  the structure change the params were loaded for (ftjax.quant.quantize_model with the
  settings of the loader's quant_sinks).
  """
  param_dtype = next(v.dtype for _, v in flatten(params) if jnp.issubdtype(v.dtype, jnp.floating))
  graphdef, _ = nnx.split(abstract_model(cfg, dtype=dtype or param_dtype, param_dtype=param_dtype,
                                         transform=transform))
  return nnx.merge(graphdef, place(params))


def load(name_or_path: str, dtype=jnp.float32, *, compute_dtype=None):
  """Built-in name, HF model directory, .gguf file or Hub id -> (CausalLM, Tokenizer).

  dtype: the storage dtype of the params (and the compute dtype unless `compute_dtype` is set).
  """
  from ftjax.models.resolve import resolve_model
  cfg, params, tokenizer = resolve_model(name_or_path, dtype=jnp.dtype(dtype))
  return from_params(cfg, params, dtype=compute_dtype or dtype), tokenizer


def save_pretrained(model: CausalLM, out_dir: str, tokenizer=None, dtype=np.float32) -> None:
  """Writes `model` as a HF model directory (config.json + safetensors [+ tokenizer files]),
  loadable by `transformers.AutoModelForCausalLM.from_pretrained`."""
  from ftjax.files import atomic_dir
  from ftjax.models.hf import save_hf_config, save_hf_params
  cfg = model.config
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  expected = {s.path for s in param_specs(cfg)}
  extra = sorted(p for p, _ in flatten(params) if p not in expected)
  if extra:
    raise FtjaxError(
        f"save_pretrained: the model has params a plain {cfg.model_type} model lacks (e.g. "
        f"{extra[0]}): adapters are attached. Fold them in with ftjax.peft.merge_and_unload(model) "
        "first, or save them alone with ftjax.peft.save_adapter")
  params = jax.device_get(params)
  with atomic_dir(out_dir) as tmp:
    save_hf_params(params, cfg, tmp, dtype=dtype)
    save_hf_config(cfg, tmp, dtype_name=np.dtype(dtype).name)
    if tokenizer is not None:
      tokenizer.save(tmp)
