"""Mesh, logical-axis rules and shardings.

Models name their dims logically ("embed", "mlp", ...) in each param's `out_sharding` Variable
metadata; one rule table maps those names to mesh axes. A dim whose size does not divide by its
mesh axes is replicated instead, so the same rules work from 1 CPU device to a pod.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax.errors import FtjaxError
from ftjax.tree import unflatten

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Params: fsdp shards the model dim, tensor shards heads / mlp /
# vocab. Activations: the batch goes over data and fsdp.
# MoE expert kernels [layers, expert, in, out]: expert parallelism over fsdp (each fsdp device
# holds whole experts; "expert" comes before "embed" in their axes, so it takes fsdp and the
# model dim stays whole). Where the expert count does not divide by fsdp, the model dim takes
# fsdp instead, as for a dense MLP. The router's [embed, expert] kernel shards its model dim.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("expert", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one size may be -1 for "all remaining devices".

  Over all devices the layout comes from `mesh_utils.create_device_mesh`, which follows the
  real topology (a TPU slice's torus; elsewhere the devices in process order, so the batch rows
  each process supplies are contiguous). With every size given, one process's mesh may use
  fewer devices than exist (the first ones: tests, a partial machine).
  """
  devices = devices if devices is not None else jax.devices()
  sizes = [data, fsdp, tensor]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or len(devices) % known:
    raise FtjaxError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) does not fit "
                     f"{len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) > len(devices):
    raise FtjaxError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are present")
  if math.prod(sizes) == len(devices):
    return Mesh(mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True),
                MESH_AXES)
  if jax.process_count() > 1:
    raise FtjaxError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of the "
                     f"{len(devices)} devices; on several processes the mesh must use them all")
  return Mesh(np.asarray(devices[:math.prod(sizes)]).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  table = dict(rules)
  spec = []
  used: set[str] = set()
  for name, size in zip(axes, shape):
    mesh_axes = table.get(name) if name else None
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used and mesh.shape[a] > 1)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return P(*spec)


def logical_axes(state: nnx.State) -> dict:
  """The nested dict of each Variable's logical axis names (None per dim where it has none),
  shaped like `nnx.to_pure_dict(state)`."""
  def names(var):
    axes = var.get_metadata().get("out_sharding")
    return tuple(axes) if axes else (None,) * len(var.shape)
  return unflatten(("/".join(map(str, path)), names(var)) for path, var in nnx.to_flat_state(state))


def tree_shardings(tree, axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for `tree` (arrays or ShapeDtypeStructs) from a same-shaped tree of axes."""
  return jax.tree.map(
      lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
      tree, axes_tree, is_leaf=lambda x: isinstance(x, tuple) and all(
          isinstance(a, (str, type(None))) for a in x))


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_axis] = ("data", "fsdp")
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def like_params(tree, params, mesh: Mesh):
  """Shardings for optimizer state: each leaf that is a copy of a param (Adam's moments; found
  by its key path ending in the param's path, with the param's shape) is sharded like that
  param, anything else (step counts) replicated. Left to XLA, jit may replicate the moments,
  which undoes fsdp for them: twice the trained params' size on every device."""
  by_path = {tuple(path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}

  def one(path, leaf):
    for start in range(len(path)):
      param = by_path.get(tuple(path[start:]))
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(one, tree)
