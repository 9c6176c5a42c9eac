"""GRPO's pieces that need no model: group advantages and the clipped policy loss.

Written to equal TRL's GRPOTrainer (1.16: `_generate_and_score_completions` for the
advantages, `_compute_loss` for the loss), checked against it in tests/test_grpo_loss.py.
The GRPO objective's loss function feeds these with per-token log-probs from the model.

The loss comes as sums for ftjax.step (which divides a window's `loss_sum` by its `count`), one
normaliser per `loss_type`:
  grpo     each completion's mean token loss, averaged over completions (count = completions)
  bnpo     token losses over the tokens of the batch (count = completion tokens)
  dapo     the same over the whole accumulation window; with ftjax's window-wide division
           this and bnpo are one computation (TRL differs only under gradient accumulation,
           where its bnpo averages per-micro-batch means)
  dr_grpo  token losses over completions x max_completion_length (a constant: no length bias)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def _nanstd(x, axis=None):
  """Bessel-corrected std ignoring NaNs (TRL's nanstd: NaN with fewer than two values)."""
  n = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
  mean = jnp.nanmean(x, axis=axis, keepdims=True)
  var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True) * n / (n - 1)
  std = jnp.sqrt(jnp.where(n > 1, var, jnp.nan))
  return std if axis is None else jnp.squeeze(std, axis)


def group_advantages(rewards, num_generations: int, scale_rewards: str = "group"):
  """(advantages, std_is_zero) of rewards [prompts * G], G consecutive completions per prompt.

  A completion's advantage is its reward minus its group's mean, divided by the group's std
  ("group", GRPO), the batch's std ("batch") or nothing ("none", Dr. GRPO); NaN rewards (no
  reward function could score the completion) are left out of the means and get advantage 0.
  """
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f"scale_rewards={scale_rewards!r}; expected one of {SCALE_REWARDS}")
  grouped = rewards.reshape(-1, num_generations)
  mean = jnp.repeat(jnp.nanmean(grouped, axis=1), num_generations)
  if scale_rewards == "batch":
    std = (jnp.broadcast_to(_nanstd(rewards), rewards.shape) if rewards.size > 1
           else jnp.zeros_like(rewards))
  elif num_generations > 1:
    std = jnp.repeat(_nanstd(grouped, axis=1), num_generations)
  else:
    std = jnp.zeros_like(rewards)
  advantages = rewards - mean
  if scale_rewards != "none":
    advantages = advantages / (std + 1e-4)
  # TRL's torch.isclose(std, 0) with its default tolerances (atol 1e-8).
  return jnp.nan_to_num(advantages, nan=0.0), jnp.abs(std) <= 1e-8


def policy_loss_sums(logps, old_logps, ref_logps, advantages, mask, *, loss_type: str = "dapo",
                     epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
                     max_completion_length: int = 0) -> dict:
  """The clipped surrogate (+ beta * the k3 KL to the reference) as step sums.

  logps, old_logps, ref_logps, mask: [completions, tokens] (old_logps = the sampling policy's,
  which equals stop_gradient(logps) on the first update of a batch; ref_logps unused when beta
  is 0). advantages: [completions]. Returns loss_sum / count (see the module docstring) and the
  sums of TRL's metrics per completion token: kl, clip_ratio/low_mean, clip_ratio/high_mean,
  clip_ratio/region_mean (each divided by the same count only for bnpo/dapo; the objective
  reports them per token itself).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
  mask = mask.astype(jnp.float32)
  adv = advantages[:, None]
  ratio = jnp.exp(logps - old_logps)
  clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  out = {}
  if beta != 0.0:
    diff = ref_logps - logps
    kl = jnp.exp(diff) - diff - 1
    per_token = per_token + beta * kl
    out["kl_tokens"] = jnp.sum(kl * mask)
  masked = per_token * mask
  tokens = jnp.sum(mask)
  if loss_type == "grpo":
    per_seq = jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    out.update(loss_sum=jnp.sum(per_seq), count=jnp.asarray(logps.shape[0], jnp.float32))
  elif loss_type == "dr_grpo":
    out.update(loss_sum=jnp.sum(masked),
               count=jnp.asarray(logps.shape[0] * max_completion_length, jnp.float32))
  else:  # bnpo, dapo
    out.update(loss_sum=jnp.sum(masked), count=tokens)
  low = ((ratio < 1 - epsilon_low) & (adv < 0)).astype(jnp.float32)
  high = ((ratio > 1 + epsilon_high) & (adv > 0)).astype(jnp.float32)
  out.update({"clip_low_tokens": jnp.sum(low * mask), "clip_high_tokens": jnp.sum(high * mask),
              "clip_region_tokens": jnp.sum(jnp.maximum(low, high) * mask),
              "completion_tokens": tokens})
  return out


def token_logps(logits, tokens, temperature: float = 1.0):
  """log p(token) under logits / temperature (TRL divides the logits by the sampling
  temperature before the log-softmax); logits [b, t, vocab] f32, tokens [b, t]."""
  logits = logits / temperature
  return (jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
          - jax.nn.logsumexp(logits, axis=-1))
