"""What every PEFT method shares: the adapter Variable type, wrapper layers, finding target
modules in any Flax NNX model, and the model-level operations (count, merge, disable).

An adapter attaches *in place*, as HF PEFT does to a torch module: each matched layer (an
`nnx.Linear`, say) is replaced in its parent by a wrapper (`AdapterLayer`) that holds the
original as `base_layer` plus the adapter's own params, typed `AdapterParam`. So

  nnx.state(model, AdapterParam)    is the adapter tree (what trains, what is saved), and
  nnx.state(model, nnx.Param)       still includes the untouched base weights.

Layers stacked by `nnx.vmap` (a decoder's scanned layers) get adapter params stacked the same
way: leading dims of the base kernel are leading dims of the adapter's params, with the same
logical axis names, so the scan slices both together.

Module names follow torch's conventions so HF PEFT's matching rules apply unchanged: the dotted
attribute path, with the layer index after a stacked attribute ("model.layers.3.self_attn.q_proj").
A module declares which of its attributes hold vmapped layer stacks in `stacked_modules`.
"""

from __future__ import annotations

import contextlib
import re
from typing import ClassVar, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.nnx_utils import get_module, logical_name, replace_module  # noqa: F401 (peft.core.get_module)
from ftjax.quant.linear import QuantCodes, QuantLinear, QuantStat, dequantize_model


def check_adapter_name(name) -> str:
  """`name`, refused unless HF PEFT could use it: PEFT keeps adapters in torch ModuleDicts,
  whose keys are non-empty strings without "." (torch's add_module), and saves an adapter other
  than "default" in the folder <output>/<name>, so a path separator (or NUL) is refused too."""
  if not isinstance(name, str) or not name:
    raise FtjaxError(f"adapter name {name!r}: expected a non-empty string")
  bad = sorted({c for c in name if c in "./\\\0"})
  if bad:
    raise FtjaxError(f"adapter name {name!r}: {', '.join(map(repr, bad))} not allowed (HF PEFT "
                     "refuses '.', and the name becomes a folder name when saved); use e.g. "
                     "letters, digits, '_' and '-'")
  return name


class AdapterParam(nnx.Param):
  """Marks a trainable adapter leaf. `nnx.state(model, AdapterParam)` is the adapter tree; each
  method may subclass it (LoRA: `LoraParam`)."""


class AdapterLayer(nnx.Module):
  """A layer with an adapter around it: `base_layer` is the wrapped module, unchanged.

  A method's wrapper subclasses it and provides `delta(x, y)` (its additive update from the
  dropped-out input x and the base output y; a non-additive method overrides `__call__`),
  `fold()` / `unfold()` (adds its update into the base layer's weights in place, and takes it
  out again) when `mergeable`, `peft_tensors()` ({suffix: array} in HF PEFT's layout, e.g.
  {"lora_A.weight": [r, in] (or [l, r, in] in a layer stack)}) and `load_peft_tensors(tensors)`
  (the inverse). While `disabled` or `merged` is set it must return the base layer's output.

  This class owns what every wrapper must do alike, so no subclass can forget it: masking to
  the layers of a stack it adapts (`layers_to_transform`, `masked`) and dropout on its input
  (`drop`), whether the layer is called directly or through `ftjax.models.ops.project`.
  """

  base_layer: nnx.Module
  disabled: bool = False
  merged: bool = False  # folded into the base weights by merge_adapter: compute the base only
  adapter_name: str = "default"
  mergeable: ClassVar[bool] = True  # False: merge_and_unload refuses (prompt / prefix tuning)
  adapts_parameters: ClassVar[bool] = False  # True: a target_parameters wrapper (MoE experts)
  peft_prefixed: ClassVar[bool] = True  # False: PEFT keys are the bare tensor names

  layer_mask = None  # a LayerMask when adapted in some layers of a stack only
  dropout_rate: float = 0.0  # dropout on the adapter's input (LoRA's lora_dropout)
  # The layer's own dropout (an nnx.Dropout whose RNG stream has one key per layer of its
  # stack, so each layer draws its own mask); None where the keys come through ops.project.
  dropout = None

  @property
  def off(self) -> bool:
    return self.disabled or self.merged

  def __call__(self, x):
    y = self.base_layer(x)
    if self.off:
      return y
    return self.add(y, self.delta(self.drop(x), y))

  def delta(self, x, y):
    """The adapter's additive update for input x (after dropout) and base output y."""
    raise TypeError(f"{type(self).__name__} defines neither delta() nor __call__")

  def add(self, y, update):
    """y + update, the update kept only in the layers the adapter is active in."""
    return y + self.masked(update).astype(y.dtype)

  def drop(self, x, rng=None, index: int = 0):
    """Dropout on the adapter's input. `rng` (ops.project's key) decides when given: each
    module of a group folds its `index` in, so q, k and v draw independent masks. Without it
    the layer's own stream does (off under `model.eval()`); a layer of a stack whose keys come
    through ops.project has none, and a call without a key means no dropout (evaluation)."""
    if not self.dropout_rate:
      return x
    if rng is not None:
      return dropout(x, self.dropout_rate, jax.random.fold_in(rng, index))
    return self.dropout(x) if self.dropout is not None else x

  def masked(self, x):
    """x (the adapter's contribution or update) where the layer is adapted, 0 elsewhere; inside
    the layer scan the mask is this layer's scalar, outside it the stack's vector."""
    if self.layer_mask is None:
      return x
    mask = self.layer_mask[...]
    return x * mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)).astype(x.dtype)

  def layer_selected(self) -> list[bool] | None:
    """Which layers of the stack carry this adapter (None: all)."""
    return None if self.layer_mask is None else [bool(v) for v in np.asarray(self.layer_mask[...])]

  def on_attach(self) -> None:
    """Called once the layer mask is set, before the layer replaces its base (LoRA's PiSSA /
    OLoRA inits move part of the base weights into the adapter here)."""

  def base_linear(self) -> nnx.Module:
    """The innermost wrapped layer (adapters of several names form a chain)."""
    layer = self.base_layer
    while isinstance(layer, AdapterLayer):
      layer = layer.base_layer
    return layer

  def merge(self) -> nnx.Module:
    """The base layer with this adapter folded into its weights (for merge_and_unload)."""
    if not self.merged:
      self.fold()
    return self.base_layer


def dropout(x, rate: float, key):
  """Inverted dropout: each element kept with probability 1 - rate and scaled by 1/(1 - rate)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def own_dropout(rate: float, rngs: nnx.Rngs, layers: int | None) -> nnx.Dropout:
  """An nnx.Dropout with its own RNG stream; in a stack of `layers` layers one key per layer
  (sliced by the user's nnx.vmap / nnx.scan as the layer's params are)."""
  module = nnx.Dropout(rate)
  stream = rngs["dropout"]
  module.rngs = stream.split(layers) if layers else stream.fork()
  return module


class LayerMask(nnx.Variable):
  """1 for the layers of a stack an adapter is active in, 0 elsewhere (layers_to_transform):
  not trained, sliced by the layer scan like the adapter's params."""


class SavedModuleParam(AdapterParam):
  """A param of a module trained whole and saved with the adapter (`modules_to_save`)."""


def retyped_copy(module: nnx.Module, kind: type) -> nnx.Module:
  """A copy of `module` whose nnx.Params are of type `kind` (same values and metadata)."""
  copy = nnx.clone(module)
  for _, sub in nnx.iter_modules(copy):
    for name, value in list(vars(sub).items()):
      if isinstance(value, nnx.Param):
        setattr(sub, name, kind(value.get_value(), **value.get_metadata()))
  return copy


def torch_param_name(path: Sequence) -> tuple[str, bool]:
  """A param's name in torch, and whether its last two dims are transposed there: kernel ->
  weight ([out, in]), norm scale and embedding table -> weight, bias -> bias."""
  *parents, leaf = (str(p) for p in path)
  name = "bias" if leaf == "bias" else "weight" if leaf in ("kernel", "scale", "embedding") else leaf
  return ".".join([*parents, name]), leaf == "kernel"


def torch_param_tensors(module: nnx.Module) -> dict:
  """A module's params under torch's names and layout; a leading layer axis stays first."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    name, transposed = torch_param_name(path)
    out[name] = jnp.swapaxes(var.get_value(), -1, -2) if transposed else var.get_value()
  return out


class ModulesToSave(AdapterLayer):
  """HF PEFT's `modules_to_save`: a trainable copy of a whole module (the LM head, norms, ...),
  used instead of the original and saved with the adapter; the original stays untouched for
  `disable_adapters` and `unload`."""

  def __init__(self, base_layer: nnx.Module):
    self.base_layer = base_layer
    self.trained = retyped_copy(base_layer, SavedModuleParam)
    self.disabled = False

  def active(self) -> nnx.Module:
    return self.base_layer if self.disabled else self.trained

  def __call__(self, *args, **kwargs):
    return self.active()(*args, **kwargs)

  def attend(self, query):  # an embedding table that is also the output head
    return self.active().attend(query)

  def merge(self) -> nnx.Module:
    return retyped_copy(self.trained, nnx.Param)

  def peft_tensors(self) -> dict:
    return torch_param_tensors(self.trained)

  def load_peft_tensors(self, tensors: dict) -> None:
    for path, var in nnx.to_flat_state(nnx.state(self.trained, nnx.Param)):
      name, transposed = torch_param_name(path)
      value = np.asarray(tensors[name])
      var.set_value(jnp.asarray(np.swapaxes(value, -1, -2) if transposed else value, var.dtype))


# --- module names and target matching -------------------------------------------------------

def _name(path: Sequence) -> str:
  return "/".join(str(p) for p in path)


def stack_sizes(model: nnx.Module) -> dict[str, int]:
  """Path of each vmapped layer stack ("model/layers") -> its number of layers."""
  out = {}
  for path, module in nnx.iter_modules(model):
    for attr in getattr(type(module), "stacked_modules", ()):
      stack = getattr(module, attr, None)
      leaves = jax.tree.leaves(nnx.state(stack)) if stack is not None else []
      if leaves:
        out[_name((*path, attr))] = leaves[0].shape[0]
  return out


def stack_of(path: str, stacks: dict[str, int]) -> str | None:
  """The layer stack ("model/layers") a module's path lies in, or None."""
  path = logical_name(path)
  return next((s for s in stacks if path.startswith(s + "/")), None)


def keyed_paths(model: nnx.Module) -> list[str]:
  """Paths of the modules whose projections get the step's dropout key through
  ftjax.models.ops.project (their owner lists them in `keyed_modules`, as ftjax's decoder
  does for its layer stack): adapters there need no RNG stream of their own."""
  return [_name((*path, attr)) for path, module in nnx.iter_modules(model)
          for attr in getattr(type(module), "keyed_modules", ())]


def torch_names(path: str, stacks: dict[str, int]) -> tuple[list[str], bool]:
  """"model/layers/self_attn/q_proj" -> (["model.layers.0.self_attn.q_proj", ...], True): one
  name per layer when the module sits in a layer stack (stacked=True), else just one."""
  path = logical_name(path)
  for stack, size in stacks.items():
    if path.startswith(stack + "/"):
      rest = path[len(stack) + 1:].replace("/", ".")
      return [f"{stack.replace('/', '.')}.{i}.{rest}" for i in range(size)], True
  return [path.replace("/", ".")], False


def _matches(target_modules, key: str) -> bool:
  """HF PEFT's rule: a string is a regex that must match the whole name; a list matches a name
  exactly or as its last dotted components."""
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, key) is not None
  return any(key == t or key.endswith("." + t) for t in target_modules)


def layer_index(name: str, stacked_index: int | None) -> int | None:
  """The layer a module belongs to: its index in a layer stack, else HF PEFT's parse of the
  first numeric name component after another ("model.layers.3.self_attn.q_proj" -> 3)."""
  if stacked_index is not None:
    return stacked_index
  match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
  return int(match.group("idx")) if match else None


def find_targets(model: nnx.Module, target_modules, supported: tuple[type, ...], method: str,
                 layers=None) -> list[tuple[str, nnx.Module, tuple[bool, ...] | None]]:
  """(path, module, layer mask) of every module `target_modules` selects, as HF PEFT does.

  "all-linear": every supported layer except the model's output head (named by the model's
  `output_module` attribute, as HF PEFT leaves out `lm_head`). `layers` (layers_to_transform)
  keeps only modules of those layers; a module of a layer stack then gets a mask of the stack's
  layers it is adapted in (None: all of them). Without `layers`, a stacked module matched in
  some layers but not all is an error, as is a matched module of an unsupported type.
  """
  stacks = stack_sizes(model)
  output = getattr(model, "output_module", None)
  copies = [_name(p) + "/trained/" for p, m in nnx.iter_modules(model) if isinstance(m, ModulesToSave)]
  found, seen = [], []
  for path, module in nnx.iter_modules(model):
    # A wrapped layer is reached through its wrappers: match the innermost, by its plain name;
    # never inside a module another adapter trains whole.
    if not path or isinstance(module, AdapterLayer) or any(_name(path).startswith(c) for c in copies):
      continue
    real, name = _name(path), logical_name(_name(path))
    if isinstance(module, supported):
      seen.append(name)
    keys, stacked = torch_names(name, stacks)
    if target_modules == "all-linear":
      hits = [isinstance(module, supported) and name != output] * len(keys)
    else:
      hits = [_matches(target_modules, k) for k in keys]
    if layers is not None:
      hits = [h and layer_index(k, i if stacked else None) in layers for i, (h, k) in enumerate(zip(hits, keys))]
    if not any(hits):
      continue
    if not all(hits) and layers is None:
      raise FtjaxError(
          f"{method} target_modules={target_modules!r} selects {name.replace('/', '.')} in layers "
          f"{[i for i, h in enumerate(hits) if h]} but not in all {len(hits)}; to adapt some "
          "layers of a stack only, say which with layers_to_transform")
    if not isinstance(module, supported):
      raise FtjaxError(
          f"{method} target_modules={target_modules!r} selects {keys[0]}, a "
          f"{type(module).__name__}; {method} wraps {', '.join(t.__name__ for t in supported)}")
    found.append((real, module, None if all(hits) else tuple(hits)))
  if not found:
    examples = ", ".join(sorted(torch_names(n, stacks)[0][0] for n in seen)[:8])
    raise FtjaxError(f"{method} target_modules={target_modules!r} match no module"
                     + (f" in layers_to_transform={list(layers)}" if layers is not None else "")
                     + f"; the layers {method} can wrap are named e.g. {examples} (or use "
                     "'all-linear')")
  return found


def find_modules_to_save(model: nnx.Module, names, taken: set[str]) -> list[tuple[str, nnx.Module]]:
  """HF PEFT's rule for `modules_to_save`: a module whose name ends with one of `names`
  (not necessarily at a dot: "norm" also selects "input_layernorm")."""
  stacks = stack_sizes(model)
  found = []
  for path, module in nnx.iter_modules(model):
    name = _name(path)
    if not path or any(name == t or name.startswith(t + "/") for t in taken):
      continue
    if isinstance(module, ModulesToSave):
      raise FtjaxError(f"modules_to_save={list(names)}: {logical_name(name).replace('/', '.')} "
                       "is already trained whole by another adapter")
    if isinstance(module, AdapterLayer) or "base_layer" in name.split("/"):
      continue
    keys, _ = torch_names(name, stacks)
    hits = [any(k.endswith(n) for n in names) for k in keys]
    if any(hits) and not all(hits):
      raise FtjaxError(f"modules_to_save={list(names)} selects {name.replace('/', '.')} in some "
                       "layers but not all; the layers are stacked and share one shape")
    if all(hits):
      found.append((name, module))
  if not found:
    raise FtjaxError(f"modules_to_save={list(names)} match no module")
  # The outermost of nested matches: a selected module is trained whole.
  return [(n, m) for n, m in found if not any(n.startswith(o + "/") for o, _ in found)]


def adapter_layers(model: nnx.Module) -> Iterator[tuple[str, AdapterLayer]]:
  """(path, wrapper) of every attached adapter layer."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, AdapterLayer):
      yield _name(path), module


# --- method configs ---------------------------------------------------------------------------

class PeftConfig:
  """What every method's config provides. Each is a frozen dataclass named and shaped as in HF
  PEFT, with:

    peft_type          "LORA", "IA3", ...: adapter_config.json's key
    attach(model, rngs)   adds the adapter to `model` in place
    to_peft(model, adapter_name)  the adapter_config.json dict of that attached adapter
    from_peft(raw)     (classmethod) the config from an adapter_config.json dict
  """

  peft_type: ClassVar[str]


class WrapperConfig(PeftConfig):
  """A method that wraps each target layer in an AdapterLayer (LoRA, IA3). Subclasses define
  `wrap(module, rngs, names) -> AdapterLayer`, `names` being the layer's torch-style names (one
  per layer of a stack)."""

  method: ClassVar[str]  # for messages: "LoRA"
  supported: ClassVar[tuple[type, ...]]  # the layer types it wraps
  default_targets: ClassVar[dict[str, tuple[str, ...]]]  # model_type -> HF PEFT's defaults

  def targets(self, model: nnx.Module):
    if self.target_modules is not None:
      return self.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in self.default_targets:
      raise FtjaxError(f"{type(self).__name__}.target_modules is required for this model (a "
                       "regex, a list of module names, or 'all-linear')")
    return self.default_targets[model_type]

  def attach(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
    stacks = stack_sizes(model)
    keyed = keyed_paths(model)
    wrapped = set()
    layers = getattr(self, "layers_to_transform", None)
    for path, module, mask in find_targets(model, self.targets(model), self.supported,
                                           self.method, layers):
      names = torch_names(path, stacks)[0]
      if mask is not None:  # adapted in some layers of the stack only
        names = [n for n, on in zip(names, mask) if on]
      layer = self.wrap(module, rngs, names)
      if mask is not None:
        layer.layer_mask = LayerMask(jnp.asarray(mask, jnp.float32), out_sharding=("layers",),
                                     eager_sharding=False)
      if layer.dropout_rate and not any(logical_name(path).startswith(k + "/") for k in keyed):
        layer.dropout = own_dropout(layer.dropout_rate, rngs, stacks.get(stack_of(path, stacks)))
      layer.on_attach()
      replace_module(model, path, layer)
      wrapped.add(path)
    attach_modules_to_save(model, self.modules_to_save, wrapped)

  def saved_targets(self, model: nnx.Module, adapter_name: str):
    """target_modules as adapter_config.json records it: a regex stays a regex (it means the
    same to PEFT, whose module names match ours); names and "all-linear" become the list of
    wrapped names, as PEFT itself saves "all-linear"."""
    if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
      return self.target_modules
    return sorted({logical_name(path).rsplit("/", 1)[-1] for path, layer in adapter_layers(model)
                   if layer.adapter_name == adapter_name and not isinstance(layer, ModulesToSave)
                   and not layer.adapts_parameters})


def attach_modules_to_save(model: nnx.Module, names, wrapped: set[str]) -> None:
  """Wraps every module `names` selects (see find_modules_to_save) in a ModulesToSave."""
  if names:
    for path, module in find_modules_to_save(model, names, wrapped):
      replace_module(model, path, ModulesToSave(module))


def as_list(names):
  """A config's tuple of names as adapter_config.json writes it (None stays None)."""
  return None if names is None else list(names)


def as_tuple(names):
  """adapter_config.json's names (a list, a regex string, or null) as a config holds them."""
  return names if isinstance(names, str) or names is None else tuple(names)


def refuse_unsupported(raw: dict, defaults: dict) -> None:
  """adapter_config.json keys ftjax cannot honour yet: refuse when set, never load silently
  a different adapter than the file describes."""
  for key, default in defaults.items():
    if raw.get(key) not in (default, None, {}, [], False):
      raise FtjaxError(f"{key}={raw[key]!r} is not supported yet")


# --- model-level operations -----------------------------------------------------------------

def count_params(model: nnx.Module, trainable=AdapterParam) -> tuple[int, int]:
  """(trainable, all) parameter counts; `trainable` is an nnx filter (default: the adapters).
  Adapter rows of stacked layers a layers_to_transform mask leaves out are not counted."""

  def per_element(v) -> int:  # packed 4-bit codes count two per byte, int8 one; their block
    if isinstance(v, QuantCodes):  # statistics not at all (as PEFT counts bitsandbytes)
      return 2 if v.dtype == jnp.uint8 else 1
    return 0 if isinstance(v, QuantStat) else 1

  def size(state):
    return sum(v.size * per_element(v)
               for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  unused = 0
  for _, layer in adapter_layers(model):
    if layer.layer_mask is not None:
      own = sum(x.size for p, x in nnx.to_flat_state(nnx.state(layer, AdapterParam))
                if "base_layer" not in (str(c) for c in p))
      mask = layer.layer_selected()
      unused += own * mask.count(False) // len(mask)
  return size(nnx.state(model, trainable)) - unused, size(nnx.state(model, nnx.Param)) - unused


def print_trainable_parameters(model: nnx.Module, trainable=AdapterParam) -> tuple[int, int]:
  """Prints HF PEFT's line ("trainable params: ... || all params: ... || trainable%: ...")."""
  n_train, n_all = count_params(model, trainable)
  print(f"trainable params: {n_train:,d} || all params: {n_all:,d} || "
        f"trainable%: {100 * n_train / max(n_all, 1):.4f}")
  return n_train, n_all


def can_merge(model: nnx.Module) -> bool:
  """Whether every attached adapter has a merged form (LoRA, DoRA, IA3, modules_to_save)."""
  return all(layer.mergeable for _, layer in adapter_layers(model))


def _forget_adapters(model: nnx.Module) -> None:
  for attr in ("peft_config", "peft_active"):
    if hasattr(model, attr):
      delattr(model, attr)


def _refuse_unmergeable(model: nnx.Module, what: str) -> list:
  layers = list(adapter_layers(model))  # inner wrappers of a chain come first
  for path, layer in layers:
    if not layer.mergeable and not layer.disabled:
      raise FtjaxError(f"{what}: {type(layer).__name__} at {path.replace('/', '.')} cannot be "
                       "folded into the base weights (virtual tokens and non-linear adapters "
                       "have no merged form); keep the adapter, or ftjax.peft.unload to drop it")
  return layers


def merge_and_unload(model: nnx.Module) -> nnx.Module:
  """Folds the active adapters into their base layers, drops inactive ones and removes every
  wrapper (in place); returns the model, now a plain model of its original structure (e.g. for
  `ftjax.models.save_pretrained`). Refused, before anything changes, when an active method has
  no weights to merge into."""
  layers = _refuse_unmergeable(model, "merge_and_unload")
  for path, layer in layers:
    replace_module(model, path, layer.base_layer if layer.disabled else layer.merge())
  _forget_adapters(model)
  return model


def merged_model(model: nnx.Module) -> nnx.Module:
  """A float copy of `model` with its adapter folded in: a 4-bit base is dequantised first and
  the adapter merged in f32 (so the merged weights are the dequantised ones plus the update,
  not a re-quantisation). The model itself when it has neither adapter nor 4-bit base, or an
  adapter without a merged form (virtual tokens, bottleneck adapters)."""
  adapters = any(True for _ in adapter_layers(model))
  quantised = any(isinstance(m, QuantLinear) for _, m in nnx.iter_modules(model))
  if adapters and not can_merge(model) or not adapters and not quantised:
    return model
  clone = dequantize_model(nnx.clone(model))
  return merge_and_unload(clone) if adapters else clone


def merged_for_gguf(model: nnx.Module) -> nnx.Module:
  """`merged_model`, refusing an adapter without a merged form: a GGUF file holds weights only
  (ftjax.models.save_gguf folds adapters in through this)."""
  if any(True for _ in adapter_layers(model)) and not can_merge(model):
    raise FtjaxError("save_gguf: the attached adapter has no merged form (it is not a weight "
                     "update), so it cannot be written into a GGUF file")
  return merged_model(model)


def merge_adapter(model: nnx.Module) -> nnx.Module:
  """Folds the active adapters into the base weights in place, keeping them attached (the
  model then computes at the base model's cost); `unmerge_adapter` takes them out again, up to
  f32 rounding. Refused, before anything changes, for methods without a merged form."""
  for _, layer in _refuse_unmergeable(model, "merge_adapter"):
    # modules_to_save copies have nothing to fold: they keep replacing their module.
    if not layer.disabled and not layer.merged and not isinstance(layer, ModulesToSave):
      layer.fold()
      layer.merged = True
  return model


def unmerge_adapter(model: nnx.Module) -> nnx.Module:
  """Takes what `merge_adapter` folded back out of the base weights."""
  for _, layer in reversed(list(adapter_layers(model))):
    if layer.merged:
      layer.unfold()
      layer.merged = False
  return model


def unload(model: nnx.Module) -> nnx.Module:
  """Removes every adapter without merging it (in place): back to the base model."""
  for path, layer in list(adapter_layers(model)):
    replace_module(model, path, layer.base_layer)
  _forget_adapters(model)
  return model


@contextlib.contextmanager
def disable_adapters(model: nnx.Module):
  """`with disable_adapters(model):` the model computes as its base model."""
  layers = [layer for _, layer in adapter_layers(model)]
  before = [layer.disabled for layer in layers]
  for layer in layers:
    layer.disabled = True
  try:
    yield model
  finally:
    for layer, was in zip(layers, before):
      layer.disabled = was
