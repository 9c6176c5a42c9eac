"""Loading straight onto a mesh: each param is created sharded, in its storage dtype, and filled
tensor by tensor as the loader reads them, so the model never exists whole in host memory.

A loader (ftjax.models.hf / gguf) writes into whatever `allocate(spec, dtype)` returns, one
layer at a time (`target[i] = tensor`, `target[...] = tensor` when not stacked). `MeshSink` is
that target on a mesh: a zero array with the param's sharding (from the logical axes of the
abstract model and ftjax.parallel.sharding's rules), updated in place by a jitted, donated
`dynamic_update_slice` per layer (or per block of rows of a big table, which the GGUF loader
dequantises a chunk at a time). Host memory then holds the params' shards (on a CPU mesh the
devices are host memory too) plus the one tensor in flight. Each process writes only its own
devices' shards, which is what several hosts need (not yet run on several hosts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import FtjaxError
from ftjax.parallel import sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_block(array, block, start):
  """array[start:start + len(block)] = block along the leading dims (start: one index per
  leading dim), in place (the output keeps the donated input's sharding)."""
  start = tuple(start) if isinstance(start, tuple) else (start,)
  return jax.lax.dynamic_update_slice(array, block.astype(array.dtype),
                                      start + (0,) * (block.ndim - len(start)))


class MeshSink:
  """One param on the mesh, written from host tensors (see the module doc): `sink[i] = layer`
  for a stacked param, `sink[a:b] = rows` for a block of rows (a big table read in chunks),
  `sink[...] = whole`, `sink[i, j] = expert j of layer i`."""

  def __init__(self, shape, dtype, sharding):
    self.shape, self.dtype, self.sharding = tuple(shape), jnp.dtype(dtype), sharding
    self.array = None  # created on the first write: an unwritten sink costs nothing

  def _host(self, value, shape):
    value = np.asarray(value)
    if value.shape != tuple(shape):  # the loaders check shapes first; this guards the sink itself
      raise FtjaxError(f"MeshSink: got a tensor of shape {value.shape}, expected {tuple(shape)}")
    return value.astype(self.dtype, copy=False)

  def __setitem__(self, index, value) -> None:
    if index is Ellipsis or index == ():
      host = self._host(value, self.shape)  # a whole param: each device reads its own slice
      self.array = jax.make_array_from_callback(self.shape, self.sharding,
                                                lambda idx: np.ascontiguousarray(host[idx]))
      return
    if isinstance(index, slice):  # rows a:b
      start, stop, step = index.indices(self.shape[0])
      if step != 1:
        raise FtjaxError(f"MeshSink: row slices must be contiguous, got {index}")
      block = self._host(value, (stop - start, *self.shape[1:]))
    elif isinstance(index, tuple):  # (layer, expert) of a stacked MoE expert kernel
      start = tuple(np.int32(i) for i in index)
      block = self._host(value, self.shape[len(index):]).reshape((1,) * len(index) + self.shape[len(index):])
    else:  # one layer of a stacked param
      start = int(index)
      block = self._host(value, self.shape[1:])[None]
    if self.array is None:
      self.array = jax.jit(lambda: jnp.zeros(self.shape, self.dtype), out_shardings=self.sharding)()
    self.array = _set_block(self.array, block, start if isinstance(start, tuple) else np.int32(start))


def mesh_sinks(mesh, fallback=None):
  """An `allocate(spec, dtype)` for the loaders that creates every param on `mesh`, sharded by
  its logical axes (`spec.axes`) and ftjax.parallel.sharding's rules. `fallback(spec, dtype)`
  is asked first; what it returns other than a numpy array (ftjax.quant's QuantSink for a
  4-bit kernel) is used instead."""

  def allocate(spec, dtype):
    if fallback is not None:
      target = fallback(spec, dtype)
      if not isinstance(target, np.ndarray):
        return target
    partition = sharding.logical_to_spec(spec.axes, spec.shape, mesh)
    return MeshSink(spec.shape, dtype, jax.sharding.NamedSharding(mesh, partition))
  return allocate


def collect_mesh_sinks(params: dict) -> dict:
  """The loaded params with each MeshSink replaced by its array."""
  return {key: collect_mesh_sinks(value) if isinstance(value, dict)
          else value.array if isinstance(value, MeshSink) else value
          for key, value in params.items()}
