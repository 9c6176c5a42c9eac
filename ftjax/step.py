"""The pure train and eval steps.

The model tree is {"base": params, "adapters": adapter tree}. A list of path regexes (from the
method: "adapters/.*" for LoRA, "base/.*" for full fine-tuning) splits it into a trainable and a
frozen partition. Only the trainable partition is differentiated and seen by the optimizer, so a
frozen base costs no weight-gradient FLOPs and no optimizer memory.

Loss: summed token cross-entropy over the target tokens of the whole accumulation window,
divided once by their count (not a mean of per-micro-batch means; transformers#34191).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from ftjax.models import llama
from ftjax.models.config import ModelConfig
from ftjax.models.params import Params, flatten, unflatten
from ftjax.peft.plug import Plug

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


# --- trainable / frozen partition ---------------------------------------------------------

def partition(tree: Params, trainable: Sequence[str]) -> tuple[Params, Params]:
  """Splits {"base":..., "adapters":...} into (trainable, frozen) by full-match path regexes."""
  patterns = [re.compile(p) for p in trainable]
  train, frozen = [], []
  for path, leaf in flatten(tree):
    (train if any(p.fullmatch(path) for p in patterns) else frozen).append((path, leaf))
  return unflatten(train), unflatten(frozen)


def combine(a: Params, b: Params) -> Params:
  """Inverse of `partition`: a deep merge of two disjoint trees."""
  out = dict(a)
  for key, value in b.items():
    out[key] = combine(out[key], value) if key in out and isinstance(value, dict) else value
  return out


# --- loss ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossFn:
  """Token cross-entropy sums of one micro-batch. Hashable: it is a static jit argument."""
  cfg: ModelConfig
  plug: Plug
  dtype: Any = jnp.float32
  remat: str = "none"
  unroll: int | bool = 1
  # >0: the vocab head + cross-entropy run over this many tokens at a time, recomputed in the
  # backward pass: [tokens, vocab] f32 logits never exist whole (memory for one extra head matmul).
  vocab_chunk: int = 0

  def __call__(self, tree: Params, batch: dict, rng=None) -> dict:
    hidden = llama.decode(tree["base"], batch["inputs"], self.cfg, adapters=tree.get("adapters"),
                          plug=self.plug, positions_bt=batch["positions"],
                          segment_ids_bt=batch["segment_ids"], dtype=self.dtype,
                          remat=self.remat, unroll=self.unroll, rng=rng)
    w_dv = llama.lm_head_kernel(tree["base"], self.cfg)
    if not self.vocab_chunk:
      return token_ce_sums(hidden, w_dv, batch["targets"], batch["loss_mask"], self.dtype)
    return chunked_token_ce_sums(hidden, w_dv, batch["targets"], batch["loss_mask"], self.dtype,
                                 self.vocab_chunk)


def token_ce_sums(hidden_btd, w_dv, targets_bt, mask_bt, dtype) -> dict:
  """Sum of masked token NLL, count of tokens whose target has the top logit, and token count.

  Plain autodiff on purpose: a hand-written VJP that computes (softmax - onehot) * mask in one
  pass measured 0.3-0.5 s *slower* per SmolLM2 step on CPU (docs/benchmarks.md); XLA fuses the
  autodiff form into the head's GEMM better.
  """
  logits = jnp.dot(hidden_btd, w_dv.astype(dtype), preferred_element_type=jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  # One max over the vocab serves both the stable logsumexp and the accuracy (target logit is
  # the max), instead of a separate argmax pass over the [tokens, vocab] logits. The max gets no
  # gradient: its contributions to logz cancel exactly, as in jax.nn.logsumexp.
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  logz = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  correct = (target_logit >= top).astype(jnp.float32)
  mask = mask_bt.astype(jnp.float32)
  return {"loss_sum": jnp.sum((logz - target_logit) * mask),
          "correct": jnp.sum(correct * mask), "tokens": jnp.sum(mask)}


def chunked_token_ce_sums(hidden_btd, w_dv, targets_bt, mask_bt, dtype, chunk: int) -> dict:
  """`token_ce_sums` over chunks of `chunk` tokens, each rematerialised in the backward pass."""
  d = hidden_btd.shape[-1]
  n = hidden_btd.shape[0] * hidden_btd.shape[1]
  pad = -n % chunk
  h = jnp.pad(hidden_btd.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
  t = jnp.pad(targets_bt.reshape(n), (0, pad)).reshape(-1, chunk)
  m = jnp.pad(mask_bt.reshape(n), (0, pad)).reshape(-1, chunk)  # padded tokens: mask 0

  @jax.checkpoint
  def one(carry, xs):
    out = token_ce_sums(xs[0], w_dv, xs[1], xs[2], dtype)
    return jax.tree.map(jnp.add, carry, out), None

  zeros = {"loss_sum": jnp.zeros(()), "correct": jnp.zeros(()), "tokens": jnp.zeros(())}
  sums, _ = jax.lax.scan(one, zeros, (h, t, m))
  return sums


# --- steps --------------------------------------------------------------------------------

def init_state(trainable: Params, optimizer: optax.GradientTransformation, seed: int) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
          "opt_state": optimizer.init(trainable), "rng": jax.random.key_data(jax.random.key(seed))}


def train_step(state: dict, frozen: Params, batch: dict, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, schedule: Callable) -> tuple[dict, dict]:
  """One optimizer update from a batch of [accum, micro_batch, seq] arrays."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

  def micro(carry, xs):
    grads, sums = carry
    micro_batch, key = xs

    def loss(trainable):
      out = loss_fn(combine(trainable, frozen), micro_batch, key)
      return out["loss_sum"], out

    g, out = jax.grad(loss, has_aux=True)(state["trainable"])
    grads = jax.tree.map(jnp.add, grads, g)
    sums = jax.tree.map(jnp.add, sums, out)
    return (grads, sums), None

  accum = batch["inputs"].shape[0]
  zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
  sums0 = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), (batch, jax.random.split(rng, accum)))
  tokens = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
  trainable = optax.apply_updates(state["trainable"], updates)
  metrics = {"loss": sums["loss_sum"] / tokens, "accuracy": sums["correct"] / tokens,
             "tokens": sums["tokens"], "grad_norm": optax.tree.norm(grads),
             "lr": schedule(state["step"])}
  new_state = dict(state, step=state["step"] + 1, trainable=trainable, opt_state=opt_state)
  return new_state, metrics


def eval_step(trainable: Params, frozen: Params, batch: dict, *, loss_fn: LossFn) -> dict:
  """Token sums on one [batch, seq] eval batch (no dropout)."""
  return loss_fn(combine(trainable, frozen), batch, None)
