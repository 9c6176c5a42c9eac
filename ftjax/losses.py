"""The causal-LM loss: token cross-entropy sums over the completion tokens (`loss_mask`).

A loss function for ftjax.step is `loss_fn(model, batch, rng) -> {"loss_sum", "count", ...}`
(sums; the step divides by the total count). `CausalLMLoss` is that for ftjax's decoders.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from ftjax.models.moe import load_balancing_loss


@dataclasses.dataclass(frozen=True)
class CausalLMLoss:
  """Summed next-token NLL, count of top-1 hits ("accuracy") and of target tokens ("count").

  Hashable: it is a static argument of the jitted step.
  remat / unroll: the decoder's layer-scan options (see CausalLM.hidden_states).
  attention: passed to the decoder only when not "xla", so any model with `hidden_states` works.
  vocab_chunk: >0 runs the vocab head + cross-entropy over this many positions of each row at
    a time, recomputed in the backward pass: [tokens, vocab] f32 logits never exist whole
    (memory for one extra head matmul).
  """
  remat: str = "none"
  unroll: int | bool = 1
  vocab_chunk: int = 0
  attention: str = "xla"  # the decoder's attention kernel (model.attention): xla | cudnn | splash

  def __call__(self, model, batch: dict, rng=None) -> dict:
    moe = getattr(getattr(model, "config", None), "num_experts", 0) > 0
    hidden = model.hidden_states(batch["inputs"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"], remat=self.remat,
                                 unroll=self.unroll, rng=rng, **(
                                     {"attention": self.attention} if self.attention != "xla" else {}),
                                 **({"router_stats": True} if moe else {}))
    if moe:
      hidden, stats = hidden
    if not self.vocab_chunk:
      sums = token_ce_sums(model.logits, hidden, batch["targets"], batch["loss_mask"])
    else:
      sums = chunked_token_ce_sums(model.logits, hidden, batch["targets"], batch["loss_mask"],
                                   self.vocab_chunk)
    return with_router_aux_loss(sums, stats, model.config.router_aux_loss_coef) if moe else sums


def with_router_aux_loss(sums: dict, stats: dict, coef: float) -> dict:
  """A mixture-of-experts model's load-balancing loss (transformers' `aux_loss`) added to the
  loss with its coefficient (`router_aux_loss_coef` of config.json) and reported as the
  "aux_loss" metric. Both go in as sums (times the target count), as the step divides every
  sum by the count: the step's loss is then mean NLL + coef * aux_loss, as transformers'."""
  aux = load_balancing_loss(stats) * sums["count"]
  return {**sums, "loss_sum": sums["loss_sum"] + coef * aux, "aux_loss": aux}


def token_ce_sums(logits_fn: Callable, hidden_btd, targets_bt, mask_bt) -> dict:
  """Sum of masked token NLL, count of tokens whose target has the top logit, and token count.

  Plain autodiff on purpose: a hand-written VJP that computes (softmax - onehot) * mask in one
  pass measured 0.3-0.5 s *slower* per SmolLM2 step on CPU (docs/benchmarks.md); XLA fuses the
  autodiff form into the head's GEMM better.
  """
  logits = logits_fn(hidden_btd)  # f32
  target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  # One max over the vocab serves both the stable logsumexp and the accuracy (target logit is
  # the max), instead of a separate argmax pass over the [tokens, vocab] logits. The max gets no
  # gradient: its contributions to logz cancel exactly, as in jax.nn.logsumexp.
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  logz = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  correct = (target_logit >= top).astype(jnp.float32)
  mask = mask_bt.astype(jnp.float32)
  return {"loss_sum": jnp.sum((logz - target_logit) * mask),
          "accuracy": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def chunked_token_ce_sums(logits_fn: Callable, hidden_btd, targets_bt, mask_bt, chunk: int) -> dict:
  """`token_ce_sums` over `chunk` positions of every row at a time, each chunk rematerialised in
  the backward pass. Chunks run along the sequence, so each holds tokens of every row and keeps
  the batch's sharding (chunks of the flattened tokens would sit on one device at a time)."""
  b, t, d = hidden_btd.shape
  pad = -t % chunk
  n = (t + pad) // chunk

  def split(x):  # [b, t, ...] -> [n, b, chunk, ...]; padded positions have mask 0
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(carry, xs):
    out = token_ce_sums(logits_fn, *xs)
    return jax.tree.map(jnp.add, carry, out), None

  zeros = {"loss_sum": jnp.zeros(()), "accuracy": jnp.zeros(()), "count": jnp.zeros(())}
  sums, _ = jax.lax.scan(one, zeros, (split(hidden_btd), split(targets_bt), split(mask_bt)))
  return sums


# Above this many bytes of f32 logits per device for a micro-batch, train.vocab_chunk=0 (auto)
# runs the vocab head in chunks of positions sized to a quarter of it.
LOGITS_BUDGET_BYTES = 512 << 20  # with their gradient and exp() temporaries, ~3x this


def vocab_chunk(config, model_cfg, mesh) -> int:
  """train.vocab_chunk, resolved: -1 never chunks; 0 (auto) chunks only where a micro-batch's
  [tokens, vocab] f32 logits on one device would pass LOGITS_BUDGET_BYTES (e.g. Llama 3's
  128k vocab at 2048 tokens per device: 1 GiB, plus as much again for their gradient)."""
  chunk = config.train.vocab_chunk
  if chunk:
    return max(chunk, 0)
  rows = max(1, config.train.batch_size // config.train.grad_accum
             // (mesh.shape["data"] * mesh.shape["fsdp"]))
  seq, row_bytes = config.data.seq_len, model_cfg.vocab_size * 4
  if rows * seq * row_bytes <= LOGITS_BUDGET_BYTES:
    return 0
  chunk = max(1, min(seq, LOGITS_BUDGET_BYTES // 4 // (rows * row_bytes)))
  while seq % chunk:  # a divisor of the row length: no padded positions computed
    chunk -= 1
  return chunk
