"""LoRA (Hu et al. 2021) and rsLoRA as a plug: y = x W + s · (x A) B, trained factored.

Adapter tree: for each targeted linear `P` (a module path such as "layers/attn/q_proj"),
`P/lora_a` [l, in, r] and `P/lora_b` [l, r, out], stacked like the kernel they sit beside.
B starts at zero, so the adapted model equals the base model at step 0.

Targets follow HF PEFT's `target_modules`: a string is a regex that must fully match the module
path, a list/tuple matches names exactly or as a path suffix, and "all-linear" is every linear
layer except the output head.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ftjax.errors import FtjaxError
from ftjax.models.params import Params, flatten, get_path, param_specs, set_path
from ftjax.peft.plug import Plug


def linear_modules(cfg) -> list[str]:
  """Module paths of every linear layer (those with a kernel), output head excluded."""
  return [s.path[: -len("/kernel")] for s in param_specs(cfg)
          if s.path.endswith("/kernel") and not s.path.startswith("lm_head")]


def match_targets(targets: str | Sequence[str], modules: list[str]) -> list[str]:
  if targets == "all-linear":
    return list(modules)
  if isinstance(targets, str):
    pattern = re.compile(targets)
    chosen = [m for m in modules if pattern.fullmatch(m)]
  else:
    chosen = [m for m in modules if any(m == t or m.endswith("/" + t) for t in targets)]
  if not chosen:
    raise FtjaxError(f"LoRA targets {targets!r} match no linear layer; module paths are e.g. "
                     f"{', '.join(modules[:4])}, ... (or use 'all-linear')")
  return chosen


@dataclasses.dataclass(frozen=True)
class LoRA(Plug):
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: str | tuple[str, ...] = "all-linear"
  rslora: bool = False
  init_a: str = "kaiming"  # PEFT's default; "gaussian" is N(0, 1/r)

  name = "lora"

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def modules(self, cfg) -> list[str]:
    return match_targets(self.targets, linear_modules(cfg))

  def init(self, rng, params: Params, cfg) -> Params:
    adapters: Params = {}
    modules = self.modules(cfg)
    for key, module in zip(jax.random.split(rng, len(modules)), modules):
      layers, d_in, d_out = get_path(params, module + "/kernel").shape
      if self.init_a == "gaussian":
        a = jax.random.normal(key, (layers, d_in, self.rank)) / self.rank
      else:  # kaiming_uniform(a=sqrt(5)) on torch's [r, in] weight: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, (layers, d_in, self.rank), minval=-bound, maxval=bound)
      set_path(adapters, module + "/lora_a", a.astype(jnp.float32))
      set_path(adapters, module + "/lora_b", jnp.zeros((layers, self.rank, d_out), jnp.float32))
    return adapters

  def project(self, x, outs, base, adapters, *, rng=None):
    names = [n for n in outs if n in adapters]
    if not names:
      return outs
    if self.dropout and rng is not None:
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    # One x @ [A_1 | A_2 | ...] for every adapted projection of this input: three thin matmuls
    # (q, k, v) cost about as much as one, so this cuts the LoRA forward and backward passes.
    a_cat = jnp.concatenate([adapters[n]["lora_a"] for n in names], axis=-1).astype(x.dtype)
    xa = jnp.split(checkpoint_name(jnp.dot(x, a_cat), "adapter"), len(names), axis=-1)
    outs = dict(outs)
    for n, xa_n in zip(names, xa):
      outs[n] = outs[n] + jnp.dot(xa_n * self.scale, adapters[n]["lora_b"].astype(x.dtype))
    return outs

  def delta(self, adapters: Params, module: str):
    """The dense update s · A B for one module, [l, in, out]."""
    sub = get_path(adapters, module)
    return self.scale * jnp.einsum("lir,lro->lio", sub["lora_a"], sub["lora_b"])

  def merge(self, params: Params, adapters: Params) -> Params:
    merged = jax.tree.map(lambda x: x, params)
    for path, _ in flatten(adapters):
      if path.endswith("/lora_a"):
        module = path[: -len("/lora_a")]
        kernel = get_path(params, module + "/kernel")
        set_path(merged, module + "/kernel", (kernel + self.delta(adapters, module)).astype(kernel.dtype))
    return merged

  def axes(self, adapters: Params, cfg) -> Params:
    """A shards like its kernel's input dim, B like its output dim; rank stays whole."""
    kernel_axes = {s.path[: -len("/kernel")]: s.axes for s in param_specs(cfg) if s.path.endswith("/kernel")}
    out: Params = {}
    for path, _ in flatten(adapters):
      module, leaf = path.rsplit("/", 1)
      layers, d_in, d_out = kernel_axes[module]
      set_path(out, path, (layers, d_in, "lora_rank") if leaf == "lora_a" else (layers, "lora_rank", d_out))
    return out

  # --- HF PEFT on-disk format --------------------------------------------------------------

  def peft_config(self, cfg, base_model_name: str) -> dict:
    hf_modules = sorted({m.rsplit("/", 1)[-1] for m in self.modules(cfg)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
        "target_modules": hf_modules, "use_rslora": self.rslora, "use_dora": False,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True,
    }

  def peft_state_dict(self, adapters: Params, cfg) -> dict:
    """HF PEFT keys -> torch-layout arrays: lora_A.weight [r, in], lora_B.weight [out, r]."""
    hf_name = {s.path[: -len("/kernel")]: s for s in param_specs(cfg) if s.path.endswith("/kernel")}
    out = {}
    for module in self.modules(cfg):
      spec = hf_name[module]
      sub = get_path(adapters, module)
      for i, name in enumerate(spec.hf_names(cfg.num_layers)):
        prefix = "base_model.model." + name[: -len(".weight")]
        out[prefix + ".lora_A.weight"] = jnp.asarray(sub["lora_a"][i]).T
        out[prefix + ".lora_B.weight"] = jnp.asarray(sub["lora_b"][i]).T
    return out
