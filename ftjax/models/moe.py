"""The routed mixture-of-experts MLP of Mixtral and Qwen3-MoE.

  MoE (a layer's `block_sparse_moe` for mixtral, `mlp` for qwen3_moe, as transformers names it)
    gate: Router                       kernel [l, d, e]         (HF `gate.weight` [e, d])
    experts: Experts                   one ExpertLinear per projection, kernel [l, e, in, out]
      w1 / w3 / w2 (mixtral)           (HF `experts.{j}.w1.weight` [out, in], one per expert)
      gate_proj / up_proj / down_proj (qwen3_moe)

Every token's router logits go through a softmax; the top `num_experts_per_tok` experts run on
it and their outputs are summed with the top-k probabilities as weights (re-normalised to sum
to 1 with `norm_topk_prob`), as transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock.

On GPU / TPU the experts run as grouped matmuls (`jax.lax.ragged_dot`): the (token, expert)
assignments are sorted by expert so each expert multiplies only its own rows. On CPU jax
lowers ragged_dot to a masked dense matmul per group (`_ragged_dot_general_impl`, "ragged to
dense"), i.e. every token through every expert plus the sort, so there the plain einsum over
all experts (`dense_expert_mlp`) is used instead: measured on 1 CPU thread, forward + backward,
CPU time: 48 tokens, d 64, 4 experts of 32, top-2: ragged 0.26 ms, dense 0.10 ms; 1024 tokens,
d 576 (SmolLM2-135M), 8 experts of 384, top-2: ragged 553 ms, dense 369 ms. Both give the same
values and gradients (tests/test_moe.py). LoRA on the experts (ftjax/peft/experts.py) adds its
per-expert update to the kernels that `Experts.kernels` hands to either path.

The router also returns the statistics of the Switch-Transformer load-balancing loss
(`load_balancing_loss`, transformers' `load_balancing_loss_func`): per expert, how many top-k
slots of the valid tokens it got and the sum of its router probabilities over them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models.config import ModelConfig
from ftjax.nnx_utils import axes

# (gate, up, down) projection names of each family's experts, as in its HF checkpoints.
EXPERT_PROJECTIONS = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


class Router(nnx.Module):
  """The router's [d, e] kernel (transformers 5's `gate.weight` [e, d]). Not an nnx.Linear:
  LoRA reaches it only as HF PEFT does, through target_parameters "gate.weight" (which peft's
  "all-linear" adds on transformers 5, ftjax/peft/experts.py); otherwise it stays frozen."""

  def __init__(self, d: int, num_experts: int, *, param_dtype, init_std, rngs):
    self.kernel = nnx.Param(nnx.initializers.normal(init_std)(rngs.params(), (d, num_experts), param_dtype),
                            **axes("embed", "expert"))

  def __call__(self, x_td):
    return jnp.dot(x_td, self.kernel[...].astype(x_td.dtype))


class ExpertLinear(nnx.Module):
  """One projection of every expert: kernel [e, in, out]."""

  def __init__(self, num_experts: int, d_in: int, d_out: int, in_axis: str, out_axis: str, *,
               param_dtype, init_std, rngs):
    self.kernel = nnx.Param(
        nnx.initializers.normal(init_std)(rngs.params(), (num_experts, d_in, d_out), param_dtype),
        **axes("expert", in_axis, out_axis))


class Experts(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, param_dtype, init_std, rngs):
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    kw = dict(param_dtype=param_dtype, init_std=init_std, rngs=rngs)
    gate, up, down = EXPERT_PROJECTIONS[cfg.model_type]
    setattr(self, gate, ExpertLinear(e, d, f, "embed", "mlp", **kw))
    setattr(self, up, ExpertLinear(e, d, f, "embed", "mlp", **kw))
    setattr(self, down, ExpertLinear(e, f, d, "mlp", "embed", **kw))
    self.names = (gate, up, down)

  def kernels(self, dtype):
    return tuple(getattr(self, name).kernel[...].astype(dtype) for name in self.names)


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, init_std, rngs):
    self.gate = Router(cfg.hidden_size, cfg.num_experts, param_dtype=param_dtype, init_std=init_std,
                       rngs=rngs)
    self.experts = Experts(cfg, param_dtype=param_dtype, init_std=init_std, rngs=rngs)
    self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
    self.activation = cfg.activation
    self.dtype = dtype
    self.implementation = default_implementation()

  def __call__(self, x_btd, valid_bt):
    """x [b, t, d], valid [b, t] (False: padding) -> (output [b, t, d], router statistics)."""
    b, t, d = x_btd.shape
    x = x_btd.reshape(b * t, d).astype(self.dtype)
    # As transformers: logits in the compute dtype, softmax and top-k in f32.
    probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)
    weights, chosen = jax.lax.top_k(probs, self.top_k)  # [n, k]
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    act = jax.nn.silu if self.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
    expert_mlp = IMPLEMENTATIONS[self.implementation]
    out = expert_mlp(x, weights.astype(self.dtype), chosen, self.experts.kernels(self.dtype), act)
    return out.reshape(b, t, d), router_stats(probs, chosen, valid_bt.reshape(-1))


def ragged_expert_mlp(x_nd, weights_nk, chosen_nk, kernels, act):
  """The chosen experts of every token as grouped matmuls over expert-sorted rows."""
  n, k = chosen_nk.shape
  gate_w, up_w, down_w = kernels
  flat = chosen_nk.reshape(-1)  # [n * k] expert of each (token, slot)
  order = jnp.argsort(flat, stable=True)
  rows = x_nd[order // k]  # [n * k, d], grouped by expert
  sizes = jnp.bincount(flat, length=gate_w.shape[0]).astype(jnp.int32)
  hidden = act(jax.lax.ragged_dot(rows, gate_w, sizes)) * jax.lax.ragged_dot(rows, up_w, sizes)
  out = jax.lax.ragged_dot(hidden, down_w, sizes)  # [n * k, d], sorted
  unsorted = jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", unsorted, weights_nk)


def dense_expert_mlp(x_nd, weights_nk, chosen_nk, kernels, act):
  """Every token through every expert, weighted by its top-k weights (0 elsewhere)."""
  gate_w, up_w, down_w = kernels
  mix = jnp.zeros((x_nd.shape[0], gate_w.shape[0]), weights_nk.dtype)
  mix = mix.at[jnp.arange(x_nd.shape[0])[:, None], chosen_nk].add(weights_nk)  # [n, e]
  hidden = act(jnp.einsum("nd,edf->enf", x_nd, gate_w)) * jnp.einsum("nd,edf->enf", x_nd, up_w)
  return jnp.einsum("enf,efd,ne->nd", hidden, down_w, mix)


IMPLEMENTATIONS = {"ragged": ragged_expert_mlp, "dense": dense_expert_mlp}


def default_implementation() -> str:
  """"ragged" (grouped matmuls) where jax has a grouped kernel (GPU, TPU), "dense" on CPU,
  where ragged_dot itself computes every expert densely (see the module doc)."""
  return "dense" if jax.default_backend() == "cpu" else "ragged"


def router_stats(probs_ne, chosen_nk, valid_n) -> dict:
  """One layer's load-balancing statistics over its valid tokens: top-k slots per expert,
  router probability summed per expert, and the number of valid tokens."""
  valid = valid_n.astype(jnp.float32)
  slots = jax.nn.one_hot(chosen_nk, probs_ne.shape[-1], dtype=jnp.float32).sum(1)  # [n, e]
  return {"slots": jnp.einsum("ne,n->e", slots, valid),
          "probs": jnp.einsum("ne,n->e", probs_ne, valid),
          "tokens": jnp.sum(valid)}


def load_balancing_loss(stats: dict):
  """transformers' `load_balancing_loss_func` from the layers' stacked `router_stats`: over
  all layers' valid tokens together, e * sum_e(fraction of top-k slots on e * mean router
  probability of e). 1 * top_k when perfectly balanced."""
  total = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
  slots, probs = jnp.sum(stats["slots"], 0) / total, jnp.sum(stats["probs"], 0) / total
  return jnp.sum(slots * probs) * slots.shape[-1]
