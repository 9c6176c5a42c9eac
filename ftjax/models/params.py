"""Every param of a decoder with its HF tensor name (nested-dict helpers: ftjax.tree).

Shapes, dtypes and logical axes come from the NNX modules themselves (`CausalLM` built
abstractly by `nnx.eval_shape`, no memory used); the HF name of a param follows from its path,
because module names mirror transformers'. `hf_name` is the one place that mapping lives:
loaders (HF safetensors; GGUF through gguf-py's HF -> GGUF table), exporters and the PEFT
adapter format all go through it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
import jax.numpy as jnp
from flax import nnx

from ftjax.models.config import ModelConfig
from ftjax.models.llama import CausalLM

STACKED_PREFIX = "model/layers/"  # params under it have a leading [num_layers] axis


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  path: str  # "model/layers/self_attn/q_proj/kernel"
  shape: tuple[int, ...]  # full shape, including the leading layer axis when stacked
  hf_name: str  # "model.layers.{i}.self_attn.q_proj.weight"; {i} only when stacked
  transpose: bool  # HF Linear weights are [out, in], our kernels [in, out]
  stacked: bool
  axes: tuple = ()  # logical axis names per dim (None where a dim has none), for sharding
  # MoE expert kernels [l, e, in, out]: one HF tensor per layer and expert ({j} in hf_name)
  experts: int = 0

  def hf_items(self, num_layers: int) -> list[tuple[Any, str]]:
    """(index into the param, HF tensor name) of each tensor: index None for a whole param, i
    for layer i of a stacked one, (i, j) for expert j of layer i."""
    if self.experts:
      return [((i, j), self.hf_name.format(i=i, j=j)) for i in range(num_layers)
              for j in range(self.experts)]
    if self.stacked:
      return [(i, self.hf_name.format(i=i)) for i in range(num_layers)]
    return [(None, self.hf_name)]

  def hf_names(self, num_layers: int) -> list[str]:
    return [name for _, name in self.hf_items(num_layers)]

  def item_shape(self, index) -> tuple[int, ...]:
    """The shape of one HF tensor's slice of the param (`index` from hf_items)."""
    return self.shape[0 if index is None else 1 if isinstance(index, int) else 2:]


def hf_name(path: str) -> tuple[str, bool]:
  """ftjax param path -> (HF tensor name with {i} for the layer index, transposed?).

  "model/layers/self_attn/q_proj/kernel" -> ("model.layers.{i}.self_attn.q_proj.weight", True)
  "model/embed_tokens/embedding" -> ("model.embed_tokens.weight", False)
  """
  *modules, leaf = path.split("/")
  name = ".".join(modules)
  if path.startswith(STACKED_PREFIX):
    name = name.replace("model.layers", "model.layers.{i}", 1)
    # MoE experts stacked in one kernel: "...experts.w1" -> "...experts.{j}.w1" (HF: one per expert)
    name = name.replace(".experts.", ".experts.{j}.", 1)
  return f"{name}.{'bias' if leaf == 'bias' else 'weight'}", leaf == "kernel"


def hf_module_name(module_path: str, layer: int | None = None) -> str:
  """"model/layers/self_attn/q_proj", 3 -> "model.layers.3.self_attn.q_proj" (torch's names)."""
  name = ".".join(module_path.split("/"))
  if layer is not None:
    name = name.replace("model.layers", f"model.layers.{layer}", 1)
  return name


@functools.lru_cache(maxsize=32)
def param_specs(cfg: ModelConfig) -> tuple[ParamSpec, ...]:
  """Every param of `CausalLM(cfg)`, in path order."""
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  specs = []
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    path = "/".join(map(str, path))
    name, transpose = hf_name(path)
    axes = tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.shape))
    experts = var.shape[axes.index("expert")] if "{j}" in name and "expert" in axes else 0
    specs.append(ParamSpec(path, tuple(var.shape), name, transpose, path.startswith(STACKED_PREFIX),
                           axes, experts))
  specs.sort(key=lambda s: s.path.split("/"))  # path order, as `flatten` walks a tree
  return tuple(specs)


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   transform=None):
  """A `CausalLM` whose params are shape/dtype stand-ins: structure and metadata, no memory.
  `transform(model) -> model` reshapes it first (e.g. ftjax.quant.quantize_model)."""

  def build():
    model = CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    return transform(model) if transform else model

  return nnx.eval_shape(build)
