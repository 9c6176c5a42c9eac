"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma) as Flax NNX modules.

Module and attribute names mirror transformers' (`model.layers.self_attn.q_proj`), so a param's
path in the state tree reads like its HF tensor name, and PEFT-style target names (`q_proj`,
`.*self_attn.*`) mean what HF users expect:

  CausalLM
    model: Decoder
      embed_tokens: nnx.Embed             embedding [v, d]
      layers: DecoderLayer, stacked       every param has a leading [l] axis
        input_layernorm: RMSNorm          scale [l, d]
        self_attn: Attention              {q,k,v,o}_proj: nnx.Linear, kernel [l, in, out]
                                          (+ bias with qkv_bias; q_norm/k_norm with qk_norm)
        post_attention_layernorm: RMSNorm
        mlp: MLP                          {gate,up,down}_proj: nnx.Linear
                                          (mixtral / qwen3_moe: MoE, ftjax/models/moe.py)
      norm: RMSNorm
    lm_head: nnx.Linear                   kernel [d, v] (None when tied to the embedding)

The layers are created once by `nnx.vmap` (params stacked on a leading "layers" axis) and run by
one `jax.lax.scan`: `Decoder.__call__` splits the stack into (graphdef, state) once and the scan
body merges one layer's slice and returns only the carry (and the layer's KV cache when
decoding). Every param carries its logical axis names as `out_sharding` metadata
(ftjax/parallel/sharding.py maps them to the mesh). Families differ only in `ModelConfig`
switches. Pure helpers (norm, RoPE, attention) live in ftjax/models/ops.py.

Adapters (ftjax/peft) attach from outside by replacing an `nnx.Linear` with a wrapper module;
the decoder calls its projections through `ops.project`, whose grouping protocol lets a wrapper
share work between q/k/v (and gate/up) without the decoder knowing it is there.

Shape letters: b batch, t query length, d model dim, n/k query/kv heads, h head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.models import ops
from ftjax.models.config import ModelConfig
from ftjax.models.moe import MoE
from ftjax.nnx_utils import axes


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, offset: float = 0.0, param_dtype=jnp.float32):
    # gemma stores (w - 1): its neutral scale is 0.
    self.scale = nnx.Param(jnp.full((dim,), 0.0 if offset else 1.0, param_dtype), **axes("norm"))
    self.eps, self.offset = eps, offset

  def __call__(self, x):
    return ops.rms_norm(x, self.scale[...], self.eps, self.offset)


def _linear(d_in, d_out, in_axis, out_axis, *, bias=False, dtype, param_dtype, init_std, rngs):
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(init_std), rngs=rngs,
                    kernel_metadata=axes(in_axis, out_axis), bias_metadata=axes(out_axis))


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, init_std, rngs):
    d, h = cfg.hidden_size, cfg.head_dim
    lin = functools.partial(_linear, dtype=dtype, param_dtype=param_dtype, init_std=init_std,
                            rngs=rngs)
    if cfg.fused_projections:  # phi3: HF's one qkv_proj, outputs [q | k | v]
      self.qkv_proj = lin(d, cfg.q_size + 2 * cfg.kv_size, "embed", "q_heads", bias=cfg.qkv_bias)
    else:
      self.q_proj = lin(d, cfg.q_size, "embed", "q_heads", bias=cfg.qkv_bias)
      self.k_proj = lin(d, cfg.kv_size, "embed", "kv_heads", bias=cfg.qkv_bias)
      self.v_proj = lin(d, cfg.kv_size, "embed", "kv_heads", bias=cfg.qkv_bias)
    self.o_proj = lin(cfg.q_size, d, "q_heads", "embed")
    if cfg.qk_norm:  # qwen3; gemma3's store (w - 1) like its other norms
      self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype)
      self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype)
    self.config = cfg

  def __call__(self, x_btd, ctx: dict, cache, rngs):
    """Returns (output [b, t, d], this layer's new cache or None)."""
    cfg = self.config
    b, t, _ = x_btd.shape
    if cfg.fused_projections:
      (qkv,) = ops.project(x_btd, [self.qkv_proj], rngs[0])
      q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    else:
      q, k, v = ops.project(x_btd, [self.q_proj, self.k_proj, self.v_proj], rngs[0])
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = ops.apply_rope(q, ctx["positions"], ctx["inv_freq"], ctx["rope_scale"])
    k = ops.apply_rope(k, ctx["positions"], ctx["inv_freq"], ctx["rope_scale"])
    window = ctx["window"]  # an int, or this layer's slice of the per-layer windows (0: global)

    if cache is None:
      k_all, v_all, k_segment, new_cache = k, v, ctx["segment_ids"], None
      k_index = jnp.arange(t)
    else:  # write this chunk at cache_index, attend over the whole cache
      index = ctx["cache_index"]
      k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
      v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
      k_segment = jax.lax.dynamic_update_slice(cache["segment"], ctx["segment_ids"], (0, index))
      k_index = jnp.arange(k_all.shape[1])
      new_cache = {"k": k_all, "v": v_all, "segment": k_segment}
    if cache is None and ctx["attention"] != "xla":  # a fused kernel (training forward pass)
      out = ops.fused_attention(ctx["attention"], q, k, v.astype(q.dtype), ctx["segment_ids"],
                                cfg.head_scale(), window)
    else:
      mask = ops.attention_mask(ctx["q_index"], k_index, ctx["segment_ids"], k_segment,
                                window, shared=ctx["shared"])
      out = ops.attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, cfg.head_scale(),
                          softcap=cfg.attn_logit_softcap)
    (out,) = ops.project(out.reshape(b, t, cfg.q_size), [self.o_proj], rngs[1])
    return out, new_cache


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, init_std, rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    lin = functools.partial(_linear, dtype=dtype, param_dtype=param_dtype, init_std=init_std,
                            rngs=rngs)
    if cfg.fused_projections:  # phi3: HF's one gate_up_proj, outputs [gate | up]
      self.gate_up_proj = lin(d, 2 * f, "embed", "mlp")
    else:
      self.gate_proj = lin(d, f, "embed", "mlp")
      self.up_proj = lin(d, f, "embed", "mlp")
    self.down_proj = lin(f, d, "mlp", "embed")
    self.activation = cfg.activation
    self.fused = cfg.fused_projections

  def __call__(self, x, rngs):
    if self.fused:
      (gate_up,) = ops.project(x, [self.gate_up_proj], rngs[0])
      gate, up = jnp.split(gate_up, 2, axis=-1)
    else:
      gate, up = ops.project(x, [self.gate_proj, self.up_proj], rngs[0])
    act = jax.nn.silu if self.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
    (out,) = ops.project(act(gate) * up, [self.down_proj], rngs[1])
    return out


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, init_std, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=init_std, rngs=rngs)
    norm = functools.partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps,
                             offset=cfg.norm_offset, param_dtype=param_dtype)
    self.input_layernorm = norm()
    self.self_attn = Attention(cfg, **kw)
    self.post_attention_layernorm = norm()
    if cfg.sandwich_norms:  # gemma2 / gemma3: the MLP between its own pre and post norms
      self.pre_feedforward_layernorm = norm()
      self.post_feedforward_layernorm = norm()
    if cfg.is_moe:  # mixtral's `block_sparse_moe`, qwen3_moe's `mlp`: routed experts
      setattr(self, cfg.moe_module, MoE(cfg, **kw))
    else:
      self.mlp = MLP(cfg, **kw)
    self.moe_module = cfg.moe_module if cfg.is_moe else None
    self.sandwich_norms = cfg.sandwich_norms

  def _mlp(self, x_btd, ctx, rngs):
    """(MLP output, the router's load-balancing statistics or None for a dense MLP)."""
    if self.moe_module is None:
      return self.mlp(x_btd, rngs), None
    return getattr(self, self.moe_module)(x_btd, ctx["segment_ids"] != 0)

  def __call__(self, x_btd, ctx: dict, cache=None, rng=None):
    """Returns (output, this layer's new cache or None, router statistics or None)."""
    rngs = jax.random.split(rng, 4) if rng is not None else [None] * 4
    out, new_cache = self.self_attn(self.input_layernorm(x_btd), ctx, cache, rngs[:2])
    if self.sandwich_norms:  # post_attention_layernorm normalises the attention output
      x_btd = x_btd + self.post_attention_layernorm(out)
      out, stats = self._mlp(self.pre_feedforward_layernorm(x_btd), ctx, rngs[2:])
      return x_btd + self.post_feedforward_layernorm(out), new_cache, stats
    x_btd = x_btd + out
    out, stats = self._mlp(self.post_attention_layernorm(x_btd), ctx, rngs[2:])
    return x_btd + out, new_cache, stats


class Decoder(nnx.Module):
  """Embedding, the stacked layers run by one scan, and the final norm.

  Two slots let an adapter add *virtual tokens* from outside (ftjax.peft's prompt and prefix
  tuning); both are None on a plain model:
    prompt: a module; prompt() -> [n, d] embeddings of n tokens put before every row
    prefix: a module; prefix() -> [l, 2, n, k, h] keys and values of n tokens in every layer
  Each has `num_virtual_tokens` (0 while switched off). Virtual tokens take positions 0..n-1,
  the real tokens start at position n (as in HF PEFT), and every token of every packed segment
  may attend to them. Outputs never include them: hidden states stay aligned with the input.
  With a KV cache they live in its first n slots (`CausalLM.init_cache`), and `cache_index`
  counts real tokens only.
  """

  # Attributes holding a vmapped stack of layers: per-layer names (HF, PEFT) index into them.
  stacked_modules = ("layers",)
  # Attributes whose projections get the step's dropout key through ops.project (adapters
  # there keep no RNG stream of their own; no key, no dropout).
  keyed_modules = ("layers",)
  virtual_token_slots = ("prompt", "prefix")

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, init_std, rngs):
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(init_std), rngs=rngs,
        embedding_metadata=axes("vocab", "embed"))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, init_std=init_std, rngs=rngs)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                        param_dtype=param_dtype)
    self.prompt = nnx.data(None)  # data, not static: an adapter fills them later
    self.prefix = nnx.data(None)
    self.config = cfg
    self.dtype = dtype

  @property
  def num_virtual_tokens(self) -> int:
    return sum(getattr(self, name).num_virtual_tokens for name in self.virtual_token_slots
               if getattr(self, name) is not None)

  def _virtual(self, name):
    hook = getattr(self, name)
    return hook if hook is not None and hook.num_virtual_tokens else None

  def _embed(self, x_btd):
    x_btd = x_btd.astype(self.dtype)
    if self.config.embed_scale:  # gemma: the normaliser is rounded to the compute dtype first, as in HF
      x_btd = x_btd * jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
    return x_btd

  def __call__(self, tokens_bt, *, positions=None, segment_ids=None, cache=None, cache_index=0,
               remat: str = "none", unroll: int | bool = 1, rng=None, attention: str = "xla",
               router_stats: bool = False):
    """Token ids -> final hidden states [b, t, d] (after the final norm); see CausalLM."""
    b, t = tokens_bt.shape
    n = self.num_virtual_tokens
    if router_stats and (cache is not None or n or not self.config.is_moe):
      raise FtjaxError("router_stats=True needs a mixture-of-experts model (mixtral, qwen3_moe) "
                       "run without a KV cache and without virtual tokens (prompt / prefix tuning)")
    if attention != "xla" and n:
      raise FtjaxError(f"model.attention={attention!r}: the fused kernels have no mask for virtual "
                       "tokens (prompt / prefix tuning); use model.attention='xla'")
    if attention != "xla":
      _check_fused_kernel(self.config, attention)
    positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t)) if positions is None else positions
    segment_ids = (jnp.ones((b, t), jnp.int32) if segment_ids is None
                   else segment_ids.astype(jnp.int32))
    x = self.embed_tokens(tokens_bt)
    if n and cache is not None:  # virtual tokens are already in the cache's first n slots
      return self._run(x, positions + n, segment_ids, cache, cache_index + n, remat, unroll, rng)
    if n:
      return self._with_virtual_tokens(x, positions, segment_ids, remat, unroll, rng)
    return self._run(x, positions, segment_ids, cache, cache_index, remat, unroll, rng, attention,
                     router_stats)

  def _with_virtual_tokens(self, x, positions, segment_ids, remat, unroll, rng):
    """The forward pass without a cache when an adapter adds virtual tokens: the prefix's
    keys and values (positions 0..p-1) are a prefilled cache, the prompt's embeddings (next
    positions) go before every row; both slots may be on together. Returns the real tokens'
    hidden states only."""
    b = x.shape[0]
    prompt, prefix = self._virtual("prompt"), self._virtual("prefix")
    n_prefix = prefix.num_virtual_tokens if prefix is not None else 0
    n_prompt = prompt.num_virtual_tokens if prompt is not None else 0
    positions = positions + n_prefix + n_prompt
    if prompt is not None:
      table = jnp.broadcast_to(prompt()[None].astype(x.dtype), (b, n_prompt, x.shape[-1]))
      x = jnp.concatenate([table, x], 1)
      positions = jnp.concatenate([jnp.broadcast_to(n_prefix + jnp.arange(n_prompt), (b, n_prompt)),
                                   positions], 1)
      segment_ids = jnp.concatenate([jnp.full((b, n_prompt), ops.SHARED_SEGMENT, jnp.int32),
                                     segment_ids], 1)
    if prefix is None:
      return self._run(x, positions, segment_ids, None, 0, remat, unroll, rng)[:, n_prompt:]
    cache = self._prefix_cache(b, x.shape[1], self.dtype)
    hidden, _ = self._run(x, positions, segment_ids, cache, n_prefix, remat, unroll, rng)
    return hidden[:, n_prompt:]

  def _run(self, x_btd, positions, segment_ids, cache, cache_index, remat, unroll, rng,
           attention: str = "xla", router_stats: bool = False):
    """Embeddings -> final hidden states (and the new cache when one is given, or the MoE
    layers' stacked router statistics with `router_stats`)."""
    cfg = self.config
    b, t, _ = x_btd.shape
    ctx = {
        "positions": positions, "segment_ids": segment_ids, "cache_index": cache_index,
        "q_index": jnp.broadcast_to(cache_index + jnp.arange(t), (b, t)),
        "inv_freq": ops.rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, dict(cfg.rope_scaling)),
        "rope_scale": 1.0,
        "window": cfg.sliding_window,
        "shared": self.num_virtual_tokens > 0,
        "attention": attention,
    }
    scaling = dict(cfg.rope_scaling)
    if scaling.get("rope_type") == "longrope":
      # As transformers: the long factors for every position of a call that reaches past the
      # original context (max position + 1 > original), the short ones otherwise.
      long_inv_freq, original, ctx["rope_scale"] = ops.longrope(
          cfg.rotary_dim, cfg.rope_theta, scaling, cfg.max_position_embeddings)
      ctx["inv_freq"] = jnp.where(jnp.max(positions) + 1 > original, long_inv_freq, ctx["inv_freq"])
    x = ops.constrain_batch(self._embed(x_btd))

    # Split once; the scan body merges one layer's slice of the stacked state.
    graphdef, stacked = nnx.split(self.layers)
    per_layer = _per_layer_data(cfg)

    def body(x, xs):
      layer_state, layer_cache, layer_rng, layer_data = xs
      layer_ctx = ctx if layer_data is None else {
          **ctx, "window": layer_data["window"],
          "inv_freq": jnp.where(layer_data["local"], layer_data["local_inv_freq"], ctx["inv_freq"])}
      x, out, stats = nnx.merge(graphdef, layer_state)(ops.constrain_batch(x), layer_ctx,
                                                       layer_cache, layer_rng)
      return ops.constrain_batch(x), (out, stats)

    policy = ops.REMAT_POLICIES[remat]
    if remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)
    x, (new_cache, stats) = jax.lax.scan(body, x, (stacked, cache, layer_rngs, per_layer),
                                         unroll=unroll)
    x = self.norm(x)
    if router_stats:
      return x, stats
    return x if cache is None else (x, new_cache)

  def _prefix_cache(self, batch: int, length: int, dtype) -> dict[str, Any]:
    """A cache of p + `length` slots whose first p hold the prefix's keys and values (p = 0
    without a prefix) and are visible to every segment."""
    prefix = self._virtual("prefix")
    n = prefix.num_virtual_tokens if prefix is not None else 0
    cache = init_cache(self.config, batch, n + length, dtype)
    if not n:
      return cache
    kv = prefix().astype(dtype)[:, :, None]  # [l, 2, n, k, h] -> the first n slots of every row
    return {"k": cache["k"].at[:, :, :n].set(kv[:, 0]), "v": cache["v"].at[:, :, :n].set(kv[:, 1]),
            "segment": cache["segment"].at[:, :, :n].set(ops.SHARED_SEGMENT)}

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, Any]:
    """An empty KV cache for `max_len` real tokens, its first slots holding the virtual tokens
    (the prefix's, then the prompt's)."""
    cfg, prompt = self.config, self._virtual("prompt")
    n_prompt = prompt.num_virtual_tokens if prompt is not None else 0
    cache = self._prefix_cache(batch, n_prompt + max_len, dtype)
    if not n_prompt:
      return cache
    # the prompt's keys and values, computed once by running its tokens after the prefix
    n_prefix = self.num_virtual_tokens - n_prompt
    x = jnp.broadcast_to(prompt()[None], (batch, n_prompt, cfg.hidden_size))
    positions = jnp.broadcast_to(n_prefix + jnp.arange(n_prompt), (batch, n_prompt))
    _, cache = self._run(x, positions, jnp.full((batch, n_prompt), ops.SHARED_SEGMENT, jnp.int32),
                         cache, n_prefix, "none", 1, None)
    return cache


class CausalLM(nnx.Module):
  """Decoder + vocab head. `model(tokens)` -> f32 logits [b, t, v].

  Build one with random weights from a config (`CausalLM(cfg, rngs=nnx.Rngs(0))`), or load a
  real one with `ftjax.models.load`. dtype is the compute dtype, param_dtype the storage dtype.
  """

  output_module = "lm_head"  # excluded from PEFT's "all-linear", as in HF PEFT

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    self.model = Decoder(cfg, dtype=dtype, param_dtype=param_dtype, init_std=init_std, rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else _linear(
        cfg.hidden_size, cfg.vocab_size, "embed", "vocab", dtype=dtype, param_dtype=param_dtype,
        init_std=init_std, rngs=rngs)
    self.config = cfg
    self.dtype = dtype

  def hidden_states(self, tokens_bt, **kwargs):
    """Token ids -> final hidden states [b, t, d], and the new cache when `cache=` is given.

    positions: RoPE positions [b, t]; default cache_index + arange(t).
    segment_ids: [b, t]; 0 marks padding, other values mark packed documents (attention stays
      inside a segment). Default: all ones.
    cache: {"k", "v": [l, b, s_max, k, h], "segment": [l, b, s_max]} from `init_cache`.
    remat: activation checkpointing policy of the layer body (ops.REMAT_POLICIES).
    unroll: layers per scan iteration (True: all).
    rng: dropout key for adapters (none: no dropout).
    router_stats: MoE models only: return (hidden, the layers' router statistics [l, ...]) for
      ftjax.models.moe.load_balancing_loss.
    attention: the kernel without a cache: "xla" (default), "cudnn" (GPU) or "splash" (TPU);
      see ops.fused_attention. Decoding with a cache always uses the XLA path.
    """
    return self.model(tokens_bt, **kwargs)

  @property
  def num_virtual_tokens(self) -> int:
    return self.model.num_virtual_tokens

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
    """A KV cache for `max_len` tokens (plus any virtual tokens an adapter adds, already in it)."""
    return self.model.init_cache(batch, max_len, dtype or self.dtype)

  def logits(self, hidden_btd):
    """Hidden states -> f32 logits [b, t, v]."""
    head = self.model.embed_tokens if self.lm_head is None else self.lm_head  # tied or not
    if isinstance(head, nnx.Embed):
      w = head.embedding[...].T
    elif isinstance(head, nnx.Linear):
      w = head.kernel[...]
    else:  # an adapter wraps the head: its own call
      out = head.attend(hidden_btd) if self.lm_head is None else head(hidden_btd)
      return self._softcap(out.astype(jnp.float32))
    return self._softcap(jnp.dot(hidden_btd, w.astype(hidden_btd.dtype),
                                 preferred_element_type=jnp.float32))

  def _softcap(self, logits):
    cap = self.config.final_logit_softcap  # gemma2: cap * tanh(logits / cap), in f32 as HF
    return logits if not cap else jnp.tanh(logits / cap) * cap

  def __call__(self, tokens_bt, **kwargs):
    out = self.hidden_states(tokens_bt, **kwargs)
    if isinstance(out, tuple):
      return self.logits(out[0]), out[1]
    return self.logits(out)


def _check_fused_kernel(cfg: ModelConfig, attention: str) -> None:
  """The fused kernels have no attention soft-capping, and splash's window is one static mask."""
  if cfg.attn_logit_softcap:
    raise FtjaxError(f"model.attention={attention!r}: the fused kernels have no attention logit "
                     f"soft-capping ({cfg.model_type}'s attn_logit_softcapping="
                     f"{cfg.attn_logit_softcap}); use model.attention='xla'")
  if attention == "splash" and cfg.layer_types:
    raise FtjaxError(f"model.attention='splash': {cfg.model_type}'s per-layer attention windows "
                     "(layer_types) are data of the layer scan, and the splash kernel takes one "
                     "static mask; use model.attention='xla' or 'cudnn'")


def _per_layer_data(cfg: ModelConfig) -> dict[str, Any] | None:
  """What differs between layers (gemma2 / gemma3 layer_types), as arrays with a leading [l]
  axis that the layer scan slices: the attention window (0: global) and, for sliding layers, the
  local RoPE frequencies. None when every layer is alike (the window stays a Python int)."""
  if not cfg.layer_types:
    return None
  local_theta = cfg.rope_local_theta or cfg.rope_theta  # gemma2: one base for all layers
  local_scaling = {} if cfg.rope_local_theta else dict(cfg.rope_scaling)
  local_inv_freq = ops.rope_inv_freq(cfg.rotary_dim, local_theta, local_scaling)
  return {"window": jnp.asarray(cfg.layer_windows(), jnp.int32),
          "local": jnp.asarray(cfg.layer_is_local()),
          "local_inv_freq": jnp.broadcast_to(local_inv_freq, (cfg.num_layers, *local_inv_freq.shape))}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, Any]:
  """An empty KV cache of `max_len` slots (CausalLM.init_cache adds an adapter's virtual tokens)."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "segment": jnp.zeros((cfg.num_layers, batch, max_len), jnp.int32)}
