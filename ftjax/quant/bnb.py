"""4-bit weights as transformers + bitsandbytes write them to safetensors, both ways.

A `load_in_4bit` checkpoint (`model.save_pretrained` of a bitsandbytes model, or the `*-bnb-4bit`
repos on the Hub) stores each quantised `<module>.weight` as:

  <module>.weight                                  uint8 [n / 2, 1]  packed codes
  <module>.weight.absmax                           f32 [blocks], or uint8 with double quantisation
  <module>.weight.quant_map                        f32 [16]          the NF4 / FP4 code book
  <module>.weight.nested_absmax                    f32 [blocks / 256]  (double quantisation)
  <module>.weight.nested_quant_map                 f32 [256]         the 8-bit dynamic code
  <module>.weight.quant_state.bitsandbytes__<type> uint8 [k]         JSON: quant_type, blocksize,
      dtype, shape [out, in], and with double quantisation nested_blocksize, nested_dtype,
      nested_offset

and config.json names it in `quantization_config` (quant_method "bitsandbytes", load_in_4bit).
Since ftjax's Quant4bit holds the same bytes, these tensors load into a QuantLinear as they are.
"""

from __future__ import annotations

import json

import numpy as np

from ftjax.errors import FtjaxError
from ftjax.quant.fourbit import CODES, DYNAMIC_CODE, Quant4bit

STATE_PREFIX = "quant_state.bitsandbytes__"


def quant_state_key(name: str, keys) -> str | None:
  """The key of the packed quant state of tensor `name` when it is stored in 4 bits."""
  for quant_type in CODES:
    key = f"{name}.{STATE_PREFIX}{quant_type}"
    if key in keys:
      return key
  return None


def read_4bit(name: str, state_key: str, read) -> Quant4bit:
  """The Quant4bit of HF tensor `name` (its quant state under `state_key`); read(key) returns
  the numpy array stored under key."""
  try:
    meta = json.loads(bytes(np.asarray(read(state_key), np.uint8)).decode())
    double_quant = "nested_offset" in meta
    q = Quant4bit(
        codes=np.asarray(read(name), np.uint8).reshape(-1),
        absmax=np.asarray(read(f"{name}.absmax")).reshape(-1),
        absmax_scale=np.asarray(read(f"{name}.nested_absmax"), np.float32).reshape(-1)
        if double_quant else None,
        offset=np.asarray(meta["nested_offset"], np.float32) if double_quant else None,
        shape=tuple(meta["shape"]), block_size=int(meta["blocksize"]),
        quant_type=meta["quant_type"], dtype=meta.get("dtype", "float32"))
  except (KeyError, ValueError) as e:
    raise FtjaxError(f"tensor {name!r}: unreadable bitsandbytes 4-bit state ({e})") from e
  if q.quant_type not in CODES or (double_quant and meta.get("nested_blocksize") != 256):
    raise FtjaxError(f"tensor {name!r}: unsupported bitsandbytes state {meta}")
  n = int(np.prod(q.shape))
  blocks = -(-n // q.block_size)
  if q.codes.size != -(-n // 2) or q.absmax.size != blocks:
    raise FtjaxError(f"tensor {name!r}: {q.codes.size} code bytes and {q.absmax.size} absmax "
                     f"for shape {list(q.shape)} in blocks of {q.block_size}; expected "
                     f"{-(-n // 2)} and {blocks}")
  return q


def write_4bit(name: str, q: Quant4bit) -> dict[str, np.ndarray]:
  """The safetensors entries of HF tensor `name` (the inverse of read_4bit)."""
  meta = {"quant_type": q.quant_type, "blocksize": q.block_size, "dtype": q.dtype,
          "shape": list(q.shape)}
  out = {name: np.asarray(q.codes, np.uint8).reshape(-1, 1),
         f"{name}.absmax": np.asarray(q.absmax),
         f"{name}.quant_map": np.asarray(CODES[q.quant_type], np.float32)}
  if q.double_quant:
    meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(q.offset))
    out[f"{name}.nested_absmax"] = np.asarray(q.absmax_scale, np.float32)
    out[f"{name}.nested_quant_map"] = np.asarray(DYNAMIC_CODE, np.float32)
  out[f"{name}.{STATE_PREFIX}{q.quant_type}"] = np.frombuffer(
      json.dumps(meta).encode(), np.uint8).copy()
  return out


def checkpoint_settings(hf_config: dict) -> dict | None:
  """quantize_model's settings for a `load_in_4bit` checkpoint's config.json (None: not 4-bit)."""
  qc = hf_config.get("quantization_config") or {}
  if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
    return None
  return dict(quant_type=qc.get("bnb_4bit_quant_type", "fp4"),  # bitsandbytes' own default
              double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
              block_size=int(qc.get("bnb_4bit_blocksize", 64)),
              skip=tuple(qc.get("llm_int8_skip_modules") or ("lm_head",)))


def quantization_config(quant_type: str, double_quant: bool, skip, compute_dtype: str) -> dict:
  """config.json's quantization_config for a 4-bit checkpoint ftjax writes."""
  return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
          "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
          "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
          "llm_int8_skip_modules": list(skip)}
