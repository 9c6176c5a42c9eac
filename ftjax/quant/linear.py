"""A linear layer whose frozen kernel lives in 4 bits, and quantising a whole NNX model.

  model = ftjax.quant.quantize_model(model, quant_type="nf4", double_quant=True)
  model = ftjax.peft.get_peft_model(model, LoraConfig(...))   # QLoRA: LoRA on the 4-bit base

`QuantLinear` replaces an `nnx.Linear`: its kernel is stored as bitsandbytes stores the torch
weight ([out, in], row-major, NF4/FP4 in blocks), and is dequantised to the compute dtype inside
the step, one layer at a time (in ftjax's decoders, inside the layer scan): the model is never
materialised in float. When every row holds whole blocks (in % block_size == 0, true of every
real model), codes are kept as [out, in / 2] and the absmax as [out, in / block] (or, double
quantised, flat per layer), so the codes keep the float kernel's logical axes and shard like it.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.nnx_utils import axes, logical_name, replace_module
from ftjax.quant.fourbit import Quant4bit, dequantize_4bit, quantize_4bit
from ftjax.quant.int8 import int8_dequantize, int8_quantize

log = logging.getLogger(__name__)


class QuantCodes(nnx.Param):
  """Packed 4-bit codes: frozen (never an adapter), counted as two params per byte."""


class QuantStat(nnx.Param):
  """Block statistics of a quantised kernel (absmax, its scale and offset): frozen, not params
  of the model in the counts (HF PEFT does not count bitsandbytes' quant_state either)."""


def _rows(d_in: int, block_size: int) -> bool:
  """Whether every row of the [out, in] weight holds whole blocks (then codes keep 2 dims)."""
  return d_in % block_size == 0 and d_in % 2 == 0


def _stored(q: Quant4bit, lead: tuple, d_out: int, d_in: int) -> dict:
  """The arrays a QuantLinear keeps, from a Quant4bit whose leaves have a leading layer axis."""
  if _rows(d_in, q.block_size):
    out = {"codes": q.codes.reshape(*lead, d_out, d_in // 2)}
    absmax_shape = (*lead, d_out, d_in // q.block_size)
  else:
    out = {"codes": q.codes.reshape(*lead, -1)}
    absmax_shape = (*lead, -1)
  if q.double_quant:  # the 256-block groups span rows: flat per layer
    out.update(absmax=q.absmax.reshape(*lead, -1), absmax_scale=q.absmax_scale.reshape(*lead, -1),
               offset=q.offset.reshape(*lead, 1))
  else:
    out["absmax"] = q.absmax.reshape(absmax_shape)
  return out


def quantize_kernel(kernel, block_size: int, quant_type: str, double_quant: bool) -> dict:
  """A float kernel [..., in, out] -> the arrays of its QuantLinear (each layer quantised alone,
  as bitsandbytes quantises the torch weight [out, in]; int8: one scale per output channel)."""
  if quant_type == "int8":
    q = int8_quantize(kernel)
    return {"codes": q.qvalue, "scale": q.scale}
  *lead, d_in, d_out = kernel.shape
  weight = jnp.swapaxes(jnp.asarray(kernel, jnp.float32), -1, -2).reshape(-1, d_out, d_in)
  q = jax.vmap(lambda w: quantize_4bit(w, block_size, quant_type, double_quant))(weight)
  return _stored(q, tuple(lead), d_out, d_in)


# One compiled program per kernel shape, for loading and for quantize_model (eager op-by-op
# dispatch would compile and keep dozens of small programs, and hold several f32 temporaries).
_quantize_kernel_jit = jax.jit(quantize_kernel, static_argnums=(1, 2, 3))


class QuantLinear(nnx.Module):
  """y = x @ dequant(W) + b for a frozen kernel quantised to 4 bits (nf4 / fp4, bitsandbytes'
  layout) or to int8 per output channel (codes [..., in, out] as the kernel, a scale per column)."""

  def __init__(self, linear: nnx.Linear, *, block_size: int = 64, quant_type: str = "nf4",
               double_quant: bool = True):
    kernel = linear.kernel
    *lead, d_in, d_out = kernel.shape
    names = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
    lead_names, out_name = names[:-2], names[-1]
    rows = _rows(d_in, block_size) or quant_type == "int8"
    arrays = _quantize_kernel_jit(kernel[...], block_size, quant_type, double_quant)
    if quant_type == "int8":
      self.codes = QuantCodes(arrays["codes"], **axes(*names))
      self.scale = QuantStat(arrays["scale"], **axes(*lead_names, None, out_name))
      self.absmax = self.absmax_scale = self.offset = None
    else:
      self._init_4bit(arrays, names, rows, double_quant)
      self.scale = None
    self.bias = linear.bias
    self.rows = rows  # codes [..., out, in / 2] / int8 [..., in, out] (else flat per layer)
    self.in_features, self.out_features = d_in, d_out
    self.kernel_shape = (*lead, d_in, d_out)
    self.kernel_axes = names
    self.block_size, self.quant_type = block_size, quant_type
    self.dtype = linear.dtype or jnp.float32

  def _init_4bit(self, arrays: dict, names: tuple, rows: bool, double_quant: bool) -> None:
    lead_names, in_name, out_name = names[:-2], names[-2], names[-1]
    self.codes = QuantCodes(arrays["codes"], **axes(*lead_names, *((out_name, in_name) if rows else (None,))))
    per_row = rows and not double_quant  # absmax [.., out, in / block] keeps the axes too
    self.absmax = QuantStat(arrays["absmax"], **axes(*lead_names, *((out_name, in_name) if per_row else (None,))))
    if double_quant:
      self.absmax_scale = QuantStat(arrays["absmax_scale"], **axes(*lead_names, None))
      self.offset = QuantStat(arrays["offset"], **axes(*lead_names, None))
    else:
      self.absmax_scale = self.offset = None

  def quantized(self, layer=()) -> Quant4bit:
    """The quantised kernel as a Quant4bit: this layer's (unstacked, or one layer of a stack
    inside the scan), or layer `layer` of a stack."""
    if self.quant_type == "int8":
      raise FtjaxError("an int8 kernel has no 4-bit form; dequantise it (ftjax.quant.dequantize_model)")
    dq = self.absmax_scale is not None
    return Quant4bit(self.codes[...][layer].reshape(-1), self.absmax[...][layer].reshape(-1),
                     self.absmax_scale[...][layer].reshape(-1) if dq else None,
                     self.offset[...][layer].reshape(()) if dq else None,
                     (self.out_features, self.in_features), self.block_size, self.quant_type,
                     "float32")

  def weight(self, dtype=None):
    """The dequantised kernel [in, out] of one layer (inside the layer scan, or unstacked)."""
    if self.quant_type == "int8":
      q = qwix.QArray(self.codes[...], self.scale[...], None, jnp.int8)
      return int8_dequantize(q, dtype or self.dtype)
    return jnp.swapaxes(dequantize_4bit(self.quantized(), jnp.float32), -1, -2).astype(
        dtype or self.dtype)

  def float_kernel(self, dtype=jnp.float32):
    """The dequantised kernel with any leading layer axes ([..., in, out]), one layer at a time."""
    lead = self.codes.shape[:self.codes.ndim - (2 if self.rows else 1)]
    if not lead:
      return self.weight(dtype)
    graphdef, state = nnx.split(self)
    n = math.prod(lead)
    per_layer = jax.tree.map(lambda s: s.reshape(n, *s.shape[len(lead):]), state)
    kernel = jax.lax.map(lambda st: nnx.merge(graphdef, st).weight(dtype), per_layer)
    return kernel.reshape(*lead, self.in_features, self.out_features)

  def __call__(self, x):
    # The barrier keeps XLA from fusing the dequantisation into the matmul: the product is then
    # the same library GEMM as an nnx.Linear holding the dequantised kernel, bit for bit.
    y = jnp.dot(x.astype(self.dtype), jax.lax.optimization_barrier(self.weight()))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def to_linear(self) -> nnx.Linear:
    """The float nnx.Linear of the dequantised weights (all layers of a stack)."""
    kernel = self.float_kernel(jnp.float32)
    linear = nnx.Linear(self.in_features, self.out_features, use_bias=self.bias is not None,
                        dtype=self.dtype, rngs=nnx.Rngs(0), kernel_metadata=axes(*self.kernel_axes))
    linear.kernel = nnx.Param(kernel.astype(jnp.float32), **axes(*self.kernel_axes))
    if self.bias is not None:
      linear.bias = self.bias
    return linear


def quantize_model(model: nnx.Module, *, block_size: int = 64, quant_type: str = "nf4",
                   double_quant: bool = True, skip: Sequence[str] = ("lm_head",)) -> nnx.Module:
  """Replaces every `nnx.Linear` of `model` (but those whose name ends with one of `skip`) by a
  QuantLinear, in place; returns the model."""
  targets = [("/".join(map(str, path)), module) for path, module in nnx.iter_modules(model)
             if isinstance(module, nnx.Linear) and path]
  flat = []
  for path, module in targets:
    if any(logical_name(path).endswith(s) for s in skip):
      continue
    layer = QuantLinear(module, block_size=block_size, quant_type=quant_type,
                        double_quant=double_quant)
    replace_module(model, path, layer)
    if not layer.rows:
      flat.append(f"{path} (in={layer.in_features})")
  if flat:
    log.info("%d layer(s) have an input width that is not a multiple of block_size=%d, e.g. %s: "
             "their 4-bit blocks run across rows, as bitsandbytes' do, so their codes are kept "
             "flat per layer and are not sharded along the kernel's axes", len(flat), block_size,
             flat[0])
  return model


def dequantize_model(model: nnx.Module) -> nnx.Module:
  """Replaces every QuantLinear by the float nnx.Linear of its dequantised weights, in place."""
  targets = [("/".join(map(str, path)), module) for path, module in nnx.iter_modules(model)
             if isinstance(module, QuantLinear)]
  for path, module in targets:
    replace_module(model, path, module.to_linear())
  return model


def base_bits_per_param(model: nnx.Module) -> float:
  """Bits of storage per quantised weight (codes and block statistics)."""
  n_bits = n_params = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, QuantLinear):
      n_params += math.prod(module.kernel_shape)
      n_bits += 8 * sum(np.dtype(v.dtype).itemsize * v.size for v in
                        jax.tree.leaves(nnx.state(module, nnx.Any(QuantCodes, QuantStat))))
  return n_bits / max(n_params, 1)


class QuantSink:
  """Where a loader writes one float kernel [..., in, out], layer by layer: each layer is
  quantised as it arrives, so a 4-bit model loads with its float weights one layer at a time.

  A loader treats it like the float array it replaces: `sink[i] = kernel_of_layer_i`
  (`sink[...] = kernel` when not stacked); `arrays()` are then the QuantLinear's arrays.
  """

  def __init__(self, shape, block_size: int, quant_type: str, double_quant: bool):
    *lead, d_in, d_out = shape
    self.lead, self.d_in, self.d_out = tuple(lead), d_in, d_out
    self.settings = (block_size, quant_type, double_quant)
    one = jax.eval_shape(lambda: quantize_kernel(jnp.zeros((d_in, d_out)), *self.settings))
    self._arrays = {k: np.zeros((*self.lead, *v.shape), v.dtype) for k, v in one.items()}

  def __setitem__(self, index, kernel_in_out) -> None:
    arrays = jax.device_get(_quantize_kernel_jit(np.asarray(kernel_in_out, np.float32), *self.settings))
    for key, value in arrays.items():
      self._arrays[key][index] = value

  def put_quantized(self, index, q: Quant4bit, name: str) -> None:
    """Writes a layer that is already 4-bit (a bitsandbytes checkpoint): its bytes as they are
    when block size, type and double quantisation match this sink's, else requantised."""
    if tuple(q.shape) != (self.d_out, self.d_in):
      raise FtjaxError(f"4-bit tensor {name!r} has shape {list(q.shape)}, expected "
                       f"[{self.d_out}, {self.d_in}]")
    if (q.block_size, q.quant_type, q.double_quant) != self.settings:
      self[index] = np.asarray(dequantize_4bit(q, jnp.float32)).T
      return
    for key, value in _stored(q, (), self.d_out, self.d_in).items():
      self._arrays[key][index] = value

  def arrays(self) -> dict:
    return self._arrays


def quant_sinks(block_size: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                skip: Sequence[str] = ("lm_head",)):
  """An `allocate(spec, dtype)` for ftjax's loaders: a QuantSink for every linear kernel (but
  those of modules whose name ends with one of `skip`), a float array otherwise."""
  def allocate(spec, dtype):
    module = spec.path.rsplit("/", 1)[0]
    # MoE routers and expert kernels (an "expert" axis) are no nnx.Linear: they stay float.
    if (spec.path.endswith("/kernel") and "expert" not in spec.axes
        and not any(module.endswith(s) for s in skip)):
      return QuantSink(spec.shape, block_size, quant_type, double_quant)
    return np.empty(spec.shape, dtype)
  return allocate


def collect_sinks(params: dict) -> dict:
  """The loaded params with each QuantSink ("<module>/kernel") replaced by its arrays."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      out[key] = collect_sinks(value)
    elif isinstance(value, QuantSink):
      out.update(value.arrays())
    else:
      out[key] = value
  return out
