"""Models: the Llama-family decoder as Flax NNX modules, and loading / saving real checkpoints.

  model, tokenizer = ftjax.models.load("smollm2-135m-instruct")  # or a HF dir, .gguf, Hub id
  logits = model(token_ids)                                      # [b, t] int -> [b, t, v] f32
  ftjax.models.save_pretrained(model, "out/", tokenizer)         # a HF model directory
  ftjax.models.save_gguf(model, "out/m.gguf", tokenizer, type="q8_0")  # llama.cpp / Ollama
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import quant
from ftjax.errors import FtjaxError
from ftjax.files import MERGED, atomic_dir, check_export_target
from ftjax.models import gguf_write
from ftjax.models.config import ModelConfig
from ftjax.models.hf import save_hf_config, save_hf_params
from ftjax.models.llama import CausalLM, init_cache
from ftjax.models.params import abstract_model, param_specs
from ftjax.models.resolve import resolve_model, stored_quantisation
from ftjax.models.sharded import collect_mesh_sinks, mesh_sinks
from ftjax.quant import bnb
from ftjax.quant.linear import QuantLinear
from ftjax.tree import Params, flatten

__all__ = ["CausalLM", "ModelConfig", "from_params", "init_cache", "load", "resolve_params", "save_gguf",
           "save_pretrained", "shrink_layers"]

# How save_gguf folds attached adapters in: ftjax.peft sets it when it loads (peft.merged_model,
# refusing an adapter with no merged form). models/ never imports peft/ (docs/design.md,
# "Layers"); a model holds adapters only through ftjax.peft, and ftjax/__init__.py loads it, so
# it is set before any model can reach save_gguf.
_merge_adapters = None


def set_adapter_merge(merge) -> None:
  """`merge(model)` -> a float model with its adapters folded in (ftjax.peft calls this)."""
  global _merge_adapters
  _merge_adapters = merge


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


def resolve_params(name_or_path: str, dtype=jnp.float32, *, quantize=None, mesh=None):
  """Model reference -> (ModelConfig, params, Tokenizer, transform) for `from_params`.

  quantize: ftjax.quant.quantize_model's settings (e.g. dict(quant_type="nf4")) to load the
  linear kernels in 4 bits, quantised layer by layer as they are read; None keeps a checkpoint
  as stored (a bitsandbytes load_in_4bit checkpoint stays 4-bit, its bytes unchanged; any
  other loads in float); False loads float (a 4-bit checkpoint dequantised).
  mesh: a jax Mesh with ftjax's axes (ftjax.parallel.sharding.make_mesh): each float param is
  created on it, sharded by its logical axes, and filled as it is read (ftjax.models.sharded),
  so the model is never whole in host memory; None returns numpy arrays.
  """
  settings = stored_quantisation(name_or_path) if quantize is None else (quantize or None)
  allocate = quant.quant_sinks(**settings) if settings else None
  if mesh is not None:
    allocate = mesh_sinks(mesh, fallback=allocate)
  cfg, params, tokenizer = resolve_model(name_or_path, dtype=jnp.dtype(dtype), allocate=allocate)
  params = collect_mesh_sinks(params)
  if not settings:
    return cfg, params, tokenizer, None
  return (cfg, quant.collect_sinks(params), tokenizer,
          functools.partial(quant.quantize_model, **settings))


def shrink_layers(params: Params, cfg: ModelConfig, num_layers: int) -> tuple[Params, ModelConfig]:
  """Keep the first `num_layers` layers (tests, `runlocal` configs, a smoke run; 0 keeps all).
  `params` may be None: only the config is cut (an abstract model, ftjax.plan)."""
  if not num_layers or num_layers >= cfg.num_layers:
    return params, cfg
  if params is not None:
    layers = jax.tree.map(lambda x: x[:num_layers], params["model"]["layers"])
    params = dict(params, model=dict(params["model"], layers=layers))
  return params, cfg.replace(num_layers=num_layers)


def load(name_or_path: str, dtype=jnp.float32, *, compute_dtype=None, quantize=None, mesh=None,
         num_layers: int = 0, place=jax.device_put):
  """Built-in name, HF model directory, .gguf file or Hub id -> (CausalLM, Tokenizer).

  dtype: the storage dtype of the float params (and the compute dtype unless `compute_dtype`
  is set). quantize: 4-bit loading, as in `resolve_params` (default: as stored). mesh: load
  straight onto it, sharded by the params' logical axes (see `resolve_params`). num_layers:
  keep only the first ones (0: all). place: as in `from_params` (a run that places the params
  itself passes `lambda p: p`). The one path from a reference to a model: ftjax.run.setup and
  ftjax.notebook.load_model load through it.
  """
  cfg, params, tokenizer, transform = resolve_params(name_or_path, dtype, quantize=quantize,
                                                     mesh=mesh)
  params, cfg = shrink_layers(params, cfg, num_layers)
  return (from_params(cfg, params, dtype=compute_dtype or dtype, place=place, transform=transform),
          tokenizer)


def save_gguf(model: CausalLM, path: str, tokenizer, type: str = "f16",  # noqa: A002
              name: str | None = None) -> dict:
  """`model` (adapters folded in, a 4-bit base dequantised first) as one GGUF file for llama.cpp /
  Ollama / LM Studio (ftjax.models.gguf_write.save_gguf writes it). Returns {"path", "bytes",
  "type", "eot_token"}."""
  gguf_write.check_type(type)  # before merging
  merged = _merge_adapters(model) if _merge_adapters is not None else model
  return gguf_write.save_gguf(merged, path, tokenizer, type=type, name=name)


def save_pretrained(model: CausalLM, out_dir: str, tokenizer=None, dtype=np.float32,
                    max_shard_size: int | str = "5GB", overwrite: bool = False) -> None:
  """Writes `model` as a HF model directory (config.json + safetensors [+ tokenizer files]),
  loadable by `transformers.AutoModelForCausalLM.from_pretrained`. A 4-bit model (QuantLinear
  kernels) is written as transformers + bitsandbytes write a load_in_4bit model, same bytes.

  Streams from the (possibly sharded) arrays one layer at a time; files of at most
  `max_shard_size` (bytes, or "5GB" / "500MiB" as in transformers) with the standard
  model.safetensors.index.json when there are several. The tree is never gathered whole.

  `out_dir`: new, empty or a previous export (replaced); a folder holding anything else is
  refused unless `overwrite`, and even then only the export's own files (config.json,
  model*.safetensors, tokenizer files) are replaced there (ftjax.files.atomic_dir)."""
  check_export_target(out_dir, MERGED, overwrite)  # before any work
  cfg = model.config
  in_4bit = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, QuantLinear)}
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  expected = {s.path for s in param_specs(cfg)}
  extra = sorted(p for p, _ in flatten(params) if p not in expected
                 and p.rsplit("/", 1)[0] not in in_4bit)
  if extra:
    raise FtjaxError(
        f"save_pretrained: the model has params a plain {cfg.model_type} model lacks (e.g. "
        f"{extra[0]}): adapters are attached. Fold them in with ftjax.peft.merge_and_unload(model) "
        "first, or save them alone with ftjax.peft.save_adapter")
  if any(m.quant_type == "int8" for m in in_4bit.values()):
    raise FtjaxError("save_pretrained: int8 kernels have no HF checkpoint format; dequantise "
                     "them first (ftjax.quant.dequantize_model)")
  quantised = {f"{path}/kernel": lambda i, m=m: jax.device_get(m.quantized(i))
               for path, m in in_4bit.items()}
  quant_config = None
  if in_4bit:
    first = next(iter(in_4bit.values()))
    float_linears = sorted({str(p[-1]) for p, m in nnx.iter_modules(model)
                            if isinstance(m, nnx.Linear) and p} | {"lm_head"})
    quant_config = bnb.quantization_config(first.quant_type, first.absmax_scale is not None,
                                           float_linears, np.dtype(first.dtype).name)
  with atomic_dir(out_dir, MERGED, overwrite) as tmp:
    save_hf_params(params, cfg, tmp, dtype=dtype, quantised=quantised,
                   max_shard_bytes=max_shard_size)
    save_hf_config(cfg, tmp, dtype_name=np.dtype(dtype).name, quantization_config=quant_config)
    if tokenizer is not None:
      tokenizer.save(tmp)
