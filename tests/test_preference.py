"""Preference tuning (DPO / IPO / hinge / robust, ORPO, SimPO, KTO): the losses against trl's own
code on the same log-probs, the log-probs from ftjax's decoder, and the reference model of a
LoRA run (the same model with its adapters disabled)."""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ftjax.objectives import preference

# f32 both sides on the same inputs: only op order differs (measured max 2e-7 relative).
TOL = 1e-5


# --- trl's loss code, called without building a trainer ---------------------------------------
# The trainers compute their loss in methods that read a few attributes of `self` and call the
# model once per sequence set. A namespace with those attributes and a stand-in model that returns
# chosen per-token log-probs runs trl's own code on exactly our numbers.

class _Accelerator:
  device = "cpu"
  gather = gather_for_metrics = staticmethod(lambda x: x)

  @staticmethod
  def unwrap_model(m):
    return m


def _trainer_namespace(**attrs):
  metrics = collections.defaultdict(lambda: collections.defaultdict(list))
  return types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=_Accelerator(),
                               aux_loss_enabled=False, _metrics=metrics, _total_train_tokens=0,
                               _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
                               **attrs)


def _fake_outputs(per_token):
  zeros = torch.zeros_like(per_token)
  return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())


def _random_sequences(rng, rows, seq=12):
  """Per-token log-probs [rows, seq-1] on completion positions (0 elsewhere, as trl's fused head
  gives for label -100) and the completion mask [rows, seq] (a prompt of 2-5 tokens, then 3..)."""
  mask = np.zeros((rows, seq), np.int64)
  for r in range(rows):
    start = rng.randint(2, 6)
    mask[r, start:rng.randint(start + 3, seq + 1)] = 1
  per_token = -rng.exponential(1.0, (rows, seq - 1)) * mask[:, 1:]
  return per_token.astype(np.float32), mask


def _trl_means(ns, mode="train"):
  return {k: float(np.mean(v)) for k, v in ns._metrics[mode].items()}


def _assert_metrics_equal(ours: dict, theirs: dict, names):
  for name in names:
    assert abs(float(ours[name]) - theirs[name]) <= TOL * max(1.0, abs(theirs[name])), (
        name, float(ours[name]), theirs[name])


PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def _trl_dpo(per_token, mask, ref, *, beta, loss_types, loss_weights, label_smoothing):
  from trl.trainer.dpo_trainer import DPOTrainer
  ns = _trainer_namespace(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                          beta=beta, loss_types=loss_types, loss_weights=loss_weights,
                          label_smoothing=label_smoothing, use_weighting=False)
  b = mask.shape[0] // 2
  inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long),
            "attention_mask": torch.ones(mask.shape, dtype=torch.long),
            "completion_mask": torch.tensor(mask),
            "ref_chosen_logps": torch.tensor(ref[:b]), "ref_rejected_logps": torch.tensor(ref[b:])}
  model = lambda **kw: _fake_outputs(torch.tensor(per_token))
  loss = DPOTrainer._compute_loss(ns, model, inputs, False)
  return float(loss), _trl_means(ns)


@pytest.mark.parametrize("loss_type,label_smoothing,rpo_alpha",
                         [("sigmoid", 0.0, None), ("ipo", 0.0, None), ("hinge", 0.0, None),
                          ("robust", 0.2, None), ("sigmoid", 0.0, 0.7)])
def test_dpo_loss_equals_trl(loss_type, label_smoothing, rpo_alpha):
  rng = np.random.RandomState(0)
  per_token, mask = _random_sequences(rng, 16)
  ref = (per_token.sum(1) + rng.normal(0, 2.0, 16)).astype(np.float32)
  beta = 0.3
  loss_types, weights = ([loss_type, "sft"], [1.0, rpo_alpha]) if rpo_alpha else ([loss_type], [1.0])
  trl_loss, trl_metrics = _trl_dpo(per_token, mask, ref, beta=beta, loss_types=loss_types,
                                   loss_weights=weights, label_smoothing=label_smoothing)
  logps, lens = per_token.sum(1), mask.sum(1).astype(np.float32)
  loss, metrics = preference.dpo_loss(logps[:8], logps[8:], ref[:8], ref[8:], lens[:8], lens[8:],
                                      beta=beta, loss_type=loss_type,
                                      label_smoothing=label_smoothing, rpo_alpha=rpo_alpha)
  assert abs(float(loss) - trl_loss) <= TOL * max(1.0, abs(trl_loss)), (float(loss), trl_loss)
  _assert_metrics_equal(metrics, trl_metrics, PAIR_METRICS)
  assert 0 < trl_metrics["rewards/accuracies"] < 1  # the random pairs are not all one way


def _cpo_namespace(**attrs):
  return types.SimpleNamespace(accelerator=_Accelerator(), **attrs)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_equals_trl_cpo_trainer(label_smoothing):
  from trl.experimental.cpo.cpo_trainer import CPOTrainer
  rng = np.random.RandomState(1)
  chosen, rejected = -rng.exponential(1.0, (2, 8)).astype(np.float32)
  ns = _cpo_namespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0,
                      label_smoothing=label_smoothing)
  losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(ns, torch.tensor(chosen),
                                                                 torch.tensor(rejected))
  nll = 1.3  # cpo_alpha * the chosen NLL is added outside cpo_loss: loss = mean + alpha * nll
  loss, metrics = preference.simpo_loss(chosen, rejected, nll, beta=2.0, gamma=0.7,
                                        label_smoothing=label_smoothing, cpo_alpha=0.5)
  want = float(losses.mean()) + 0.5 * nll
  assert abs(float(loss) - want) <= TOL * abs(want)
  _assert_metrics_equal(metrics, {"rewards/chosen": float(chosen_rewards.mean()),
                                  "rewards/rejected": float(rejected_rewards.mean()),
                                  "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
                                  "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean())},
                        ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"))


def test_orpo_loss_equals_trl_orpo_trainer():
  from trl.experimental.orpo.orpo_trainer import ORPOTrainer
  rng = np.random.RandomState(2)
  # Averaged log-probs on both sides of log1mexp's branch at -ln 2.
  chosen, rejected = -rng.exponential(0.8, (2, 10)).astype(np.float32)
  ns = _cpo_namespace(beta=0.25)
  losses, _, _, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
      ns, torch.tensor(chosen), torch.tensor(rejected))
  nll = 2.1
  loss, metrics = preference.orpo_loss(chosen, rejected, nll, beta=0.25)
  want = nll - float(losses.mean())  # ORPOTrainer.get_batch_loss_metrics: nll - losses.mean()
  assert abs(float(loss) - want) <= TOL * abs(want)
  _assert_metrics_equal(metrics, {"log_odds_ratio": float(log_odds_ratio),
                                  "log_odds_chosen": float(log_odds_chosen)},
                        ("log_odds_ratio", "log_odds_chosen"))
  assert np.isfinite(np.asarray(jax.grad(lambda c: preference.orpo_loss(c, rejected, nll)[0])(chosen))).all()


def _trl_kto(per_token, mask, kl_per_token, kl_mask, ref, ref_kl, labels, **attrs):
  from trl.trainer.kto_trainer import KTOTrainer
  ns = _trainer_namespace(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", **attrs)
  ns._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(ns, model, batch)
  kl_ids = torch.ones(kl_mask.shape, dtype=torch.long)  # tells the stand-in model which set it runs
  inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long),
            "attention_mask": torch.ones(mask.shape, dtype=torch.long),
            "completion_mask": torch.tensor(mask), "KL_input_ids": kl_ids,
            "KL_attention_mask": torch.ones(kl_mask.shape, dtype=torch.long),
            "KL_completion_mask": torch.tensor(kl_mask), "label": torch.tensor(labels),
            "ref_logps": torch.tensor(ref), "ref_KL_logps": torch.tensor(ref_kl)}
  model = lambda input_ids, **kw: _fake_outputs(
      torch.tensor(kl_per_token if int(input_ids[0, 0]) == 1 else per_token))
  loss = KTOTrainer._compute_loss(ns, model, inputs, False)
  return float(loss), _trl_means(ns)


@pytest.mark.parametrize("kl_shift", [-3.0, 3.0])  # the KL estimate clamped at 0, and not
def test_kto_loss_equals_trl(kl_shift):
  rng = np.random.RandomState(3)
  per_token, mask = _random_sequences(rng, 8)
  kl_per_token, kl_mask = _random_sequences(rng, 8)
  labels = np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)
  ref = (per_token.sum(1) + rng.normal(0, 2.0, 8)).astype(np.float32)
  ref_kl = (kl_per_token.sum(1) - kl_shift + rng.normal(0, 0.5, 8)).astype(np.float32)
  attrs = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
  trl_loss, trl_metrics = _trl_kto(per_token, mask, kl_per_token, kl_mask, ref, ref_kl, labels, **attrs)
  loss, metrics = preference.kto_loss(per_token.sum(1), ref, kl_per_token.sum(1), ref_kl, labels, **attrs)
  assert abs(float(loss) - trl_loss) <= TOL * max(1.0, abs(trl_loss)), (float(loss), trl_loss)
  _assert_metrics_equal(metrics, trl_metrics, ("rewards/chosen", "rewards/rejected",
                                               "rewards/margins", "logps/chosen", "logps/rejected", "kl"))
  assert (trl_metrics["kl"] == 0) == (kl_shift < 0)
