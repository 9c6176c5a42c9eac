"""The preference losses, pure functions of per-sequence log-probabilities (TRL's formulas).

Every function takes one micro-batch of B pairs (or B unpaired KTO examples) as [B] arrays and
returns `(loss, metrics)`: the micro-batch's scalar loss as TRL computes it, and TRL's metric
names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected, + nll_loss, log_odds_ratio, log_odds_chosen, kl) as scalar means over the batch.
`as_sums` turns that into what ftjax.step expects (sums and a count), so that one micro-batch
reproduces TRL exactly and an accumulation window of equal micro-batches averages them as TRL's
gradient accumulation does.

Conventions (checked against trl 1.16 in tests/test_preference.py):
  logps       the SUM of the completion tokens' log-probs of a sequence; `lens` its token count.
  DPO         DPOTrainer._compute_loss with f_divergence_type="reverse_kl": the reward of a reply
              is beta * (policy - reference) log-prob; IPO divides the log-ratios by the reply
              lengths; rpo_alpha adds alpha * (mean NLL per chosen completion token), TRL's
              loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha].
  ORPO        ORPOTrainer: log-probs averaged per completion token; the NLL is the chosen row's
              mean over ALL its tokens (prompt included, as TRL computes it).
  SimPO       CPOTrainer(loss_type="simpo"): averaged log-probs, margin gamma / beta, optional
              cpo_alpha * NLL of the chosen completions (mean per token).
  KTO         KTOTrainer(loss_type="kto"): KL = mean over the batch of the mismatched
              (prompt_i, completion_{i-1}) log-ratios, clamped at 0, no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _mean(x, valid=None):
  """Mean over the batch, or over its `valid` entries: an eval batch's last rows may be padding
  (ftjax.data.loader), which must weigh nothing."""
  if valid is None:
    return jnp.mean(x)
  valid = valid.astype(jnp.float32)
  return jnp.sum(jnp.where(valid > 0, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1.0)


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, valid) -> dict:
  chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
  rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
  return {"rewards/chosen": _mean(chosen_rewards, valid),
          "rewards/rejected": _mean(rejected_rewards, valid),
          "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).astype(jnp.float32), valid),
          "rewards/margins": _mean(chosen_rewards - rejected_rewards, valid),
          "logps/chosen": _mean(jax.lax.stop_gradient(chosen_logps), valid),
          "logps/rejected": _mean(jax.lax.stop_gradient(rejected_logps), valid)}


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lens,
             rejected_lens, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, rpo_alpha: float | None = None, valid=None):
  """DPO and its IPO / hinge / robust variants; `lens` are completion token counts [B]."""
  ref_chosen_logps = jax.lax.stop_gradient(ref_chosen_logps)
  ref_rejected_logps = jax.lax.stop_gradient(ref_rejected_logps)
  chosen_ratio = chosen_logps - ref_chosen_logps
  rejected_ratio = rejected_logps - ref_rejected_logps
  delta = chosen_ratio - rejected_ratio
  if loss_type == "sigmoid":
    per_pair = -jax.nn.log_sigmoid(beta * delta)
  elif loss_type == "hinge":
    per_pair = jax.nn.relu(1 - beta * delta)
  elif loss_type == "ipo":
    # TRL normalises IPO's log-ratios by the completion lengths (agreed with the IPO authors).
    ipo_delta = (chosen_ratio / jnp.maximum(chosen_lens, 1.0)
                 - rejected_ratio / jnp.maximum(rejected_lens, 1.0))
    per_pair = (ipo_delta - 1 / (2 * beta)) ** 2
  elif loss_type == "robust":
    clean = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
    flipped = -label_smoothing * jax.nn.log_sigmoid(-beta * delta)
    per_pair = (clean - flipped) / (1 - 2 * label_smoothing)
  else:
    raise ValueError(f"dpo.loss_type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
  loss = _mean(per_pair, valid)
  metrics = _pair_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps,
                          valid)
  if rpo_alpha is not None:
    nll = -jnp.sum(chosen_logps) / jnp.maximum(jnp.sum(chosen_lens), 1.0)
    loss = loss + rpo_alpha * nll
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
  return loss, metrics


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (TRL's branch point)."""
  safe_hi = jnp.minimum(x, -1e-30)  # the untaken branch must not produce NaN gradients
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(jnp.minimum(x, -0.6931471805599453))),
                   jnp.log(-jnp.expm1(safe_hi)))


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, beta: float = 0.1, valid=None):
  """ORPO: NLL of the chosen rows minus beta * mean log sigmoid(log odds ratio).

  chosen_avg_logps / rejected_avg_logps: completion log-probs averaged per token [B];
  chosen_nll: the micro-batch's mean NLL per token of the chosen rows (scalar)."""
  log_odds = ((chosen_avg_logps - rejected_avg_logps)
              - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps)))
  ratio = jax.nn.log_sigmoid(log_odds)
  loss = chosen_nll - _mean(beta * ratio, valid)
  metrics = _pair_metrics(beta * chosen_avg_logps, beta * rejected_avg_logps, chosen_avg_logps,
                          rejected_avg_logps, valid)
  metrics.update({"nll_loss": jax.lax.stop_gradient(chosen_nll),
                  "log_odds_ratio": jax.lax.stop_gradient(_mean(ratio, valid)),
                  "log_odds_chosen": jax.lax.stop_gradient(_mean(log_odds, valid))})
  return loss, metrics


def simpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0, cpo_alpha: float = 0.0,
               valid=None):
  """SimPO: -log sigmoid(beta * (avg chosen - avg rejected) - gamma) (+ cpo_alpha * NLL).

  chosen_nll: mean NLL per chosen completion token over the micro-batch (scalar)."""
  logits = (chosen_avg_logps - rejected_avg_logps) - gamma / beta
  per_pair = (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
  loss = _mean(per_pair, valid) + (cpo_alpha * chosen_nll if cpo_alpha else 0.0)
  metrics = _pair_metrics(beta * chosen_avg_logps, beta * rejected_avg_logps, chosen_avg_logps,
                          rejected_avg_logps, valid)
  metrics["nll_loss"] = jax.lax.stop_gradient(chosen_nll) if cpo_alpha else jnp.zeros(())
  return loss, metrics


def kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, labels, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, valid=None):
  """KTO over B unpaired examples; labels [B] bool (True = desirable).

  kl_logps / ref_kl_logps: log-probs of the mismatched (prompt_i, completion_{i-1}) sequences,
  whose mean log-ratio estimates the KL term (a constant: no gradient, clamped at 0)."""
  valid = jnp.ones(labels.shape, bool) if valid is None else valid.astype(bool)
  labels = labels.astype(bool) & valid
  rejected = ~labels & valid
  ref_logps = jax.lax.stop_gradient(ref_logps)
  kl = jnp.maximum(jax.lax.stop_gradient(_mean(kl_logps - ref_kl_logps, valid)), 0.0)
  ratio = logps - ref_logps
  per_example = jnp.where(labels, desirable_weight * (1 - jax.nn.sigmoid(beta * (ratio - kl))),
                          undesirable_weight * (1 - jax.nn.sigmoid(beta * (kl - ratio))))
  loss = _mean(per_example, valid)
  rewards = jax.lax.stop_gradient(beta * ratio)
  n_chosen, n_rejected = jnp.sum(labels), jnp.sum(rejected)
  # TRL averages over the chosen (rejected) examples present; a batch without any logs 0 here.
  mean_of = lambda x, which, n: jnp.sum(jnp.where(which, x, 0.0)) / jnp.maximum(n, 1)
  logps = jax.lax.stop_gradient(logps)
  metrics = {"rewards/chosen": mean_of(rewards, labels, n_chosen),
             "rewards/rejected": mean_of(rewards, rejected, n_rejected),
             "logps/chosen": mean_of(logps, labels, n_chosen),
             "logps/rejected": mean_of(logps, rejected, n_rejected), "kl": kl}
  metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
  return loss, metrics


def as_sums(loss, metrics: dict, count) -> dict:
  """ftjax.step's form: every value times the micro-batch's count of pairs, and the count.

  The step divides each sum by the window's total count, so a single micro-batch gives TRL's
  values exactly and equal micro-batches give the mean of their means (TRL's accumulation)."""
  count = jnp.asarray(count, jnp.float32)
  out = {name: value * count for name, value in metrics.items()}
  out.update(loss_sum=loss * count, count=count)
  return out
