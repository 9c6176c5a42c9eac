"""LoRA (Hu et al. 2021), rsLoRA and DoRA: y = base(x) + s · (dropout(x) A) B, trained factored.

A: [in, r], B: [r, out], s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). B starts at zero,
so the adapted model equals the base model at step 0. A starts as in HF PEFT: kaiming-uniform
(bound 1/sqrt(in); `init_lora_weights=True`) or N(0, 1/r) (`"gaussian"`).

DoRA (Liu et al. 2024, `use_dora=True`) splits the adapted weight into a trained magnitude m
per output feature and a direction: W' = m · (W + sAB) / ||W + sAB||, the norm taken per output
feature over the inputs and detached from the gradient (DoRA §4.3, as HF PEFT does); m starts
as ||W||, so the model starts as the base.

`LoraLinear` / `DoraLinear` wrap an `nnx.Linear`; `LoraEinsum` wraps an `nnx.Einsum` whose kernel
dims split into contracted (input) and output dims: A is [contracted dims..., r], B [r, output
dims...]. In stacked (vmapped) layers all of them carry the kernel's leading layer axis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ftjax.errors import FtjaxError
from ftjax import nnx_utils
from ftjax.quant.linear import QuantLinear
from ftjax.peft.core import (AdapterLayer, AdapterParam, WrapperConfig, as_list, as_tuple,
                             refuse_unsupported)

# init_lora_weights values ftjax implements; PiSSA and OLoRA also rewrite the base weights.
INITS = (True, "gaussian", "pissa", "olora")
BASE_CHANGING_INITS = ("pissa", "olora")

# HF PEFT's default targets when `target_modules` is None, by model_type.
DEFAULT_TARGETS = {t: ("q_proj", "v_proj") for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                   "gemma3_text", "mixtral")}
# phi3: the installed peft has no default for it; its fused qkv_proj carries q and v.
DEFAULT_TARGETS["phi3"] = ("qkv_proj",)


# LoRA on parameters rather than modules (`target_parameters`: the MoE experts and router) is
# built in ftjax/peft/experts.py on this module's layers. ftjax.peft plugs experts.py's two
# functions in when it loads (as it hands ftjax.models its merge function), so this module
# never imports experts.py back.
def _unplugged_resolve(config, model_type):
  return config


def _unplugged_attach(config, model, rngs):
  raise FtjaxError("LoraConfig: target_parameters needs ftjax.peft.experts (import ftjax.peft)")


_resolve_parameter_targets, _attach_parameter_targets = _unplugged_resolve, _unplugged_attach


def plug_parameter_targets(resolve, attach) -> None:
  """`resolve(config, model_type)` -> the config as HF PEFT rewrites it for that model;
  `attach(config, model, rngs)` wraps its target_parameters (ftjax.peft calls this)."""
  global _resolve_parameter_targets, _attach_parameter_targets
  _resolve_parameter_targets, _attach_parameter_targets = resolve, attach


@dataclasses.dataclass(frozen=True)
class LoraConfig(WrapperConfig):
  """HF PEFT's `LoraConfig`, same names and defaults, for the options ftjax implements.

  target_modules: a regex that must match a module's whole name, a list of names matched
    exactly or as the last components of a name, or "all-linear" (every linear layer but the
    output head). Names are torch-style: "model.layers.0.self_attn.q_proj".
  init_lora_weights: True (kaiming-uniform A, PEFT's default), "gaussian" (A ~ N(0, 1/r)),
    "pissa" (A, B from the base weight's top-r singular triplets; the base keeps the residual,
    W - U_r S_r V_r^T, computed by an exact SVD) or "olora" (A, B from the base weight's QR
    factors; the base keeps W - s Q_r R_r). PiSSA and OLoRA change the base layer's weights, as
    in HF PEFT, so a PEFT adapter saved with them loads as the model PEFT reloads; they need
    float nnx.Linear layers and no DoRA. PEFT's other inits (randomised "pissa_niter_N",
    "loftq", "eva", "corda", ...) are refused: ftjax cannot rebuild the base they change.
  rank_pattern / alpha_pattern: {pattern: r or alpha} overriding r / lora_alpha for the layers
    whose name ends with the pattern (HF PEFT's rule, a regex on the last name components);
    in a layer stack every layer must get the same values.
  """
  peft_type: ClassVar[str] = "LORA"
  method: ClassVar[str] = "LoRA"
  supported: ClassVar[tuple] = (nnx.Linear, nnx.Einsum, QuantLinear)
  default_targets: ClassVar[dict] = DEFAULT_TARGETS

  r: int = 8
  lora_alpha: float = 8
  target_modules: str | tuple[str, ...] | None = None
  # nn.Parameters adapted directly (HF PEFT's target_parameters): the MoE families' expert
  # stacks "experts.gate_up_proj" / "experts.down_proj" and the router "gate.weight"
  # (ftjax/peft/experts.py)
  target_parameters: tuple[str, ...] | None = None
  lora_dropout: float = 0.0
  use_rslora: bool = False
  init_lora_weights: bool | str = True
  use_dora: bool = False
  modules_to_save: tuple[str, ...] | None = None
  rank_pattern: tuple[tuple[str, int], ...] = ()  # a dict is accepted: hashable once stored
  alpha_pattern: tuple[tuple[str, float], ...] = ()
  layers_to_transform: tuple[int, ...] | None = None
  layers_pattern: str | None = None
  bias: str = "none"
  task_type: str | None = None

  def __post_init__(self):
    for key in ("target_modules", "modules_to_save", "target_parameters"):
      if isinstance(getattr(self, key), (list, set)):
        object.__setattr__(self, key, tuple(sorted(getattr(self, key))))
    for key in ("rank_pattern", "alpha_pattern"):
      object.__setattr__(self, key, tuple(dict(getattr(self, key) or {}).items()))
    if self.layers_to_transform is not None and isinstance(self.target_modules, str):
      raise FtjaxError("LoraConfig: layers_to_transform needs target_modules as a list of names "
                       "(as in HF PEFT), not a regex or 'all-linear'")
    if isinstance(self.layers_to_transform, int):
      object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))
    elif self.layers_to_transform is not None:
      object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))
    if any(not (isinstance(r, int) and r > 0) for _, r in self.rank_pattern):
      raise FtjaxError(f"LoraConfig: rank_pattern={dict(self.rank_pattern)}; ranks must be positive integers")
    if not (isinstance(self.r, int) and self.r > 0):
      raise FtjaxError(f"LoraConfig: r={self.r!r}; expected a positive integer")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise FtjaxError(f"LoraConfig: lora_dropout={self.lora_dropout}; expected a value in [0, 1)")
    if self.init_lora_weights not in INITS:
      raise FtjaxError(f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not supported; "
                       f"expected one of {INITS}")
    if self.init_lora_weights in BASE_CHANGING_INITS and self.use_dora:
      raise FtjaxError(f"LoraConfig: init_lora_weights={self.init_lora_weights!r} with "
                       "use_dora=True is not supported")
    if self.bias != "none":
      raise FtjaxError(f"LoraConfig: bias={self.bias!r}; only 'none' is supported")

  @property
  def scaling(self) -> float:
    return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

  def rank_and_alpha(self, names) -> tuple[int, float]:
    """(r, lora_alpha) of the layer named `names` (one name per layer of a stack)."""
    values = {(_pattern_value(self.rank_pattern, n, self.r),
               _pattern_value(self.alpha_pattern, n, self.lora_alpha)) for n in names or ("",)}
    if len(values) > 1:
      raise FtjaxError(f"LoraConfig: rank_pattern / alpha_pattern give {names[0]} different values "
                       "in different layers; the layers are stacked and share one adapter shape")
    return values.pop()

  def wrap(self, module: nnx.Module, rngs: nnx.Rngs, names=()) -> AdapterLayer:
    *_, d_in, d_out = kernel_info(module)[0]
    r, alpha = self.rank_and_alpha(names)
    if isinstance(module, nnx.Linear) and r > min(d_in, d_out):
      raise FtjaxError(f"LoraConfig: r={r} is larger than the layer "
                       f"{names[0] if names else type(module).__name__} ({d_in} -> {d_out}): a "
                       "rank above min(in, out) adds parameters but no expressiveness")
    if self.init_lora_weights in BASE_CHANGING_INITS and type(module) is not nnx.Linear:
      raise FtjaxError(f"LoraConfig: init_lora_weights={self.init_lora_weights!r} rewrites the base "
                       f"weights of {names[0] if names else 'the layer'}, which needs a float "
                       f"nnx.Linear, not a {type(module).__name__}")
    if not isinstance(module, nnx.Einsum):  # nnx.Linear or a quantised linear
      kind = DoraLinear if self.use_dora else LoraLinear
    elif self.use_dora:
      raise FtjaxError(f"LoraConfig(use_dora=True) wraps nnx.Linear layers only, not "
                       f"{type(module).__name__}")
    else:
      kind = LoraEinsum
    scaling = alpha / (math.sqrt(r) if self.use_rslora else r)
    return kind(module, r=r, scaling=scaling, dropout=self.lora_dropout,
                init=self.init_lora_weights, rngs=rngs)

  def resolved(self, model: nnx.Module) -> "LoraConfig":
    """This config as HF PEFT applies it to `model`: on a mixture-of-experts model "all-linear"
    and transformers 4's expert names also adapt the experts and the router (experts.py)."""
    return _resolve_parameter_targets(self, getattr(getattr(model, "config", None), "model_type", None))

  def attach(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
    config = self.resolved(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # Only parameters targeted: target_modules empty, or None without a default (as peft)
    only_parameters = config.target_parameters and (
        config.target_modules == () or config.target_modules is None and model_type not in DEFAULT_TARGETS)
    if not only_parameters:
      super(LoraConfig, config).attach(model, rngs)
    if config.target_parameters:
      _attach_parameter_targets(config, model, rngs)

  def to_peft(self, model: nnx.Module, adapter_name: str = "default") -> dict:
    c = self.resolved(model)  # what peft itself saves for this model (MoE: experts.py)
    return {
        "peft_type": c.peft_type, "task_type": c.task_type, "r": c.r,
        "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
        "target_modules": c.saved_targets(model, adapter_name), "use_rslora": c.use_rslora,
        "target_parameters": as_list(c.target_parameters),
        "use_dora": c.use_dora, "bias": c.bias, "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": as_list(c.modules_to_save),
        "init_lora_weights": c.init_lora_weights,
        "rank_pattern": dict(c.rank_pattern), "alpha_pattern": dict(c.alpha_pattern),
        "layers_to_transform": as_list(c.layers_to_transform),
        "layers_pattern": c.layers_pattern,
    }

  @classmethod
  def from_peft(cls, raw: dict) -> "LoraConfig":
    refuse_unsupported(raw, {"fan_in_fan_out": False, "use_qalora": False})
    if raw.get("target_modules") is None and not raw.get("target_parameters"):
      raise FtjaxError("missing key 'target_modules'")
    return cls(r=int(raw["r"]), lora_alpha=raw.get("lora_alpha", 8),
               target_modules=as_tuple(raw.get("target_modules")),
               target_parameters=as_tuple(raw.get("target_parameters") or None),
               lora_dropout=float(raw.get("lora_dropout") or 0.0),
               use_rslora=bool(raw.get("use_rslora")), use_dora=bool(raw.get("use_dora")),
               init_lora_weights=_init_from_peft(raw.get("init_lora_weights", True)),
               modules_to_save=as_tuple(raw.get("modules_to_save") or None),
               rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
               layers_to_transform=raw.get("layers_to_transform"),
               layers_pattern=raw.get("layers_pattern") or None,
               bias=raw.get("bias") or "none", task_type=raw.get("task_type"))


def _init_from_peft(value):
  """adapter_config.json's init_lora_weights as ftjax holds it. False (PEFT's random B) loads
  as True: both factors come from the file, and only PiSSA / OLoRA change anything else."""
  if value is False or value is None:
    return True
  if value not in INITS:
    raise FtjaxError(f"init_lora_weights={value!r} is not supported: it changes the base weights "
                     "at load in a way ftjax does not rebuild (supported: True, False, 'gaussian', "
                     "'pissa', 'olora'); convert the adapter to plain LoRA in PEFT first "
                     "(save_pretrained's path_initial_model_for_weight_conversion)")
  return value


def _pattern_value(pattern, name: str, default):
  """HF PEFT's get_pattern_key: the first key that matches the end of the name."""
  for key, value in pattern:
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


class LoraParam(AdapterParam):
  """A LoRA factor (A or B)."""


def _kernel_axes(kernel: nnx.Variable) -> tuple:
  names = kernel.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * kernel.ndim


def kernel_info(layer) -> tuple[tuple[int, ...], tuple]:
  """(shape, logical axes) of a linear layer's float kernel [..., in, out]; a quantised layer
  (ftjax.quant.QuantLinear) reports those of the kernel it stands for."""
  if isinstance(layer, QuantLinear):
    return tuple(layer.kernel_shape), tuple(layer.kernel_axes)
  return tuple(layer.kernel.shape), _kernel_axes(layer.kernel)


def float_kernel(layer):
  """A linear layer's kernel [..., in, out] in f32 (dequantised for a quantised layer)."""
  if isinstance(layer, QuantLinear):
    return layer.float_kernel(jnp.float32)
  return jnp.asarray(layer.kernel[...], jnp.float32)


def _writable_kernel(layer):
  if not hasattr(layer, "kernel"):
    raise FtjaxError(f"cannot fold an adapter into the 4-bit weights of {type(layer).__name__}: "
                     "dequantise the model first (ftjax.quant.dequantize_model); merged exports "
                     "do that")
  return layer.kernel


class _Lora(AdapterLayer):
  """A and B for a kernel viewed as [lead..., *in_shape, *out_shape]. Subclasses define
  `_xa(x)` (x @ A), `_update(y, xd, xa)` (the update from the base output y, the dropped-out
  input xd and xa = xd @ A) and `_delta()` (s · A B in the kernel's layout, f32); masking and
  dropout come from AdapterLayer."""

  def __init__(self, base_layer, *, in_shape, out_shape, in_axes, out_axes, r: int,
               scaling: float, dropout: float, init, rngs: nnx.Rngs):
    shape, names = kernel_info(base_layer)
    n_lead = len(shape) - len(in_shape) - len(out_shape)
    lead, lead_axes = shape[:n_lead], names[:n_lead]
    key = rngs.params()
    shape_a = (*lead, *in_shape, r)
    if init == "gaussian":
      a = jax.random.normal(key, shape_a, jnp.float32) / r
    else:  # torch's kaiming_uniform_(a=sqrt(5)) on the [r, in] weight: U(-1/sqrt(in), 1/sqrt(in))
      bound = 1.0 / math.sqrt(math.prod(in_shape))
      a = jax.random.uniform(key, shape_a, jnp.float32, -bound, bound)
    self.base_layer = base_layer
    self.lora_a = LoraParam(a, **nnx_utils.axes(*lead_axes, *in_axes, "lora_rank"))
    self.lora_b = LoraParam(jnp.zeros((*lead, r, *out_shape), jnp.float32),
                            **nnx_utils.axes(*lead_axes, "lora_rank", *out_axes))
    self.r, self.scaling, self.dropout_rate = r, scaling, dropout
    self.init = init
    self.disabled = False

  def delta(self, x, y):
    return self._update(y, x, self._xa(x))

  def fold(self) -> None:
    kernel = _writable_kernel(self.base_linear())
    update = self.masked(self._delta())
    kernel.set_value((jnp.asarray(kernel[...], jnp.float32) + update).astype(kernel.dtype))

  def unfold(self) -> None:
    kernel = _writable_kernel(self.base_linear())
    update = self.masked(self._delta())
    kernel.set_value((jnp.asarray(kernel[...], jnp.float32) - update).astype(kernel.dtype))

  # HF PEFT layout: lora_A.weight [r, in], lora_B.weight [out, r] (torch Linear weights;
  # an einsum's dims flattened), with any leading layer axis kept first.
  def peft_tensors(self) -> dict:
    a, b = self.lora_a[...], self.lora_b[...]
    n_lead = a.ndim - 1 - len(self._in_shape)
    a = a.reshape(*a.shape[:n_lead], -1, self.r)
    b = b.reshape(*b.shape[:n_lead], self.r, -1)
    return {"lora_A.weight": jnp.swapaxes(a, -1, -2), "lora_B.weight": jnp.swapaxes(b, -1, -2)}

  def load_peft_tensors(self, tensors: dict) -> None:
    """The inverse of `peft_tensors` (shapes checked by the caller)."""
    for suffix, var in (("lora_A.weight", self.lora_a), ("lora_B.weight", self.lora_b)):
      var.set_value(jnp.asarray(np.swapaxes(tensors[suffix], -1, -2).reshape(var.shape), jnp.float32))


class LoraLinear(_Lora):
  """LoRA around an `nnx.Linear` (kernel [..., in, out])."""

  def __init__(self, base_layer: nnx.Linear, **kwargs):
    shape, names = kernel_info(base_layer)
    (in_axis, out_axis), (d_in, d_out) = names[-2:], shape[-2:]
    super().__init__(base_layer, in_shape=(d_in,), out_shape=(d_out,), in_axes=(in_axis,),
                     out_axes=(out_axis,), **kwargs)
    self._in_shape = (d_in,)

  def _xa(self, x):
    return jnp.dot(x, self.lora_a[...].astype(x.dtype))

  def _update(self, y, xd, xa):
    """The update from the base output y, the dropped-out input xd and xa = xd @ A."""
    del xd
    return jnp.dot(xa * self.scaling, self.lora_b[...].astype(xa.dtype))

  @classmethod
  def project_many(cls, x, modules: Sequence["LoraLinear"], rng=None) -> list:
    """Several LoRA linears reading the same x [tokens, in] (ftjax.models.ops.project).

    Without dropout, one x @ [A_1 | A_2 | ...] for all of them: three thin matmuls (q, k, v)
    cost about as much as one, so this cuts the LoRA forward and backward passes. With
    dropout each module draws its own mask (as PEFT's one nn.Dropout per layer) and the
    products stay one batched matmul over the modules' dropped-out inputs. `rng`: the dropout
    key; None means no dropout for layers without a stream of their own.
    """
    outs = [m.base_layer(x) for m in modules]
    active = [i for i, m in enumerate(modules) if not m.off]
    if not active:
      return outs
    chosen = [modules[i] for i in active]
    xds = [m.drop(x, rng, index=i) for i, m in zip(active, chosen)]
    for i, m, xd, xa in zip(active, chosen, xds, _grouped_xa(x, xds, chosen)):
      outs[i] = m.add(outs[i], m._update(outs[i], xd, xa))
    return outs

  def _delta(self):
    return self.scaling * jnp.matmul(self.lora_a[...], self.lora_b[...])

  def on_attach(self) -> None:
    if self.init in BASE_CHANGING_INITS:
      a, b = (_pissa_factors if self.init == "pissa" else _olora_factors)(
          float_kernel(self.base_linear()), self.r, self.scaling)
      self.lora_a.set_value(a)
      self.lora_b.set_value(b)
      self.unfold()  # the base keeps W - s A B, so the model starts as the base model


def _grouped_xa(x, xds: list, modules: list) -> list:
  """xd_i @ A_i for LoRA modules reading x, xd_i being module i's dropped-out x (x itself
  without dropout), each product tagged "adapter" for the `projections` remat policy."""
  a = [m.lora_a[...].astype(x.dtype) for m in modules]
  if all(xd is x for xd in xds):  # one matmul for the whole group
    xa = checkpoint_name(jnp.dot(x, jnp.concatenate(a, axis=-1)), "adapter")
    return jnp.split(xa, np.cumsum([m.r for m in modules])[:-1].tolist(), axis=-1)
  if len({ai.shape for ai in a}) == 1:  # one batched matmul over the modules' own inputs
    xa = checkpoint_name(jnp.einsum("gti,gir->gtr", jnp.stack(xds), jnp.stack(a)), "adapter")
    return list(xa)
  return [checkpoint_name(jnp.dot(xd, ai), "adapter") for xd, ai in zip(xds, a)]


def _pissa_factors(kernel, r: int, scaling: float):
  """PEFT's pissa_init on a kernel [..., in, out]: with W = kernel^T = V S Uh (exact SVD),
  A = diag(sqrt(S_r / s)) Uh_r and B = V_r diag(sqrt(S_r / s)), in ftjax's layout
  ([in, r], [r, out]); s A B is W's best rank-r approximation, whatever the signs."""
  v, sv, uh = jnp.linalg.svd(jnp.swapaxes(kernel, -1, -2), full_matrices=False)
  root = jnp.sqrt(sv[..., :r] / scaling)
  a = jnp.swapaxes(uh[..., :r, :], -1, -2) * root[..., None, :]
  b = jnp.swapaxes(v[..., :, :r], -1, -2) * root[..., :, None]
  return a, b


def _olora_factors(kernel, r: int, scaling: float):
  """PEFT's olora_init on a kernel [..., in, out]: W = kernel^T = Q R, A = R_r, B = Q_r (the
  product Q_r R_r does not depend on the QR's sign choices), in ftjax's layout."""
  del scaling  # OLoRA's factors are unscaled: the base gives up s Q_r R_r
  q, rr = jnp.linalg.qr(jnp.swapaxes(kernel, -1, -2))
  return jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)


class DoraLinear(LoraLinear):
  """DoRA around an `nnx.Linear`: LoRA's A and B plus a magnitude per output feature."""

  def __init__(self, base_layer: nnx.Linear, **kwargs):
    super().__init__(base_layer, **kwargs)
    axes = kernel_info(base_layer)[1]
    norm = jnp.linalg.norm(float_kernel(base_layer), axis=-2)
    self.lora_magnitude = LoraParam(norm, **nnx_utils.axes(*axes[:-2], axes[-1]))

  def _magnitude_scale(self):
    """m / ||W + sAB|| per output feature (f32), the norm a constant to autodiff."""
    weight = float_kernel(self.base_linear()) + self._delta()
    return self.lora_magnitude[...] / jax.lax.stop_gradient(jnp.linalg.norm(weight, axis=-2))

  def _update(self, y, xd, xa):
    # HF PEFT's form: (m/||.|| - 1) · xW + (m/||.||) · s (xA) B, where xW is the base output
    # without bias, recomputed from the dropped-out x where dropout is configured (xd is x
    # when no mask was drawn: the same value, one matmul more).
    if self.dropout_rate:
      base = jnp.dot(xd, float_kernel(self.base_linear()).astype(xd.dtype))
    else:
      bias = self.base_linear().bias
      base = y - bias[...].astype(y.dtype) if bias is not None else y
    scale = self._magnitude_scale().astype(y.dtype)
    lora = jnp.dot(xa, self.lora_b[...].astype(xa.dtype)) * self.scaling
    return (scale - 1) * base + scale * lora.astype(y.dtype)

  def fold(self) -> None:
    """W' = m (W + sAB) / ||W + sAB||; the norm is kept to undo it exactly as PEFT does."""
    kernel = _writable_kernel(self.base_linear())
    original = jnp.asarray(kernel[...], jnp.float32)
    weight = original + self._delta()
    self.merged_norm = nnx.data(jnp.linalg.norm(weight, axis=-2))
    merged = weight * (self.lora_magnitude[...] / self.merged_norm)[..., None, :]
    kernel.set_value((original + self.masked(merged - original)).astype(kernel.dtype))

  def unfold(self) -> None:
    kernel = _writable_kernel(self.base_linear())
    merged = jnp.asarray(kernel[...], jnp.float32)
    original = merged * (self.merged_norm / self.lora_magnitude[...])[..., None, :] - self._delta()
    kernel.set_value((merged + self.masked(original - merged)).astype(kernel.dtype))
    self.merged_norm = nnx.data(None)

  def peft_tensors(self) -> dict:
    return {**super().peft_tensors(), "lora_magnitude_vector": self.lora_magnitude[...]}

  def load_peft_tensors(self, tensors: dict) -> None:
    super().load_peft_tensors(tensors)
    self.lora_magnitude.set_value(jnp.asarray(tensors["lora_magnitude_vector"], jnp.float32))


def _einsum_specs(einsum_str: str | None):
  """(kernel spec, contracted letters, output letters, and the equations of x @ A, (xA) @ B and
  A @ B) for LoRA around an einsum."""
  if not einsum_str:
    raise FtjaxError("LoRA on an nnx.Einsum needs the einsum_str given at construction")
  eq = einsum_str.replace(" ", "")
  lhs, out = eq.split("->")
  inp, ker = lhs.split(",")
  contracted = "".join(c for c in ker if c not in out)
  free = "".join(c for c in ker if c in out)
  if "." in ker or any(c in inp for c in free) or any(c not in inp for c in contracted):
    raise FtjaxError(f"LoRA on nnx.Einsum({einsum_str!r}): the kernel's dims must each be either "
                     "contracted with the input or passed to the output")
  r = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in eq)
  rest = "".join(c for c in inp if c not in contracted)
  return (ker, contracted, free, f"{inp},{contracted}{r}->{rest}{r}", f"{rest}{r},{r}{free}->{out}",
          f"...{contracted}{r},...{r}{free}->...{ker}")


class LoraEinsum(_Lora):
  """LoRA around an `nnx.Einsum`: the kernel seen as a matrix [contracted dims, output dims]."""

  def __init__(self, base_layer: nnx.Einsum, **kwargs):
    ker, contracted, free, self._xa_eq, self._out_eq, self._merge_eq = _einsum_specs(
        base_layer.einsum_str)
    kernel = base_layer.kernel
    n_lead = kernel.ndim - len(ker)
    dims = dict(zip(ker, kernel.shape[n_lead:]))
    names = dict(zip(ker, _kernel_axes(kernel)[n_lead:]))
    self._in_shape = tuple(dims[c] for c in contracted)
    super().__init__(base_layer, in_shape=self._in_shape, out_shape=tuple(dims[c] for c in free),
                     in_axes=tuple(names[c] for c in contracted),
                     out_axes=tuple(names[c] for c in free), **kwargs)

  def _xa(self, x):
    return jnp.einsum(self._xa_eq, x, self.lora_a[...].astype(x.dtype))

  def _update(self, y, xd, xa):
    del xd
    return jnp.einsum(self._out_eq, xa * self.scaling, self.lora_b[...].astype(xa.dtype)).astype(y.dtype)

  def _delta(self):
    return self.scaling * jnp.einsum(self._merge_eq, self.lora_a[...], self.lora_b[...])
