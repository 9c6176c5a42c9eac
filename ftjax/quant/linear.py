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

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.quant.fourbit import Quant4bit, dequantize_4bit, quantize_4bit


class QuantCodes(nnx.Param):
  """Packed 4-bit codes: frozen (never an adapter), counted as two params per byte."""


class QuantStat(nnx.Param):
  """Block statistics of a quantised kernel (absmax, its scale and offset): frozen, not params
  of the model in the counts (HF PEFT does not count bitsandbytes' quant_state either)."""


def _axes(*names) -> dict:
  return {"out_sharding": names, "eager_sharding": False}


class QuantLinear(nnx.Module):
  """y = x @ dequant(W) + b for a kernel quantised to 4 bits (frozen)."""

  def __init__(self, linear: nnx.Linear, *, block_size: int = 64, quant_type: str = "nf4",
               double_quant: bool = True):
    kernel = linear.kernel
    *lead, d_in, d_out = kernel.shape
    names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    lead_names, in_name, out_name = tuple(names[:-2]), names[-2], names[-1]
    weight = jnp.swapaxes(jnp.asarray(kernel[...], jnp.float32), -1, -2)  # torch layout [out, in]
    flat = weight.reshape(-1, d_out, d_in)
    quantize = lambda w: quantize_4bit(w, block_size, quant_type, double_quant)
    q = jax.vmap(quantize)(flat)  # one quantisation per layer of a stack
    rows = d_in % block_size == 0 and d_in % 2 == 0
    lead = tuple(lead)
    if rows:  # whole blocks per row: keep the kernel's axes
      codes = q.codes.reshape(*lead, d_out, d_in // 2)
      self.codes = QuantCodes(codes, **_axes(*lead_names, out_name, in_name))
    else:
      self.codes = QuantCodes(q.codes.reshape(*lead, -1), **_axes(*lead_names, None))
    if double_quant:
      self.absmax = QuantStat(q.absmax.reshape(*lead, -1), **_axes(*lead_names, None))
      self.absmax_scale = QuantStat(q.absmax_scale.reshape(*lead, -1), **_axes(*lead_names, None))
      self.offset = QuantStat(q.offset.reshape(*lead, 1), **_axes(*lead_names, None))
    else:
      shape = (*lead, d_out, d_in // block_size) if rows else (*lead, -1)
      axes = (*lead_names, out_name, in_name) if rows else (*lead_names, None)
      self.absmax = QuantStat(q.absmax.reshape(shape), **_axes(*axes))
      self.absmax_scale = self.offset = None
    self.bias = linear.bias
    self.rows = rows  # codes [..., out, in / 2] (else flat per layer)
    self.in_features, self.out_features = d_in, d_out
    self.kernel_shape = (*lead, d_in, d_out)
    self.kernel_axes = tuple(names)
    self.block_size, self.quant_type = block_size, quant_type
    self.dtype = linear.dtype or jnp.float32

  def quantized(self) -> Quant4bit:
    """This layer's (one layer of a stack, inside the scan) quantised kernel as a Quant4bit."""
    dq = self.absmax_scale is not None
    return Quant4bit(self.codes[...].reshape(-1), self.absmax[...].reshape(-1),
                     self.absmax_scale[...].reshape(-1) if dq else None,
                     self.offset[...].reshape(()) if dq else None,
                     (self.out_features, self.in_features), self.block_size, self.quant_type,
                     "float32")

  def weight(self, dtype=None):
    """The dequantised kernel [in, out] of one layer (inside the layer scan, or unstacked)."""
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
                        dtype=self.dtype, rngs=nnx.Rngs(0), kernel_metadata=_axes(*self.kernel_axes))
    linear.kernel = nnx.Param(kernel.astype(jnp.float32), **_axes(*self.kernel_axes))
    if self.bias is not None:
      linear.bias = self.bias
    return linear


def quantize_model(model: nnx.Module, *, block_size: int = 64, quant_type: str = "nf4",
                   double_quant: bool = True, skip: Sequence[str] = ("lm_head",)) -> nnx.Module:
  """Replaces every `nnx.Linear` of `model` (but those whose name ends with one of `skip`) by a
  QuantLinear, in place; returns the model."""
  from ftjax.peft.core import logical_name, replace_module
  targets = [("/".join(map(str, path)), module) for path, module in nnx.iter_modules(model)
             if isinstance(module, nnx.Linear) and path]
  for path, module in targets:
    if any(logical_name(path).endswith(s) for s in skip):
      continue
    replace_module(model, path, QuantLinear(module, block_size=block_size, quant_type=quant_type,
                                            double_quant=double_quant))
  return model


def dequantize_model(model: nnx.Module) -> nnx.Module:
  """Replaces every QuantLinear by the float nnx.Linear of its dequantised weights, in place."""
  from ftjax.peft.core import replace_module
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
