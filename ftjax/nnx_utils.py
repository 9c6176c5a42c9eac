"""Small helpers over flax NNX modules that several layers share (models, quant and peft all
use them, so they live below all three; see docs/design.md, "Layers").

  axes(*names)                    variable metadata naming each dim logically
  get_module / replace_module     a submodule by its "a/b/0/c" path; swap it in place
  logical_name(path)              the path as if no adapter wrapped it
"""

from __future__ import annotations

from flax import nnx


def axes(*names: str | None) -> dict:
  """Variable metadata naming each dim logically (no eager placement: params are placed by
  ftjax.parallel.sharding after loading)."""
  return {"out_sharding": names, "eager_sharding": False}


def logical_name(path: str) -> str:
  """A module's path as if no adapter wrapped it: "q_proj/base_layer" is "q_proj" (a layer with
  several named adapters sits in a chain of wrappers, each holding the next as base_layer)."""
  return "/".join(p for p in path.split("/") if p != "base_layer")


def get_module(model: nnx.Module, path: str) -> nnx.Module:
  node = model
  for key in path.split("/"):
    node = node[int(key)] if key.isdigit() else getattr(node, key)
  return node


def replace_module(model: nnx.Module, path: str, new: nnx.Module) -> None:
  *parents, last = path.split("/")
  parent = get_module(model, "/".join(parents)) if parents else model
  if last.isdigit():
    parent[int(last)] = new
  else:
    setattr(parent, last, new)
