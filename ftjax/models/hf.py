"""HF safetensors directories in and out.

Loading streams one tensor at a time from memory-mapped safetensors files into preallocated,
layer-stacked host arrays: peak host memory is the params themselves plus one tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ftjax.errors import FtjaxError
from ftjax.files import read_json
from ftjax.models.config import ModelConfig
from ftjax.models.params import param_specs
from ftjax.quant import bnb
from ftjax.quant.fourbit import dequantize_4bit
from ftjax.quant.linear import QuantSink
from ftjax.tree import Params, flatten, get_path, set_path

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def tensor_files(model_dir: str) -> dict[str, str]:
  """HF tensor name -> safetensors file path."""
  index_path = os.path.join(model_dir, INDEX_FILE)
  if os.path.exists(index_path):
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      raise FtjaxError(f"{index_path}: expected a 'weight_map' object")
    return {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
  files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  if not files:
    raise FtjaxError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (is this a HF model directory?)")
  out = {}
  for file in files:
    path = os.path.join(model_dir, file)
    with safe_open(path, framework="np") as f:
      out.update({name: path for name in f.keys()})
  return out


def load_hf_params(model_dir: str, cfg: ModelConfig, dtype=np.float32, allocate=None,
                   read_elsewhere: tuple[str, ...] = ()) -> Params:
  """Reads every tensor named by `param_specs(cfg)` into a params tree of numpy arrays.

  read_elsewhere: tensor names the caller reads itself (a classifier's `score.weight`), not
  refused as unused.
  allocate(spec, dtype): what each param is written into, layer by layer (default: an empty
  float array of its shape; ftjax.quant.quant_sinks quantises kernels as they arrive).
  """
  where, stored = _text_model_tensors(model_dir, tensor_files(model_dir))
  by_file: dict[str, list[tuple[Any, int | None, str]]] = {}
  params: Params = {}
  for spec in param_specs(cfg):
    array = allocate(spec, dtype) if allocate else np.empty(spec.shape, dtype)
    set_path(params, spec.path, array)
    for i, name in spec.hf_items(cfg.num_layers):
      if name not in where:
        if spec.path == "lm_head/kernel":  # some tied checkpoints still say tie=False
          raise FtjaxError(f"{model_dir}: missing tensor {name!r} (expected shape "
                           f"{spec.shape[::-1]}); set tie_word_embeddings if the head is tied")
        raise FtjaxError(f"{model_dir}: missing tensor {name!r} for {spec.path}")
      by_file.setdefault(where[name], []).append((spec, i, name))
  _refuse_unused(model_dir, cfg, where, [name for items in by_file.values() for _, _, name in items]
                 + [name for name in read_elsewhere if name in where])
  for path, items in by_file.items():
    with safe_open(path, framework="np") as f:
      for spec, i, name in items:
        if bnb.quant_state_key(name, where):  # a bitsandbytes 4-bit weight
          _put_4bit(get_path(params, spec.path), spec, i, name, where, stored)
          continue
        tensor = f.get_tensor(stored.get(name, name))
        if spec.transpose:
          tensor = tensor.T
        target = get_path(params, spec.path)
        expected = spec.item_shape(i)
        if tensor.shape != tuple(expected):
          got = tensor.T.shape if spec.transpose else tensor.shape
          want = tuple(expected)[::-1] if spec.transpose else tuple(expected)
          raise FtjaxError(f"{path}: tensor {name!r} has shape {got}, expected {want}")
        if i is None:
          target[...] = tensor
        else:
          target[i] = tensor
  return params


# Where a multimodal checkpoint (Gemma3ForConditionalGeneration) keeps its text model: written
# by transformers 5, and by 4 -> the decoder's own names.
_TEXT_MODEL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head."))


def _text_model_tensors(model_dir: str, where: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
  """A multimodal checkpoint's text-model tensors under the decoder's names (the vision tower
  and projector are left out, with a log line); any other checkpoint as it is. Returns
  ({decoder name: file}, {decoder name: name stored in the file} for the renamed ones)."""
  if not any(n.startswith(old) for n in where for old, _ in _TEXT_MODEL_PREFIXES):
    return where, {}
  text, stored, other = {}, {}, []
  for name, path in where.items():
    new = next((new + name[len(old):] for old, new in _TEXT_MODEL_PREFIXES if name.startswith(old)),
               name if name == _TIED_HEAD else None)
    if new is None:
      other.append(name)
    else:
      text[new], stored[new] = path, name
  log.info("%s: loading the text model of a multimodal checkpoint; %d other tensor(s) (vision "
           "tower, projector) left out", model_dir, len(other))
  return text, stored


# Tensors transformers itself skips without a word (the models' `_keys_to_ignore_on_load_unexpected`):
# a rotary `inv_freq` cache older Llama checkpoints stored (recomputed from the config), and a
# head stored although the config ties it (transformers re-ties it to the embedding, so the
# stored copy goes unused there too).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_TIED_HEAD = "lm_head.weight"


def _refuse_unused(model_dir: str, cfg: ModelConfig, where: dict[str, str], used: list[str]) -> None:
  """FtjaxError naming the checkpoint's tensors the config does not read: a config with fewer
  layers than the weights (or of another model) must not load as if it matched. A 4-bit
  tensor's quant state (`NAME.absmax`, ...) counts as read with it; tensors transformers also
  skips are logged, not refused."""
  read = set(used)
  four_bit = tuple(f"{name}." for name in used if bnb.quant_state_key(name, where))
  unused = sorted(n for n in where if n not in read and not n.startswith(four_bit))
  skipped = [n for n in unused if _IGNORED.search(n) or (n == _TIED_HEAD and cfg.tie_word_embeddings)]
  if skipped:
    log.warning("%s: ignoring %d tensor(s) transformers also ignores: %s", model_dir, len(skipped),
                ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
  unused = [n for n in unused if n not in skipped]
  if not unused:
    return
  layers = sorted({int(m.group(1)) for n in unused if (m := re.match(r"model\.layers\.(\d+)\.", n))})
  hint = (f"; the checkpoint has layers up to {layers[-1]} but the config has num_hidden_layers="
          f"{cfg.num_layers}" if layers and layers[0] >= cfg.num_layers else
          "; is config.json the one these weights were saved with?")
  raise FtjaxError(f"{model_dir}: {len(unused)} tensor(s) in the checkpoint are not used by its "
                   f"config: {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}{hint}")


def _put_4bit(target, spec, i: int | None, name: str, where: dict[str, str],
              stored: dict[str, str]) -> None:
  """Writes a bitsandbytes 4-bit weight into a QuantSink (its bytes as stored) or, dequantised,
  into a float array."""

  def read(key):
    with safe_open(where[key], framework="np") as f:
      return f.get_tensor(stored.get(key, key))
  q = bnb.read_4bit(name, bnb.quant_state_key(name, where), read)
  expected = spec.item_shape(i)
  if not spec.transpose or tuple(q.shape) != expected[::-1]:
    raise FtjaxError(f"{where[name]}: 4-bit tensor {name!r} has shape {list(q.shape)}, expected "
                     f"{list(expected[::-1])} (a checkpoint of another model?)")
  index = i if i is not None else Ellipsis
  if isinstance(target, QuantSink):
    target.put_quantized(index, q, name)
  else:
    target[index] = np.asarray(dequantize_4bit(q, np.float32)).T


def parse_size(size: int | str) -> int:
  """A shard size as transformers' `max_shard_size` takes it: bytes, or "5GB" (10^9), "500MiB"."""
  if isinstance(size, int):
    return size
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1}
  text = str(size).strip().upper()
  for unit in sorted(units, key=len, reverse=True):
    number = text[:-len(unit)].strip()
    if text.endswith(unit) and number.replace(".", "", 1).isdigit():
      return int(float(number) * units[unit])
  if text.isdigit():
    return int(text)
  raise FtjaxError(f"max_shard_size={size!r}; expected bytes or a size like '5GB' or '500MiB'")


def _fetch(x) -> np.ndarray:
  """A host copy of one tensor. An array spread over several processes is gathered from all of
  them, a collective: in a multi-host run every process must call the export."""
  import jax
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save_hf_params(params: Params, cfg: ModelConfig, out_dir: str, dtype=np.float32,
                   max_shard_bytes: int | str = "5GB", quantised=None) -> list[str]:
  """Writes model.safetensors, or shards of at most `max_shard_bytes` (transformers'
  `max_shard_size`) with the standard `model.safetensors.index.json`.

  Streams: each tensor is fetched from its (possibly sharded, on-device) param one layer at a
  time, and a shard file is written as soon as it is full, so host memory holds one shard at
  most, never the model. quantised: {kernel path: layer index (or ()) -> Quant4bit} for kernels
  stored in 4 bits, written in bitsandbytes' layout (their paths are absent from `params`).
  """
  os.makedirs(out_dir, exist_ok=True)
  limit = parse_size(max_shard_bytes)
  metadata = {"format": "pt"}  # transformers refuses files without it
  written: list[tuple[str, list[str]]] = []  # (temporary file, its tensor names)
  shard: dict[str, np.ndarray] = {}
  size = total = 0

  def flush():
    nonlocal shard, size
    if shard:
      tmp = os.path.join(out_dir, f".shard-{len(written):05d}.safetensors.part")
      save_file(shard, tmp, metadata=metadata)
      written.append((tmp, list(shard)))
    shard, size = {}, 0

  for spec in param_specs(cfg):
    in_4bit = (quantised or {}).get(spec.path)
    leaf = None if in_4bit else get_path(params, spec.path)
    for i, name in spec.hf_items(cfg.num_layers):
      if in_4bit:
        tensors = bnb.write_4bit(name, in_4bit(() if i is None else i))
      else:
        tensor = _fetch(leaf if i is None else leaf[i])  # one layer (expert) off the devices
        tensors = {name: np.ascontiguousarray((tensor.T if spec.transpose else tensor).astype(dtype))}
      nbytes = sum(t.nbytes for t in tensors.values())
      if size and size + nbytes > limit:
        flush()
      shard.update(tensors)
      size += nbytes
      total += nbytes
  flush()
  if len(written) == 1:
    os.replace(written[0][0], os.path.join(out_dir, SINGLE_FILE))
    return [SINGLE_FILE]
  names = [f"model-{k + 1:05d}-of-{len(written):05d}.safetensors" for k in range(len(written))]
  weight_map = {}
  for name, (tmp, tensor_names) in zip(names, written):
    os.replace(tmp, os.path.join(out_dir, name))
    weight_map.update({t: name for t in tensor_names})
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def save_hf_config(cfg: ModelConfig, out_dir: str, dtype_name: str = "float32",
                   quantization_config: dict | None = None) -> None:
  hf = cfg.to_hf_dict()
  hf["torch_dtype"] = dtype_name
  if quantization_config:
    hf["quantization_config"] = quantization_config
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if cfg.generation_eos_token_ids:
    # Extra stop ids (Llama 3 instruct's <|eot_id|>) live in generation_config.json, where
    # transformers' generate() and ftjax.generate read them; an export must keep them.
    config_eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
    eos = list(dict.fromkeys([i for i in config_eos if i is not None] + list(cfg.generation_eos_token_ids)))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)


def param_count(params: Params) -> int:
  return sum(int(np.prod(np.shape(v))) for _, v in flatten(params))
