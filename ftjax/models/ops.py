"""Pure functions the decoder modules call: norms, RoPE, masks, attention, grouped projections.

They hold no parameters; the NNX modules in ftjax/models/llama.py own those and pass arrays in.

Shape letters: b batch, t query length, s key length, d model dim, n query heads,
k kv heads, h head dim.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from ftjax.errors import FtjaxError

REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in backward
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep each linear layer's output (base + adapter, tagged "projection" in `project`) and the
    # small intermediates an adapter tags "adapter" (LoRA's x @ A); recompute norms, RoPE,
    # attention and activations. Unlike dots_no_batch, a LoRA output is not stored twice.
    "projections": jax.checkpoint_policies.save_only_these_names("projection", "adapter"),
}


# Mesh axes the batch dim of activations is split over (ftjax.parallel.sharding's "batch" rule).
BATCH_MESH_AXES = ("data", "fsdp")


def constrain_batch(x):
  """Pins dim 0 of an activation to the batch mesh axes, when the step is traced under a mesh
  that has them (`jax.sharding.use_abstract_mesh`; a no-op otherwise).

  Without it, fsdp-sharded kernels ([embed, ...] split over fsdp) lead XLA to split the hidden
  states along embed and all-gather the whole layer stack before the scan: measured on SmolLM2
  with fsdp=8, 1.63 GiB of temporaries per device instead of the per-layer gathers of FSDP.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not all(a in mesh.axis_names for a in BATCH_MESH_AXES):
    return x
  axes = tuple(a for a in BATCH_MESH_AXES if mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


def rms_norm(x, scale, eps: float, offset: float = 0.0):
  """RMSNorm in f32 (as HF does), result in x's dtype; gemma stores (w - 1), hence offset."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if offset:  # gemma: multiply in f32, then cast
    return (x32 * (offset + scale.astype(jnp.float32))).astype(x.dtype)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict) -> jnp.ndarray:
  """Per-pair rotation frequencies [rotary_dim/2], including llama3 / linear scaling
  (rotary_dim: head_dim, or fewer dims with partial rotary)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  kind = scaling.get("rope_type", "default")
  if kind == "longrope":  # the short factors; Decoder._run swaps in the long ones past the original length
    inv_freq = inv_freq / jnp.asarray(scaling["short_factor"], jnp.float32)
  elif kind == "linear":
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


def longrope(rotary_dim: int, theta: float, scaling: dict, max_position_embeddings: int):
  """Phi-3's longrope, as transformers computes it: (long inv_freq [rotary_dim/2], the length
  past which it replaces the short one, the cos/sin scale)."""
  original = scaling["original_max_position_embeddings"]
  factor = scaling.get("factor") or max_position_embeddings / original
  scale = scaling.get("attention_factor")
  if scale is None:
    scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
  base = rope_inv_freq(rotary_dim, theta, {})
  return base / jnp.asarray(scaling["long_factor"], jnp.float32), original, float(scale)


def apply_rope(x_btnh, positions_bt, inv_freq, scale: float = 1.0):
  """HF's rotate-half RoPE: pairs are (i, i + r/2), not interleaved, over the first
  r = 2 * len(inv_freq) dims of each head; the rest pass unrotated (partial rotary, phi3)."""
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [b, t, r/2]
  cos = jnp.cos(angles)[:, :, None, :] * scale  # longrope's attention factor scales cos / sin
  sin = jnp.sin(angles)[:, :, None, :] * scale
  x = x_btnh.astype(jnp.float32)
  rotary = 2 * inv_freq.shape[-1]
  x_rot, x_pass = x[..., :rotary], x[..., rotary:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass], axis=-1)
  return out.astype(x_btnh.dtype)


SHARED_SEGMENT = -1  # virtual tokens (prompt / prefix tuning): every segment may attend to them


def attention_mask(q_index_bt, k_index_s, q_segment_bt, k_segment_bs, sliding_window=None,
                   shared: bool = False, pad_keys: bool = True):
  """[b, 1, t, s] bool: causal by index, same segment (packing), key not padding (segment 0).

  shared: keys of SHARED_SEGMENT are visible to every query of every segment (causally).
  pad_keys=False lets padding queries see the padding keys (fused kernels need no empty rows).
  """
  mask = k_index_s[None, None, :] <= q_index_bt[:, :, None]
  same = q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
  if shared:
    same |= (k_segment_bs == SHARED_SEGMENT)[:, None, :]
  mask &= same
  if pad_keys:
    mask &= (k_segment_bs != 0)[:, None, :]
  if isinstance(sliding_window, jax.Array):  # one layer's window in a scan; 0 means global
    in_window = k_index_s[None, None, :] > q_index_bt[:, :, None] - sliding_window
    mask &= in_window | (sliding_window <= 0)
  elif sliding_window:
    mask &= k_index_s[None, None, :] > q_index_bt[:, :, None] - sliding_window
  return mask[:, None]


def attention(q_btnh, k_bskh, v_bskh, mask_b1ts, scale: float, softcap: float | None = None):
  """Grouped-query attention: softmax(q k^T * scale, masked) v, scores and softmax in f32.
  softcap (gemma2): the scaled scores become softcap * tanh(scores / softcap) before masking.

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
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask_b1ts[:, :, None], scores, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype).reshape(b, k, g * t, s)
  out = jnp.einsum("bkqs,bksh->bkqh", probs, v_bskh.transpose(0, 2, 1, 3))
  return out.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# model.attention: the kernel the training forward pass uses; the backend each one needs.
ATTENTION_BACKENDS = {"xla": None, "cudnn": "gpu", "splash": "tpu"}
SPLASH_BLOCK = 128  # splash attention's default block; sequence lengths must be multiples of it


def check_attention(implementation: str, backend: str | None = None) -> None:
  """Raises FtjaxError when `implementation` cannot run on `backend` (default: jax's)."""
  if implementation not in ATTENTION_BACKENDS:
    raise FtjaxError(f"model.attention={implementation!r}; expected one of {tuple(ATTENTION_BACKENDS)}")
  needed, backend = ATTENTION_BACKENDS[implementation], backend or jax.default_backend()
  if needed and backend != needed:
    what = "cuDNN flash attention" if implementation == "cudnn" else "the Pallas splash kernel"
    raise FtjaxError(f"model.attention={implementation!r} runs {what}, which needs a {needed.upper()} "
                     f"backend; this process runs on {backend!r} (use model.attention='xla')")


def fused_attention(implementation: str, q_btnh, k_btkh, v_btkh, segment_bt, scale: float,
                    sliding_window=None, interpret: bool = False):
  """Causal self-attention within packed segments (no KV cache) by a fused kernel: cuDNN flash
  attention (GPU) or Pallas splash attention (TPU; `interpret` runs it on CPU, for tests).

  Same result as `attention` with `attention_mask` for every token of a segment >= 1; padding
  queries (segment 0) attend to the padding before them instead of to nothing, which keeps the
  kernels' softmax rows non-empty (their outputs are never used: the loss masks them out).
  Virtual tokens (SHARED_SEGMENT) need the XLA path.
  """
  if implementation == "cudnn":
    mask = attention_mask(jnp.broadcast_to(jnp.arange(q_btnh.shape[1]), segment_bt.shape),
                          jnp.arange(k_btkh.shape[1]), segment_bt, segment_bt, sliding_window,
                          pad_keys=False)
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask, scale=scale,
                                        implementation="cudnn")
  return _splash(q_btnh, k_btkh, v_btkh, segment_bt, scale, sliding_window, interpret)


def _splash(q_btnh, k_btkh, v_btkh, segment_bt, scale, sliding_window, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  b, t, n, h = q_btnh.shape
  k = k_btkh.shape[2]
  g = n // k
  if t % SPLASH_BLOCK:
    raise FtjaxError(f"model.attention='splash': sequence length {t} is not a multiple of the "
                     f"kernel's block of {SPLASH_BLOCK} (set data.seq_len accordingly)")
  causal = (masks.LocalMask((t, t), (sliding_window - 1, 0), offset=0) if sliding_window
            else masks.CausalMask((t, t)))
  # One MQA kernel per kv head: its g query heads share that head's keys and values.
  kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([causal] * g),
                                                interpret=interpret)

  def one_kv_head(q_gth, k_th, v_th, segments):
    return kernel(q_gth, k_th, v_th, segment_ids=segments)

  def run(q, k_, v, seg):  # [b', t, n', h], [b', t, k', h] -> [b', t, n', h]
    bb, kk = q.shape[0], k_.shape[2]
    q_bkgth = (q * scale).astype(q.dtype).reshape(bb, t, kk, g, h).transpose(0, 2, 3, 1, 4)
    k_bkth, v_bkth = k_.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    segments = splash.SegmentIds(q=seg, kv=seg)
    per_head = jax.vmap(one_kv_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(q_bkgth, k_bkth, v_bkth, segments)  # [b', k', g, t, h]
    return out.transpose(0, 3, 1, 2, 4).reshape(bb, t, kk * g, h)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not all(a in mesh.axis_names for a in BATCH_MESH_AXES + ("tensor",)):
    return run(q_btnh, k_btkh, v_btkh, segment_bt)
  # A Pallas kernel is one device's program: shard_map runs it on each device's rows and heads
  # (batch over data x fsdp, kv heads over tensor), as XLA would split the einsum version.
  P = jax.sharding.PartitionSpec
  heads = "tensor" if k % mesh.shape["tensor"] == 0 else None
  spec = P(BATCH_MESH_AXES, None, heads, None)
  return jax.shard_map(run, in_specs=(spec, spec, spec, P(BATCH_MESH_AXES, None)), out_specs=spec,
                       check_vma=False)(q_btnh, k_btkh, v_btkh, segment_bt)


def project(x, modules: Sequence, rng=None) -> list:
  """Applies linear modules that all read the same input x; returns their outputs in order.

  Tokens are flattened to one axis first: the weight gradients then contract a single axis,
  which XLA's CPU backend turns into one library GEMM (contracting [b, t] together took a far
  slower path: 2x the whole step). Each output is tagged "projection" for the `projections`
  remat policy.

  The grouping protocol: a module class may define a classmethod
  `project_many(x, modules, rng=None) -> list` that applies several of its instances reading
  the same x together. Adapters use it to share work (LoRA runs one x @ [A_q | A_k | A_v]
  matmul instead of three thin ones) and to receive the dropout key `rng`, from which each
  module draws its own mask (None: no dropout). The decoder never knows which adapter, if any,
  is attached.
  """
  lead = x.shape[:-1]
  x = x.reshape(-1, x.shape[-1])
  outs: list = [None] * len(modules)
  groups: dict[type, list[int]] = {}
  for i, module in enumerate(modules):
    groups.setdefault(type(module), []).append(i)
  for kind, indices in groups.items():
    chosen = [modules[i] for i in indices]
    many = getattr(kind, "project_many", None)
    ys = many(x, chosen, rng=rng) if many is not None else [m(x) for m in chosen]
    for i, y in zip(indices, ys):
      outs[i] = checkpoint_name(y, "projection").reshape(*lead, y.shape[-1])
  return outs
