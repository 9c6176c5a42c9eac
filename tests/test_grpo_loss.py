"""GRPO's loss and advantages against TRL's GRPOTrainer on the same numbers.

TRL's `_compute_loss` runs unmodified on a stand-in trainer holding only the attributes it reads;
its model forward is replaced by the fixed per-token log-probs (a leaf tensor, so torch gives the
gradient we compare with jax.grad). Tolerance 1e-5: both sides compute in float32 on values of
order 1; the measured differences are ~1e-7.
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer import grpo_trainer
from trl.trainer import utils as trl_utils

from ftjax.objectives import grpo_loss

B, T, MAX_LEN = 6, 7, 9  # completions, completion tokens, max_completion_length (>= T)


def _numbers(seed):
  rng = np.random.default_rng(seed)
  logps = rng.normal(-2.0, 0.5, (B, T)).astype(np.float32)
  mask = (np.arange(T)[None] < rng.integers(2, T + 1, B)[:, None]).astype(np.float32)
  return dict(
      logps=logps,
      # a second update of the same rollouts: the sampling policy's log-probs differ by up to
      # ~+-0.4, so some ratios leave [1 - eps, 1 + eps] and the clip is exercised both ways
      old_2=(logps + rng.normal(0, 0.25, (B, T))).astype(np.float32),
      ref=(logps + rng.normal(0, 0.3, (B, T))).astype(np.float32),
      advantages=rng.normal(0, 1, B).astype(np.float32), mask=mask)


class _Accelerator:
  num_processes = 1

  def gather(self, x):
    return x

  gather_for_metrics = gather

  def reduce(self, x, reduction="sum"):
    return x


def _trl_loss(n, loss_type, beta, old):
  """TRL's loss and d loss / d logps on `n`'s numbers (old: None = the first update)."""
  logps = torch.tensor(n["logps"], requires_grad=True)
  fake = types.SimpleNamespace(
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
      beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
      vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
      current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN,
      accelerator=_Accelerator(), aux_loss_enabled=False, _entropy_bonus_enabled=False,
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
      _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
  mask = torch.tensor(n["mask"])
  inputs = {"prompt_ids": torch.zeros((B, 2), dtype=torch.long), "prompt_mask": torch.ones((B, 2)),
            "completion_ids": torch.zeros((B, T), dtype=torch.long), "completion_mask": mask,
            "advantages": torch.tensor(n["advantages"]), "num_items_in_batch": mask.sum(),
            "ref_per_token_logps": torch.tensor(n["ref"])}
  if old is not None:
    inputs["old_per_token_logps"] = torch.tensor(old)
  loss = grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
  loss.backward()
  return float(loss.detach()), logps.grad.numpy(), fake._metrics["train"]


@pytest.mark.parametrize("loss_type", grpo_loss.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_loss_and_gradient_equal_trl(loss_type, beta, num_iterations):
  n = _numbers(seed=grpo_loss.LOSS_TYPES.index(loss_type) * 4 + 2 * (beta > 0) + num_iterations)
  old = None if num_iterations == 1 else n["old_2"]
  trl_loss, trl_grad, trl_metrics = _trl_loss(n, loss_type, beta, old)

  def ours(logps):
    old_logps = jax.lax.stop_gradient(logps) if old is None else jnp.asarray(old)
    s = grpo_loss.policy_loss_sums(logps, old_logps, jnp.asarray(n["ref"]), n["advantages"],
                                   n["mask"], loss_type=loss_type, epsilon_low=0.2,
                                   epsilon_high=0.28, beta=beta, max_completion_length=MAX_LEN)
    return s["loss_sum"] / s["count"], s

  (loss, sums), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(n["logps"]))
  np.testing.assert_allclose(float(loss), trl_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), trl_grad, rtol=1e-5, atol=1e-6)
  tokens = float(sums["completion_tokens"])
  for ours_key, trl_key in (("clip_low_tokens", "clip_ratio/low_mean"),
                            ("clip_high_tokens", "clip_ratio/high_mean"),
                            ("clip_region_tokens", "clip_ratio/region_mean")):
    np.testing.assert_allclose(float(sums[ours_key]) / tokens, trl_metrics[trl_key][0], atol=1e-6)
  if beta:
    np.testing.assert_allclose(float(sums["kl_tokens"]) / tokens, trl_metrics["kl"][0], rtol=1e-5)
  if num_iterations == 2:  # the clip was really exercised, on both sides
    assert trl_metrics["clip_ratio/region_mean"][0] > 0


def _trl_advantages(rewards, g, scale):
  """TRL 1.16's advantage lines (grpo_trainer.py, `_generate_and_score_completions`,
  multi_objective_aggregation="sum_then_normalize"), with its own nanstd."""
  rewards = torch.tensor(rewards)
  mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
  if scale in ("group", "none"):
    std = trl_utils.nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
  else:
    std = trl_utils.nanstd(rewards).expand_as(rewards)
  adv = rewards - mean
  if scale != "none":
    adv = adv / (std + 1e-4)
  return torch.nan_to_num(adv, nan=0.0).numpy(), torch.isclose(std, torch.zeros_like(std)).numpy()


@pytest.mark.parametrize("scale", grpo_loss.SCALE_REWARDS)
def test_group_advantages_equal_trl(scale):
  # 3 prompts x G=4: one group with equal rewards (std 0), one with an unscorable completion
  rewards = np.array([1, 0, 1, 0.5, 2, 2, 2, 2, 0.3, np.nan, 1.0, 0.0], np.float32)
  want, want_zero = _trl_advantages(rewards, 4, scale)
  got, zero = grpo_loss.group_advantages(jnp.asarray(rewards), 4, scale)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(zero), want_zero)
  if scale == "group":
    assert np.asarray(zero)[4:8].all() and not np.asarray(zero)[:4].any()


def test_unknown_loss_type_is_named():
  with pytest.raises(ValueError, match="loss_type='ppo'"):
    grpo_loss.policy_loss_sums(*(jnp.zeros((1, 1)),) * 3, jnp.zeros(1), jnp.ones((1, 1)),
                               loss_type="ppo")
