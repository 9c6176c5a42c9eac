"""LoRA on the experts (and router) of the mixture-of-experts families, as HF PEFT does it.

transformers 5 stores a Mixtral / Qwen3-MoE layer's experts as two fused 3-D parameters,
`experts.gate_up_proj` [e, 2f, d] (gate rows first, then up) and `experts.down_proj` [e, d, f],
and HF PEFT adapts them with `LoraConfig(target_parameters=[...])` (peft's ParamWrapper):
each expert its own A / B, stacked, and the weight used is W + s · B A per expert. peft 0.21's
file layout, which ftjax reads and writes unchanged:

  <moe>.experts.lora_A.weight [e * r, in]   row   expert * r + k
  <moe>.experts.lora_B.weight [out, r * e]  column  k * e + expert
  (both parameters adapted: gate_up_proj's under "experts.base_layer.", down_proj's under
  "experts.", gate_up_proj being the inner wrapper as in peft's parameter order)

ftjax keeps the gate and up kernels apart (`ftjax.models.moe.Experts`), so gate_up_proj's one
A [e, d, r] feeds both and its B [e, r, 2f] is split: gate gets B[..., :f], up B[..., f:].

peft (on transformers 5) also rewrites a config written for transformers 4's per-expert
nn.Linear modules: "all-linear", and the old names in target_modules (mixtral: w1, w3, w2,
gate; qwen3_moe: gate_proj, up_proj, down_proj, gate), become target_parameters, w1 + w3
(gate_proj + up_proj) fused into gate_up_proj with rank 2r and alpha 2 · lora_alpha, and the
router `gate` gets a LoRA on its [e, d] weight (`gate.weight`). `resolve_moe_targets` does the
same, so counts, keys and shapes equal peft's for the same config.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import nnx_utils
from ftjax.errors import FtjaxError
from ftjax.models.moe import Experts, Router
from ftjax.peft.core import AdapterLayer, ModulesToSave, stack_sizes, torch_names
from ftjax.peft.lora import LoraLinear, LoraParam, kernel_info

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # transformers 5's names, peft's targets
ROUTER_PARAMETER = "gate.weight"
# transformers 4's per-expert module names -> the transformers 5 parameter peft targets instead
# (peft.utils.transformers_weight_conversion._MOE_TARGET_MODULE_MAPPING; qwen3_moe uses qwen2_moe's)
V4_NAMES = {"mixtral": {"gate": ROUTER_PARAMETER, "w1": "gate_up_proj", "w3": "gate_up_proj",
                        "w2": "down_proj"},
            "qwen3_moe": {"gate": ROUTER_PARAMETER, "gate_proj": "gate_up_proj",
                          "up_proj": "gate_up_proj", "down_proj": "down_proj"}}
FUSED_PATTERN = r".*\.gate_up_proj"  # peft's rank_pattern / alpha_pattern key for the fused pair


def resolve_moe_targets(config, model_type: str | None):
  """`config` (a LoraConfig) as peft 0.21 rewrites it for a transformers 5 MoE model:
  "all-linear" and transformers 4's expert / router names in target_modules add
  target_parameters (see the module doc; "all-linear" stays, for the linear layers). Other
  models and regex targets: unchanged (peft probes a regex against the old names; ftjax does
  not, name the parameters in target_parameters instead)."""
  mapping = V4_NAMES.get(model_type)
  targets = config.target_modules
  if mapping is None or targets is None or (isinstance(targets, str) and targets != "all-linear"):
    return config

  def old_name(target):
    return next((o for o in mapping if target == o or target.endswith("." + o)), None)
  if targets == "all-linear":
    named, rest = set(mapping), "all-linear"
  else:
    named = {old_name(t) for t in targets} - {None}
    rest = tuple(t for t in targets if old_name(t) is None)
  if not named:
    return config
  fused = {o for o, n in mapping.items() if n == "gate_up_proj"}
  if 0 < len(named & fused) < len(fused):
    raise FtjaxError(f"LoraConfig: target_modules names {sorted(named & fused)} but not "
                     f"{sorted(fused - named)}; they are one fused gate_up_proj parameter in "
                     "transformers 5 (HF PEFT refuses this too): name both")
  rank, alpha = dict(config.rank_pattern), dict(config.alpha_pattern)
  if named & fused:  # the fused pair keeps the two separate LoRAs' rank and scale
    rank.setdefault(FUSED_PATTERN, config.r * len(fused))
    alpha.setdefault(FUSED_PATTERN, config.lora_alpha * len(fused))
  return dataclasses.replace(
      config, target_modules=rest,
      target_parameters=tuple(sorted(set(config.target_parameters or ()) | {mapping[o] for o in named})),
      rank_pattern=rank, alpha_pattern=alpha)


def _selects(target_parameters, key: str) -> bool:
  """peft's rule for target_parameters: the full name, or its last dotted components."""
  return any(key == t or key.endswith("." + t) for t in target_parameters)


def _selected(module, names: list[str], target_parameters) -> tuple[list[str], set[str]]:
  """(the parameters of an Experts / Router module that target_parameters selects, the
  targets that selected them). `names`: its torch names, one per layer of its stack, matched
  under their transformers 5 names (peft's); a stack is adapted in all its layers or none."""
  params = [ROUTER_PARAMETER] if isinstance(module, Router) else list(EXPERT_PARAMETERS)
  chosen, used = [], set()
  for param in params:
    keys = [f"{peft_module_name(n)}.{param.rsplit('.', 1)[-1] if param == ROUTER_PARAMETER else param}"
            for n in names]
    hits = [_selects(target_parameters, k) for k in keys]
    if any(hits) and not all(hits):
      raise FtjaxError(f"LoraConfig: target_parameters={list(target_parameters)} selects {keys[0]} in "
                       "some layers but not all; the layers are stacked and share one adapter")
    if all(hits):
      chosen.append(param)
      used.update(t for t in target_parameters if any(_selects([t], k) for k in keys))
  return chosen, used


def attach_parameter_targets(config, model: nnx.Module, rngs: nnx.Rngs) -> None:
  """Wraps every experts module (and router) whose parameters `config.target_parameters`
  selects. A target that selects nothing is an error, as in peft."""
  if config.lora_dropout or config.use_dora or config.init_lora_weights not in (True, "gaussian"):
    raise FtjaxError("LoraConfig: target_parameters (LoRA on the experts / router weights) works "
                     "with lora_dropout=0, no DoRA and init_lora_weights True or 'gaussian', as "
                     "HF PEFT's ParamWrapper")
  if config.layers_to_transform is not None:
    raise FtjaxError("LoraConfig: layers_to_transform with target_parameters is not supported")
  stacks, used = stack_sizes(model), set()
  whole = ["/".join(map(str, p)) + "/" for p, m in nnx.iter_modules(model) if isinstance(m, ModulesToSave)]
  for path, module in list(nnx.iter_modules(model)):
    path = "/".join(str(p) for p in path)
    if any(path.startswith(w) for w in whole):  # trained whole (modules_to_save): no LoRA in it
      continue
    if getattr(module, "adapts_parameters", False):
      raise FtjaxError(f"LoraConfig: {path.replace('/', '.')} already carries the adapter "
                       f"{module.adapter_name!r}; a second adapter on the experts / router is not "
                       "supported")
    if not isinstance(module, (Experts, Router)):
      continue
    names = torch_names(nnx_utils.logical_name(path), stacks)[0]
    params, hit = _selected(module, names, config.target_parameters)
    if not params:
      continue
    used |= hit
    ranks = {p: config.rank_and_alpha([peft_module_name(n) if p == ROUTER_PARAMETER
                                       else f"{peft_module_name(n)}.{p}" for n in names])
             for p in params}
    if isinstance(module, Router):
      r, alpha = ranks[ROUTER_PARAMETER]
      layer = RouterLora(module, r=r, scaling=_scaling(config, r, alpha), dropout=0.0,
                         init=config.init_lora_weights, rngs=rngs)
    else:
      layer = ExpertsLora(module, ranks={p: ra[0] for p, ra in ranks.items()},
                          scalings={p: _scaling(config, *ra) for p, ra in ranks.items()},
                          init=config.init_lora_weights, rngs=rngs)
    nnx_utils.replace_module(model, path, layer)
  unused = sorted(set(config.target_parameters) - used)
  if unused:
    raise FtjaxError(f"LoraConfig: target_parameters {unused} match no parameter of this model; "
                     f"the MoE families' are {list(EXPERT_PARAMETERS)} and {ROUTER_PARAMETER!r} "
                     "(e.g. 'experts.gate_up_proj')" + (
                         "; modules_to_save trains its modules whole, without LoRA (HF PEFT refuses "
                         "this combination too): name the others in target_modules" if whole else ""))


def peft_module_name(name: str) -> str:
  """A MoE module's name in transformers 5 (what peft's keys use): mixtral's checkpoints and
  ftjax call the MoE block `block_sparse_moe`, transformers 5 renames it `mlp` on load."""
  return name.replace(".block_sparse_moe.", ".mlp.")


class RouterLora(LoraLinear):
  """LoRA on the router's [d, e] kernel: peft's ParamWrapper on the 2-D `gate.weight`, which
  computes as a LoRA linear (A [r, d], B [e, r])."""
  adapts_parameters = True
  peft_name = staticmethod(peft_module_name)


def _scaling(config, r: int, alpha: float) -> float:
  return alpha / (math.sqrt(r) if config.use_rslora else r)


class ExpertsLora(AdapterLayer):
  """LoRA around an `Experts` module: per expert, W' = W + s · A B for gate_up_proj (A shared
  by gate and up, B split) and / or down_proj. The model reads the adapted kernels through
  `kernels(dtype)`, so the grouped (ragged_dot) and dense expert paths both use them; like
  peft's ParamWrapper the update is added to the weights (e · d · f values per projection per
  step), not computed as x A B."""
  adapts_parameters = True
  peft_name = staticmethod(peft_module_name)

  def __init__(self, base_layer, *, ranks: dict, scalings: dict, init, rngs: nnx.Rngs):
    self.base_layer = base_layer
    self.targets = tuple(p for p in EXPERT_PARAMETERS if p in ranks)
    # tuples, not dicts: static attributes are part of the (hashed) graphdef
    self.ranks = tuple(ranks[p] for p in self.targets)
    self.scalings = tuple(scalings[p] for p in self.targets)
    self.init = init
    experts = self.base_linear()
    gate, _, down = (getattr(experts, n) for n in experts.names)
    for name in self.targets:
      # gate_up_proj: A on the gate / up input [.., e, d, r], B to both outputs [.., e, r, 2f]
      shape, axes = kernel_info(gate if name == "gate_up_proj" else down)
      *lead, d_in, d_out = shape
      *lead_axes, in_axis, out_axis = axes
      d_out *= 2 if name == "gate_up_proj" else 1
      r = ranks[name]
      shape_a = (*lead, d_in, r)
      key = rngs.params()
      if init == "gaussian":  # peft: N(0, 1/r) on lora_A
        a = jax.random.normal(key, shape_a, jnp.float32) / r
      else:  # torch's kaiming_uniform_(a=sqrt(5)) on the [e * r, in] weight: U(±1/sqrt(in))
        a = jax.random.uniform(key, shape_a, jnp.float32, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
      setattr(self, f"{name}_a", LoraParam(a, **nnx_utils.axes(*lead_axes, in_axis, "lora_rank")))
      setattr(self, f"{name}_b", LoraParam(jnp.zeros((*lead, r, d_out), jnp.float32),
                                           **nnx_utils.axes(*lead_axes, "lora_rank", out_axis)))
    self.disabled = False

  @property
  def names(self):
    return self.base_linear().names

  def _deltas(self) -> tuple:
    """s · A B per expert for (gate, up, down), f32, None where not adapted."""
    out = {}
    for name, scaling in zip(self.targets, self.scalings):
      a, b = getattr(self, f"{name}_a")[...], getattr(self, f"{name}_b")[...]
      delta = scaling * jnp.einsum("...ir,...ro->...io", a, b)
      if name == "gate_up_proj":
        out["gate"], out["up"] = jnp.split(delta, 2, axis=-1)
      else:
        out["down"] = delta
    return tuple(out.get(k) for k in ("gate", "up", "down"))

  def kernels(self, dtype):
    base = self.base_layer.kernels(dtype)
    if self.off:
      return base
    return tuple(k if d is None else k + self.masked(d).astype(dtype)
                 for k, d in zip(base, self._deltas()))

  def _add(self, sign: float) -> None:
    experts = self.base_linear()
    for name, delta in zip(experts.names, self._deltas()):
      if delta is not None:
        kernel = getattr(experts, name).kernel
        kernel.set_value((jnp.asarray(kernel[...], jnp.float32) + sign * self.masked(delta))
                         .astype(kernel.dtype))

  def fold(self) -> None:
    self._add(1.0)

  def unfold(self) -> None:
    self._add(-1.0)

  # peft's layout (module doc): A [.., e * r, in] (row expert * r + k), B [.., out, r * e]
  # (column k * e + expert); both parameters adapted, gate_up_proj's keys are "base_layer."'s.
  def _prefix(self, name: str) -> str:
    return "base_layer." if name == "gate_up_proj" and len(self.targets) == 2 else ""

  def peft_tensors(self) -> dict:
    out = {}
    for name in self.targets:
      a, b = getattr(self, f"{name}_a")[...], getattr(self, f"{name}_b")[...]
      *lead, e, d_in, r = a.shape
      out[self._prefix(name) + "lora_A.weight"] = jnp.swapaxes(a, -1, -2).reshape(*lead, e * r, d_in)
      out[self._prefix(name) + "lora_B.weight"] = _reverse_last3(b).reshape(*lead, b.shape[-1], r * e)
    return out

  def load_peft_tensors(self, tensors: dict) -> None:
    for name in self.targets:
      a_var, b_var = getattr(self, f"{name}_a"), getattr(self, f"{name}_b")
      *lead, e, d_in, r = a_var.shape
      a = np.asarray(tensors[self._prefix(name) + "lora_A.weight"]).reshape(*lead, e, r, d_in)
      a_var.set_value(jnp.asarray(np.swapaxes(a, -1, -2), jnp.float32))
      b = np.asarray(tensors[self._prefix(name) + "lora_B.weight"])
      b_var.set_value(jnp.asarray(_reverse_last3(b.reshape(*lead, b.shape[-2], r, e)), jnp.float32))


def _reverse_last3(x):
  """[.., i, j, k] -> [.., k, j, i]: ftjax's B [e, r, out] <-> peft's [out, r, e] view."""
  lead = tuple(range(x.ndim - 3))
  return x.transpose(*lead, x.ndim - 1, x.ndim - 2, x.ndim - 3)
