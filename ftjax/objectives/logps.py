"""Per-sequence log-probabilities from ftjax's decoder, and the preference losses over them.

A preference batch holds one PAIR per row: every key is [B, 2, seq] (chosen at index 0, rejected
at 1), laid out like ftjax.data's SFT rows (inputs, targets, loss_mask over the completion,
segment_ids, positions). `pair_rows` lays it out as [2B, seq], the B chosen rows first, so chosen
and rejected go through ONE forward. KTO rows are [B, 2, seq] too: the example, then its
mismatched KL sequence (this prompt, the previous example's completion), plus "label" [B].

The reference model:
  - under PEFT, the same model with its adapters disabled (`ftjax.peft.disable_adapters`) inside
    the same jitted loss: no copy of the weights, a second forward without gradient;
  - or (full fine-tuning, or `dpo.precompute_ref_logps`) the batch's "ref_logps" [B, 2], computed
    once before training by `precompute_ref_logps`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import peft
from ftjax.objectives import preference


@dataclasses.dataclass(frozen=True)
class Forward:
  """The decoder call and the vocab head as ftjax.losses.CausalLMLoss makes them (same options)."""
  remat: str = "none"
  unroll: int | bool = 1
  vocab_chunk: int = 0
  attention: str = "xla"

  def token_logps(self, model, rows: dict, rng=None):
    """log p(target) at every position [n, seq] (f32)."""
    hidden = model.hidden_states(rows["inputs"], positions=rows["positions"],
                                 segment_ids=rows["segment_ids"], remat=self.remat,
                                 unroll=self.unroll, rng=rng, **(
                                     {"attention": self.attention} if self.attention != "xla" else {}))
    if not self.vocab_chunk:
      return _target_logps(model.logits, hidden, rows["targets"])
    return _chunked_target_logps(model.logits, hidden, rows["targets"], self.vocab_chunk)


def _target_logps(logits_fn, hidden_btd, targets_bt):
  logits = logits_fn(hidden_btd)
  target = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return target - jax.nn.logsumexp(logits, axis=-1)


def _chunked_target_logps(logits_fn, hidden_btd, targets_bt, chunk):
  """`_target_logps` over `chunk` positions at a time, rematerialised in the backward pass: the
  [tokens, vocab] logits never exist whole (as ftjax.losses.chunked_token_ce_sums)."""
  b, t, _ = hidden_btd.shape
  pad = -t % chunk
  n = (t + pad) // chunk

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(_, xs):
    return None, _target_logps(logits_fn, *xs)

  _, out = jax.lax.scan(one, None, (split(hidden_btd), split(targets_bt)))
  return jnp.swapaxes(out, 0, 1).reshape(b, t + pad)[:, :t]


def pair_rows(batch: dict) -> dict:
  """The [B, 2, seq] keys as [2B, seq]: the B first sequences (chosen), then the B second.
  (Per-pair keys such as "ref_logps" [B, 2] and "label" [B] stay out.)"""
  return {k: jnp.concatenate([v[:, 0], v[:, 1]], axis=0) for k, v in batch.items() if v.ndim == 3}


def sequence_sums(per_token, rows) -> tuple:
  """(sum of the completion tokens' log-probs, their count), each [n]."""
  mask = rows["loss_mask"].astype(jnp.float32)
  return jnp.sum(per_token * mask, axis=-1), jnp.sum(mask, axis=-1)


def reference_logps(model, rows: dict, forward: Forward):
  """Completion log-prob sums [n] of the model with its adapters disabled (no gradient)."""
  if not list(peft.adapter_layers(model)):
    raise ValueError("the reference log-probs of a model without adapters would be the policy's "
                     "own: full fine-tuning needs them precomputed (dpo.precompute_ref_logps)")
  with peft.disable_adapters(model) as base:
    per_token = forward.token_logps(base, rows, None)
  return jax.lax.stop_gradient(sequence_sums(per_token, rows)[0])


def _split(x):
  half = x.shape[0] // 2
  return x[:half], x[half:]


def _batch_reference(model, batch, rows, forward):
  if "ref_logps" in batch:
    return jnp.concatenate([batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]])
  return reference_logps(model, rows, forward)


@dataclasses.dataclass(frozen=True)
class DPOLoss:
  """ftjax.step's loss_fn for DPO: sums over the pairs of the micro-batch, count = pairs."""
  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  rpo_alpha: float | None = None
  forward: Forward = Forward()

  def __call__(self, model, batch: dict, rng=None) -> dict:
    rows = pair_rows(batch)
    logps, lens = sequence_sums(self.forward.token_logps(model, rows, rng), rows)
    ref = _batch_reference(model, batch, rows, self.forward)
    (chosen, rejected), (ref_c, ref_r), (len_c, len_r) = _split(logps), _split(ref), _split(lens)
    valid = len_c > 0  # an eval batch's padding pairs train nothing
    loss, metrics = preference.dpo_loss(chosen, rejected, ref_c, ref_r, len_c, len_r,
                                        beta=self.beta, loss_type=self.loss_type,
                                        label_smoothing=self.label_smoothing,
                                        rpo_alpha=self.rpo_alpha, valid=valid)
    return preference.as_sums(loss, metrics, jnp.sum(valid))


def _chosen_nll(per_token, mask):
  """Mean NLL per token over the chosen rows' `mask` (the micro-batch's one number, as trl's
  nn.CrossEntropyLoss over the flattened chosen tokens)."""
  mask = mask.astype(jnp.float32)
  return -jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _length_normalised(forward, model, batch: dict, rng, nll_mask: str):
  """The reference-free losses' inputs: (chosen, rejected) mean log-prob per completion token,
  the chosen rows' NLL over `nll_mask`, and which pairs have a chosen completion at all."""
  rows = pair_rows(batch)
  per_token = forward.token_logps(model, rows, rng)
  logps, lens = sequence_sums(per_token, rows)
  (chosen, rejected), (len_c, _) = _split(logps / jnp.maximum(lens, 1.0)), _split(lens)
  nll = _chosen_nll(per_token[:chosen.shape[0]], rows[nll_mask][:chosen.shape[0]])
  return chosen, rejected, nll, len_c > 0


@dataclasses.dataclass(frozen=True)
class ORPOLoss:
  """ORPO: reference-free; the NLL covers the chosen rows' every token (prompt too), as trl:
  the rows' "target_mask" marks every real target (the loss_mask only the completion's)."""
  beta: float = 0.1
  forward: Forward = Forward()

  def __call__(self, model, batch: dict, rng=None) -> dict:
    chosen, rejected, nll, valid = _length_normalised(self.forward, model, batch, rng, "target_mask")
    loss, metrics = preference.orpo_loss(chosen, rejected, nll, beta=self.beta, valid=valid)
    return preference.as_sums(loss, metrics, jnp.sum(valid))


@dataclasses.dataclass(frozen=True)
class SimPOLoss:
  """SimPO (trl CPOTrainer loss_type="simpo"): length-normalised, reference-free."""
  beta: float = 2.0
  gamma: float = 0.5
  label_smoothing: float = 0.0
  cpo_alpha: float = 0.0
  forward: Forward = Forward()

  def __call__(self, model, batch: dict, rng=None) -> dict:
    chosen, rejected, nll, valid = _length_normalised(self.forward, model, batch, rng, "loss_mask")
    loss, metrics = preference.simpo_loss(chosen, rejected, nll, beta=self.beta, gamma=self.gamma,
                                          label_smoothing=self.label_smoothing,
                                          cpo_alpha=self.cpo_alpha, valid=valid)
    return preference.as_sums(loss, metrics, jnp.sum(valid))


@dataclasses.dataclass(frozen=True)
class KTOLoss:
  """KTO: row 0 of each pair is the example, row 1 its mismatched KL sequence; "label" [B]."""
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  forward: Forward = Forward()

  def __call__(self, model, batch: dict, rng=None) -> dict:
    rows = pair_rows(batch)
    logps, lens = sequence_sums(self.forward.token_logps(model, rows, rng), rows)
    ref = _batch_reference(model, batch, rows, self.forward)
    (main, kl), (ref_main, ref_kl), (len_main, _) = _split(logps), _split(ref), _split(lens)
    kl = jax.lax.stop_gradient(kl)  # trl computes the KL sequences under no_grad
    valid = len_main > 0
    loss, metrics = preference.kto_loss(main, ref_main, kl, ref_kl, batch["label"] > 0,
                                        beta=self.beta, desirable_weight=self.desirable_weight,
                                        undesirable_weight=self.undesirable_weight, valid=valid)
    return preference.as_sums(loss, metrics, jnp.sum(valid))


def precompute_ref_logps(model, rows: dict, forward: Forward = Forward(), batch_size: int = 8):
  """The completion log-prob sums [n, 2] of every pair in `rows` ([n, 2, seq] per key) under
  `model` as it is now (before training: the reference), adapters disabled if it has any."""
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def one(state, batch):
    m = nnx.merge(graphdef, state)
    m.eval()
    flat = pair_rows(batch)
    with peft.disable_adapters(m) as base:
      logps = sequence_sums(forward.token_logps(base, flat, None), flat)[0]
    return jnp.stack(_split(logps), axis=1)

  n = rows["inputs"].shape[0]
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n  # a fixed shape: one compile
    out.append(np.asarray(one(state, {k: v[idx] for k, v in rows.items()})))
  return np.concatenate(out)[:n].astype(np.float32)
