"""The param tree's one table: path, shape, logical axes and HF name of every leaf.

Loaders, exporters, initialisation and sharding all read `param_specs(cfg)`, so a new param
is added in exactly one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models.config import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  path: str  # "layers/attn/q_proj/kernel"
  shape: tuple[int, ...]  # full shape, including the leading layer axis when stacked
  axes: tuple[str | None, ...]  # logical axis names, one per dim
  hf_name: str  # "model.layers.{i}.self_attn.q_proj.weight"; {i} only when stacked
  transpose: bool = False  # HF Linear weights are [out, in], ours [in, out]
  stacked: bool = False
  init: str = "normal"  # "normal", "ones", "zeros"

  def hf_names(self, num_layers: int) -> list[str]:
    return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
  d, f, v, h, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim, cfg.num_layers
  norm_init = "zeros" if cfg.norm_offset else "ones"
  specs = [ParamSpec("embed/embedding", (v, d), ("vocab", "embed"), "model.embed_tokens.weight")]

  def layer(path, shape, axes, hf, transpose=False, init="normal"):
    specs.append(ParamSpec("layers/" + path, (L, *shape), ("layers", *axes),
                           "model.layers.{i}." + hf, transpose, True, init))

  layer("input_norm/scale", (d,), ("norm",), "input_layernorm.weight", init=norm_init)
  for name, out, axis in (("q_proj", cfg.q_size, "q_heads"), ("k_proj", cfg.kv_size, "kv_heads"),
                          ("v_proj", cfg.kv_size, "kv_heads")):
    layer(f"attn/{name}/kernel", (d, out), ("embed", axis), f"self_attn.{name}.weight", True)
    if cfg.qkv_bias:
      layer(f"attn/{name}/bias", (out,), (axis,), f"self_attn.{name}.bias", init="zeros")
  layer("attn/o_proj/kernel", (cfg.q_size, d), ("q_heads", "embed"), "self_attn.o_proj.weight", True)
  if cfg.qk_norm:
    layer("attn/q_norm/scale", (h,), ("norm",), "self_attn.q_norm.weight", init="ones")
    layer("attn/k_norm/scale", (h,), ("norm",), "self_attn.k_norm.weight", init="ones")
  layer("post_attn_norm/scale", (d,), ("norm",), "post_attention_layernorm.weight", init=norm_init)
  layer("mlp/gate_proj/kernel", (d, f), ("embed", "mlp"), "mlp.gate_proj.weight", True)
  layer("mlp/up_proj/kernel", (d, f), ("embed", "mlp"), "mlp.up_proj.weight", True)
  layer("mlp/down_proj/kernel", (f, d), ("mlp", "embed"), "mlp.down_proj.weight", True)
  specs.append(ParamSpec("final_norm/scale", (d,), ("norm",), "model.norm.weight", init=norm_init))
  if not cfg.tie_word_embeddings:
    specs.append(ParamSpec("lm_head/kernel", (d, v), ("embed", "vocab"), "lm_head.weight", True))
  return specs


# --- path helpers -------------------------------------------------------------------------

def get_path(tree: Params, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def set_path(tree: Params, path: str, value) -> None:
  keys = path.split("/")
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


def flatten(tree: Params, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """Yields ("a/b/c", leaf) in sorted key order."""
  for key in sorted(tree):
    value = tree[key]
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      yield from flatten(value, path)
    else:
      yield path, value


def unflatten(items) -> Params:
  tree: Params = {}
  for path, value in items:
    set_path(tree, path, value)
  return tree


def logical_axes(cfg: ModelConfig) -> Params:
  """Same structure as params, leaves are tuples of logical axis names."""
  return unflatten((s.path, s.axes) for s in param_specs(cfg))


# --- random init (tests, and from-scratch models) -----------------------------------------

def init_params(cfg: ModelConfig, rng, dtype=jnp.float32, std: float = 0.02) -> Params:
  specs = param_specs(cfg)
  keys = jax.random.split(rng, len(specs))
  out = []
  for key, spec in zip(keys, specs):
    if spec.init == "normal":
      value = std * jax.random.normal(key, spec.shape, jnp.float32)
    elif spec.init == "ones":
      value = jnp.ones(spec.shape, jnp.float32)
    else:
      value = jnp.zeros(spec.shape, jnp.float32)
    out.append((spec.path, value.astype(dtype)))
  return unflatten(out)


def check_shapes(params: Params, cfg: ModelConfig, source: str) -> None:
  """Every spec'd leaf present with its shape; used after loading from any format."""
  from ftjax.errors import FtjaxError
  for spec in param_specs(cfg):
    try:
      leaf = get_path(params, spec.path)
    except KeyError:
      raise FtjaxError(f"{source}: missing tensor for {spec.path} ({spec.hf_name})") from None
    if tuple(np.shape(leaf)) != spec.shape:
      raise FtjaxError(f"{source}: tensor {spec.path} has shape {tuple(np.shape(leaf))}, "
                       f"expected {spec.shape}")
