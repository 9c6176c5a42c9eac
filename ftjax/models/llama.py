"""The Llama-family decoder as pure functions over a params pytree.

Why functions and not nn.Modules: params cross every boundary (train step, optax, orbax,
exporters, PEFT plugs) as a plain nested dict, and layers are stacked on a leading axis and run
by one `jax.lax.scan`. With plain functions that is all there is: no module state to thread, and a
PEFT plug is a second pytree plus a `Plug` object whose hooks run at fixed points of the layer
body (see ftjax/peft/plug.py). Initialisation, logical axis names and sharding live in
`ftjax/models/params.py` and `ftjax/parallel/`.

Shape letters: b batch, t query length, s key length, d model dim, n query heads,
k kv heads, h head dim, f mlp dim, v vocab, l layers.

Params (kernels are [in, out]; every leaf under "layers" has a leading [l] axis):
  embed/embedding [v, d]
  layers/input_norm/scale [l, d]
  layers/attn/{q,k,v,o}_proj/kernel (+ bias for q/k/v with qkv_bias)
  layers/attn/{q,k}_norm/scale [l, h] (qk_norm)
  layers/post_attn_norm/scale [l, d]
  layers/mlp/{gate,up,down}_proj/kernel
  final_norm/scale [d]
  lm_head/kernel [d, v] (absent when tied)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ftjax.models.config import ModelConfig
from ftjax.peft.plug import NO_PLUG, Plug

Params = dict[str, Any]

REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in backward
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep each linear layer's output (base + adapter, tagged "projection" in _project) and the
    # small intermediates a plug tags "adapter" (LoRA's x @ A); recompute norms, RoPE,
    # attention and activations. Unlike dots_no_batch, a LoRA output is not stored twice.
    "projections": jax.checkpoint_policies.save_only_these_names("projection", "adapter"),
}


def rms_norm(x, scale, eps: float, offset: float = 0.0):
  """RMSNorm in f32 (as HF does), result in x's dtype; gemma stores (w - 1), hence offset."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if offset:  # gemma: multiply in f32, then cast
    return (x32 * (offset + scale.astype(jnp.float32))).astype(x.dtype)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
  """Per-pair rotation frequencies [h/2], including llama3 / linear scaling."""
  h = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  scaling = dict(cfg.rope_scaling)
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = jnp.where(wavelen > old_len / low, inv_freq / factor,
                         jnp.where(wavelen < old_len / high, inv_freq, smoothed))
  return inv_freq


def apply_rope(x_btnh, positions_bt, inv_freq):
  """HF's rotate-half RoPE: pairs are (i, i + h/2), not interleaved."""
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [b, t, h/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_btnh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


def attention_mask(q_index_bt, k_index_s, q_segment_bt, k_segment_bs, sliding_window=None):
  """[b, 1, t, s] bool: causal by index, same segment (packing), key not padding (segment 0)."""
  mask = k_index_s[None, None, :] <= q_index_bt[:, :, None]
  mask &= q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
  mask &= (k_segment_bs != 0)[:, None, :]
  if sliding_window:
    mask &= k_index_s[None, None, :] > q_index_bt[:, :, None] - sliding_window
  return mask[:, None]


def attention(q_btnh, k_bskh, v_bskh, mask_b1ts, scale: float):
  """Grouped-query attention: softmax(q k^T * scale, masked) v, scores and softmax in f32.

  The query heads sharing a kv head are stacked along the rows ([b, k, g*t, h]), so each
  score / value product is one [g*t, h] x [h, s] matmul per (batch, kv head) with the batch dims
  leading. On CPU this layout ran forward + backward ~35% faster than
  jax.nn.dot_product_attention's [b, t, k, g, h] einsums (fewer transposes and larger matmuls).
  """
  b, t, n, h = q_btnh.shape
  s, k = k_bskh.shape[1], k_bskh.shape[2]
  g = n // k
  q = q_btnh.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  scores = jnp.einsum("bkqh,bksh->bkqs", q, k_bskh.transpose(0, 2, 1, 3),
                      preferred_element_type=jnp.float32).reshape(b, k, g, t, s) * scale
  scores = jnp.where(mask_b1ts[:, :, None], scores, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype).reshape(b, k, g * t, s)
  out = jnp.einsum("bkqs,bksh->bkqh", probs, v_bskh.transpose(0, 2, 1, 3))
  return out.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _project(x, base: Params, adapters: Params, names, plug: Plug, dtype, rng):
  """All linear maps that read the same input x, then the plug's hook on their outputs.

  Grouping q/k/v (and gate/up) lets a plug share work between them, e.g. LoRA runs one
  x @ [A_q | A_k | A_v] matmul instead of three thin ones. Tokens are flattened to one axis
  first: the weight gradients then contract a single axis, which XLA's CPU backend turns into
  one library GEMM (contracting [b, t] together took a far slower path: 2x the whole step).
  """
  lead = x.shape[:-1]
  x = x.reshape(-1, x.shape[-1])
  outs = {}
  for name in names:
    y = jnp.dot(x, base[name]["kernel"].astype(dtype))
    if "bias" in base[name]:
      y = y + base[name]["bias"].astype(dtype)
    outs[name] = y
  outs = plug.project(x, outs, base, adapters, rng=rng)
  return {name: checkpoint_name(y, "projection").reshape(*lead, y.shape[-1]) for name, y in outs.items()}


def _layer(x_btd, layer, adapters, cache, rng, *, cfg: ModelConfig, plug: Plug, dtype,
           positions_bt, q_index_bt, segment_bt, inv_freq, cache_index):
  """One decoder layer; `layer`/`adapters`/`cache` are this layer's slices of the stacks."""
  b, t, _ = x_btd.shape
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  rngs = jax.random.split(rng, 4) if rng is not None else [None] * 4
  attn_p, attn_a = layer["attn"], adapters.get("attn", {})
  mlp_p, mlp_a = layer["mlp"], adapters.get("mlp", {})

  # --- attention ---
  y = rms_norm(x_btd, layer["input_norm"]["scale"], cfg.rms_norm_eps, cfg.norm_offset)
  qkv = _project(y, attn_p, attn_a, ("q_proj", "k_proj", "v_proj"), plug, dtype, rngs[0])
  q = qkv["q_proj"].reshape(b, t, n, h)
  kk = qkv["k_proj"].reshape(b, t, k, h)
  v = qkv["v_proj"].reshape(b, t, k, h)
  if cfg.qk_norm:
    q = rms_norm(q, attn_p["q_norm"]["scale"], cfg.rms_norm_eps)
    kk = rms_norm(kk, attn_p["k_norm"]["scale"], cfg.rms_norm_eps)
  q = apply_rope(q, positions_bt, inv_freq)
  kk = apply_rope(kk, positions_bt, inv_freq)

  if cache is None:
    k_all, v_all, k_segment = kk, v, segment_bt
    k_index = jnp.arange(t)
    new_cache = None
  else:  # write this chunk at cache_index, attend over the whole cache
    k_all = jax.lax.dynamic_update_slice(cache["k"], kk.astype(cache["k"].dtype), (0, cache_index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
    k_segment = jax.lax.dynamic_update_slice(cache["segment"], segment_bt, (0, cache_index))
    k_index = jnp.arange(k_all.shape[1])
    new_cache = {"k": k_all, "v": v_all, "segment": k_segment}
  mask = attention_mask(q_index_bt, k_index, segment_bt, k_segment, cfg.sliding_window)
  attn = attention(q, k_all.astype(dtype), v_all.astype(dtype), mask, cfg.head_scale())
  out = _project(attn.reshape(b, t, n * h), attn_p, attn_a, ("o_proj",), plug, dtype, rngs[1])
  x_btd = x_btd + out["o_proj"]

  # --- mlp ---
  y = rms_norm(x_btd, layer["post_attn_norm"]["scale"], cfg.rms_norm_eps, cfg.norm_offset)
  gu = _project(y, mlp_p, mlp_a, ("gate_proj", "up_proj"), plug, dtype, rngs[2])
  act = jax.nn.silu if cfg.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
  hidden = act(gu["gate_proj"]) * gu["up_proj"]
  out = _project(hidden, mlp_p, mlp_a, ("down_proj",), plug, dtype, rngs[3])
  x_btd = x_btd + out["down_proj"]
  return x_btd, new_cache


def embed(params: Params, tokens_bt, cfg: ModelConfig, dtype):
  x = jnp.take(params["embed"]["embedding"], tokens_bt, axis=0).astype(dtype)
  if cfg.embed_scale:  # gemma: the normaliser is rounded to the compute dtype first, as in HF
    x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
  return x


def decode(params: Params, tokens_bt, cfg: ModelConfig, *, adapters: Optional[Params] = None,
           plug: Plug = NO_PLUG, positions_bt=None, segment_ids_bt=None, cache=None,
           cache_index=0, dtype=jnp.float32, remat: str = "none", unroll: int | bool = 1,
           rng=None):
  """Token ids -> final hidden states [b, t, d] (after the final norm).

  segment_ids_bt: 0 marks padding; other values mark packed documents (attention stays inside a
    segment). Default: all ones.
  positions_bt: RoPE positions; default cache_index + arange(t).
  cache: optional {"k", "v": [l, b, s_max, k, h], "segment": [l, b, s_max]} from `init_cache`;
    when given, returns (hidden, new_cache).
  remat: activation checkpointing policy of the layer body (see REMAT_POLICIES).
  unroll: layers per scan iteration (True: all). Unrolling avoids stacking each layer's saved
    activations into [l, ...] buffers at the price of compile time; on the 2-core CPU it
    measured no faster (docs/benchmarks.md).
  """
  b, t = tokens_bt.shape
  q_index = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
  if positions_bt is None:
    positions_bt = q_index
  if segment_ids_bt is None:
    segment_ids_bt = jnp.ones((b, t), jnp.int32)
  segment_ids_bt = segment_ids_bt.astype(jnp.int32)
  adapters = adapters or {}

  x = embed(params, tokens_bt, cfg, dtype)
  x = plug.embeddings(x, adapters)
  body = functools.partial(
      _layer, cfg=cfg, plug=plug, dtype=dtype, positions_bt=positions_bt, q_index_bt=q_index,
      segment_bt=segment_ids_bt, inv_freq=rope_inv_freq(cfg), cache_index=cache_index)

  def step(x, xs):
    layer, layer_adapters, layer_cache, layer_rng = xs
    return body(x, layer, layer_adapters, layer_cache, layer_rng)

  policy = REMAT_POLICIES[remat]
  if remat != "none":
    step = jax.checkpoint(step, policy=policy, prevent_cse=False)
  layer_cache = None if cache is None else {k: cache[k] for k in ("k", "v", "segment")}
  layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)
  x, new_layer_cache = jax.lax.scan(
      step, x, (params["layers"], adapters.get("layers", {}), layer_cache, layer_rngs), unroll=unroll)
  x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps, cfg.norm_offset)
  if cache is None:
    return x
  return x, new_layer_cache


def lm_head_kernel(params: Params, cfg: ModelConfig):
  """[d, v] output projection (the transposed embedding when tied)."""
  if cfg.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def logits(params: Params, hidden_btd, cfg: ModelConfig):
  """Hidden states -> f32 logits [b, t, v]."""
  w = lm_head_kernel(params, cfg).astype(hidden_btd.dtype)
  return jnp.dot(hidden_btd, w, preferred_element_type=jnp.float32)


def forward(params: Params, tokens_bt, cfg: ModelConfig, **kwargs):
  """Token ids -> f32 logits [b, t, v] (and the new cache when `cache=` is given)."""
  out = decode(params, tokens_bt, cfg, **kwargs)
  if isinstance(out, tuple):
    return logits(params, out[0], cfg), out[1]
  return logits(params, out, cfg)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32):
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "segment": jnp.zeros((cfg.num_layers, batch, max_len), jnp.int32)}
