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


# --- the same losses from ftjax's decoder vs trl on a peft model ------------------------------

import functools

import optax

import hf_models
from ftjax import peft
from ftjax import step as step_lib
from ftjax.objectives import logps as logps_lib
from ftjax.optim import make_optimizer


def _token_rows(rng, rows, length, vocab):
  """`rows` right-padded sequences of `length` tokens: a 2-5 token prompt, a completion, padding."""
  ids = np.zeros((rows, length), np.int64)
  attention = np.zeros((rows, length), np.int64)
  completion = np.zeros((rows, length), np.int64)
  for r in range(rows):
    n, p = rng.randint(8, length + 1), rng.randint(2, 6)
    ids[r, :n] = rng.randint(1, vocab, n)
    attention[r, :n] = 1
    completion[r, p:n] = 1
  return ids, attention, completion


def _pair_batches(vocab, pairs=4, length=14, seeds=(0, 1, 2)):
  """(trl inputs, ftjax batch) per seed: trl's rows [2B, L] (chosen rows first) and ftjax's
  pairs [B, 2, L-1] of the same sequences."""
  out = []
  for seed in seeds:
    ids, attention, completion = _token_rows(np.random.RandomState(seed), 2 * pairs, length, vocab)
    trl_inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention),
                  "completion_mask": torch.tensor(completion)}
    flat = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": completion[:, 1:],
            "segment_ids": attention[:, :-1], "target_mask": attention[:, 1:],
            "positions": np.broadcast_to(np.arange(length - 1), (2 * pairs, length - 1))}
    dtypes = {"loss_mask": np.float32, "target_mask": np.float32}
    ours = {k: np.stack([v[:pairs], v[pairs:]], axis=1).astype(dtypes.get(k, np.int32))
            for k, v in flat.items()}
    out.append((trl_inputs, ours))
  return out


def _lora_pair(hf_dir, tmp_path, nonzero_b=True):
  """ftjax's LoRA model and peft's, same weights (ftjax's init saved, loaded by peft), trl's
  fused log-prob head on peft's base model (as DPOTrainer sets it up)."""
  import peft as hf_peft
  import transformers
  from trl.trainer.utils import add_fused_lm_head
  model = peft.get_peft_model(hf_models.ftjax_model(hf_dir),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
  if nonzero_b:  # the policy differs from the reference from the first step
    for _, layer in peft.adapter_layers(model):
      layer.lora_b.set_value(layer.lora_b[...] + 0.05)
  peft.save_adapter(model, str(tmp_path / "init"))
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
  reference = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "init"), is_trainable=True)
  return model, reference


def _trl_dpo_model_loss(torch_model, inputs, **attrs):
  from trl.trainer.dpo_trainer import DPOTrainer
  ns = _trainer_namespace(ld_alpha=None, precompute_ref_logps=False, f_divergence_type="reverse_kl",
                          use_weighting=False, ref_model=None, **attrs)
  ns.model = torch_model
  return DPOTrainer._compute_loss(ns, torch_model, inputs, False), _trl_means(ns)


def _jit_step(graphdef, optimizer, loss_fn):
  return jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, loss_fn=loss_fn,
                                   optimizer=optimizer))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_lora_dpo_loss_and_metrics_equal_trl_with_disabled_adapter_reference(hf_llama_dir, tmp_path,
                                                                            loss_type):
  """One batch through ftjax's decoder (the reference = adapters disabled in the same jitted
  loss) and through trl's DPOTrainer._compute_loss on peft (its reference: the same, by peft)."""
  model, torch_model = _lora_pair(hf_llama_dir, tmp_path)
  torch_model.train()
  trl_inputs, batch = _pair_batches(torch_model.config.vocab_size, seeds=(5,))[0]
  attrs = dict(beta=0.5, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=0.0)
  trl_loss, trl_metrics = _trl_dpo_model_loss(torch_model, trl_inputs, **attrs)
  loss_fn = logps_lib.DPOLoss(beta=0.5, loss_type=loss_type)
  sums = jax.jit(lambda m, b: loss_fn(m, b))(model, batch)
  count = float(sums["count"])
  assert count == 4
  assert abs(float(sums["loss_sum"]) / count - float(trl_loss)) <= TOL * abs(float(trl_loss))
  _assert_metrics_equal({k: v / count for k, v in sums.items()}, trl_metrics, PAIR_METRICS)
  assert abs(trl_metrics["rewards/margins"]) > 1e-3  # the adapters matter: not the trivial 0


def test_first_lora_dpo_step_loss_is_ln2_and_margins_zero(hf_llama_dir, tmp_path):
  """A fresh LoRA (B = 0) computes as its base, the reference: every log-ratio is 0, so the
  sigmoid loss is -log sigmoid(0) = ln 2 and the rewards and margins are 0."""
  model, _ = _lora_pair(hf_llama_dir, tmp_path, nonzero_b=False)
  _, batch = _pair_batches(128, seeds=(7,))[0]
  graphdef, train, frozen, mutable = step_lib.split_model(model, peft.AdapterParam)
  optimizer, _ = make_optimizer(train, lr=1e-3, steps=3, schedule="constant")
  state = step_lib.init_state(train, mutable, optimizer, seed=0)
  step = _jit_step(graphdef, optimizer, logps_lib.DPOLoss())
  state, metrics = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
  assert abs(float(metrics["loss"]) - math.log(2)) < 1e-6
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    assert abs(float(metrics[name])) < 1e-6, name
  _, second = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
  assert float(second["loss"]) < math.log(2) - 1e-4  # and the step learned (B moved off 0)


def test_three_lora_dpo_adamw_steps_equal_trl_and_peft(hf_llama_dir, tmp_path):
  """Three AdamW steps (weight decay, clipping) on three batches: the adapters agree with trl's
  DPO loss + peft + torch AdamW within the SFT parity test's tolerance (tests/test_step.py)."""
  from test_step import _peft_lora_state, _torch_adamw, _torch_step, l2_rel
  model, torch_model = _lora_pair(hf_llama_dir, tmp_path)
  graphdef, train, frozen, mutable = step_lib.split_model(model, peft.AdapterParam)
  lr, decay = 1e-3, 0.1
  optimizer, _ = make_optimizer(train, lr=lr, steps=3, schedule="constant", weight_decay=decay,
                                max_grad_norm=1.0)
  state = step_lib.init_state(train, mutable, optimizer, seed=0)
  step = _jit_step(graphdef, optimizer, logps_lib.DPOLoss(beta=0.5))
  torch_opt = _torch_adamw(torch_model.parameters(), lr, decay)
  torch_model.train()
  attrs = dict(beta=0.5, loss_types=["sigmoid"], loss_weights=[1.0], label_smoothing=0.0)
  for trl_inputs, batch in _pair_batches(torch_model.config.vocab_size):
    state, _ = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
    loss, _ = _trl_dpo_model_loss(torch_model, trl_inputs, **attrs)
    _torch_step(torch_model, torch_opt, loss)
  trained = step_lib.merge_model(graphdef, state["trainable"], frozen, state["mutable"])
  ours = peft.adapter_state_dict(trained)
  theirs = _peft_lora_state(torch_model)
  assert ours.keys() == theirs.keys()
  assert l2_rel(ours, theirs) < 1e-5
  init = peft.adapter_state_dict(model)
  assert l2_rel(ours, init) > 1e-3  # they moved


def _torch_logits(torch_model, inputs):
  with torch.no_grad():
    return torch_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_losses_from_the_decoder_equal_trl(hf_llama_dir, tmp_path, objective):
  """ORPO / SimPO from ftjax's decoder vs trl's own pieces on peft's logits: get_batch_logps
  (averaged over the completion), the chosen NLL as its concatenated_forward computes it (ORPO:
  every non-pad token; CPO/SimPO: the completion), then odds_ratio_loss / cpo_loss."""
  from trl.experimental.cpo.cpo_trainer import CPOTrainer
  from trl.experimental.orpo.orpo_trainer import ORPOTrainer
  model, torch_model = _lora_pair(hf_llama_dir, tmp_path)
  trl_inputs, batch = _pair_batches(torch_model.config.vocab_size, seeds=(9,))[0]
  logits = _torch_logits(torch_model, trl_inputs)
  ids = trl_inputs["input_ids"]
  labels = ids.masked_fill(trl_inputs["completion_mask"] == 0, -100)
  avg = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
  chosen, rejected = avg[:4], avg[4:]
  nll_labels = ids.masked_fill(trl_inputs["attention_mask"] == 0, -100) if objective == "orpo" else labels
  nll = torch.nn.functional.cross_entropy(logits[:4, :-1].reshape(-1, logits.shape[-1]),
                                          nll_labels[:4, 1:].reshape(-1))
  if objective == "orpo":
    losses, *_ = ORPOTrainer.odds_ratio_loss(_cpo_namespace(beta=0.3), chosen, rejected)
    want = float(nll - losses.mean())
    loss_fn = logps_lib.ORPOLoss(beta=0.3)
  else:
    ns = _cpo_namespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0)
    losses, _, _ = CPOTrainer.cpo_loss(ns, chosen, rejected)
    want = float(losses.mean() + 0.5 * nll)
    loss_fn = logps_lib.SimPOLoss(beta=2.0, gamma=0.5, cpo_alpha=0.5)
  sums = jax.jit(lambda m, b: loss_fn(m, b))(model, batch)
  assert abs(float(sums["loss_sum"]) / 4 - want) <= TOL * abs(want)
  assert abs(float(sums["logps/chosen"]) / 4 - float(chosen.mean())) <= TOL * abs(float(chosen.mean()))
  assert abs(float(sums["nll_loss"]) / 4 - float(nll)) <= TOL * float(nll)


def test_lora_kto_loss_equals_trl_with_disabled_adapter_reference(hf_llama_dir, tmp_path):
  """KTO: 8 unpaired examples and their mismatched KL sequences (prompt i, completion i-1)
  through ftjax's decoder and through KTOTrainer._compute_loss on peft."""
  from trl.trainer.kto_trainer import KTOTrainer
  model, torch_model = _lora_pair(hf_llama_dir, tmp_path)
  torch_model.train()
  (main, ours_main), (kl, ours_kl) = _pair_batches(torch_model.config.vocab_size, seeds=(11, 12))
  labels = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)
  ns = _trainer_namespace(calculate_KL=True, precompute_ref_logps=False, loss_type="kto", beta=0.4,
                          desirable_weight=1.2, undesirable_weight=0.9, ref_model=None)
  ns.model = torch_model
  ns._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(ns, m, b)
  inputs = dict(main, label=torch.tensor(labels), KL_input_ids=kl["input_ids"],
                KL_attention_mask=kl["attention_mask"], KL_completion_mask=kl["completion_mask"])
  trl_loss = float(KTOTrainer._compute_loss(ns, torch_model, inputs, False))
  trl_metrics = _trl_means(ns)
  # ftjax's KTO rows: [8, 2, seq] = (example, its KL sequence); _pair_batches split 8 rows as 4 pairs
  unpair = lambda b: {k: np.concatenate([v[:, 0], v[:, 1]]) for k, v in b.items()}
  batch = {k: np.stack([unpair(ours_main)[k], unpair(ours_kl)[k]], axis=1) for k in ours_main}
  batch["label"] = labels.astype(np.float32)
  loss_fn = logps_lib.KTOLoss(beta=0.4, desirable_weight=1.2, undesirable_weight=0.9)
  sums = jax.jit(lambda m, b: loss_fn(m, b))(model, batch)
  assert abs(float(sums["loss_sum"]) / 8 - trl_loss) <= TOL * abs(trl_loss)
  _assert_metrics_equal({k: v / 8 for k, v in sums.items()}, trl_metrics,
                        ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"))


def test_precomputed_reference_logps_give_the_same_dpo_loss(hf_llama_dir, tmp_path):
  """dpo.precompute_ref_logps: log-probs computed once before training (adapters disabled) feed
  the same loss as the in-step reference; a model without adapters refuses the in-step one."""
  from tiny import tiny_model
  model, _ = _lora_pair(hf_llama_dir, tmp_path)
  _, batch = _pair_batches(128, seeds=(4,))[0]
  ref = logps_lib.precompute_ref_logps(model, batch, batch_size=3)  # 4 pairs: a partial batch too
  assert ref.shape == (4, 2) and np.all(ref < 0)
  loss_fn = logps_lib.DPOLoss(beta=0.5)
  in_step = jax.jit(lambda m, b: loss_fn(m, b))(model, batch)
  stored = jax.jit(lambda m, b: loss_fn(m, b))(model, dict(batch, ref_logps=ref))
  for key in in_step:
    assert abs(float(in_step[key]) - float(stored[key])) <= 1e-5 * max(1.0, abs(float(in_step[key]))), key
  with pytest.raises(ValueError, match="precompute_ref_logps"):
    loss_fn(tiny_model(), jax.tree.map(lambda x: x % 64, batch))


# --- data: TRL's formats, rows and the problems at file:line ---------------------------------

import json

from ftjax.data import preference as pref_data
from ftjax.data import sources


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture(scope="module")
def tok():
  from tiny import tiny_tokenizer
  return tiny_tokenizer()


def test_the_three_pair_formats_give_the_same_rows(tmp_path, tok):
  """standard strings, conversational lists, and an implicit prompt (whole conversations with a
  shared prefix) describe one pair: the same token rows; the prompt untrained, each row's trained
  tokens are its reply (and the end of its turn)."""
  user, good, bad = "What is 2 + 3?", "5", "six"
  records = [
      {"prompt": user, "chosen": good, "rejected": bad},
      {"prompt": [{"role": "user", "content": user}],
       "chosen": [{"role": "assistant", "content": good}],
       "rejected": [{"role": "assistant", "content": bad}]},
      {"chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": good}],
       "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": bad}]}]
  recs, _ = sources.read_all(_write_jsonl(tmp_path / "p.jsonl", records))
  pairs, problems = pref_data.read_pairs(recs)
  assert problems == [] and len(pairs) == 3
  kept, counts, _ = pref_data.tokenize_items(pairs, tok, max_len=65)
  rows = pref_data.pair_rows(kept, 64, pad_id=tok.pad_token_id)
  assert rows["inputs"].shape == (3, 2, 64)
  for key in ("inputs", "loss_mask", "target_mask"):
    assert (rows[key][0] == rows[key][1]).all() and (rows[key][0] == rows[key][2]).all(), key
  for side, reply in ((0, good), (1, bad)):
    trained = rows["targets"][0, side][rows["loss_mask"][0, side] > 0]
    assert tok.decode(trained.tolist()).startswith(reply)
    prompt_end = int(np.argmax(rows["loss_mask"][0, side]))
    assert user in tok.decode(rows["inputs"][0, side, :prompt_end].tolist())
  assert (rows["target_mask"] >= rows["loss_mask"]).all()
  assert rows["target_mask"].sum() > rows["loss_mask"].sum()  # the prompt's targets too


def test_bad_pairs_get_codes_at_file_line(tmp_path, tok):
  records = [
      {"prompt": "a", "chosen": "b", "rejected": "c"},                  # 1 fine
      {"prompt": "a", "rejected": "c"},                                 # 2 missing chosen
      {"prompt": "a", "chosen": "  ", "rejected": "c"},                 # 3 empty reply
      {"prompt": "a", "chosen": "same", "rejected": "same"},            # 4 identical
      {"prompt": "a", "chosen": "b", "rejected": "c"},                  # 5 duplicate of 1
      {"prompt": "long " * 80, "chosen": "x", "rejected": "y"},         # 6 over length
      {"prompt": "q", "chosen": 3, "rejected": "c"},                    # 7 wrong type
  ]
  path = _write_jsonl(tmp_path / "bad.jsonl", records)
  recs, _ = sources.read_all(path)
  pairs, problems = pref_data.read_pairs(recs)
  problems += pref_data.duplicates(pairs)
  kept, counts, over = pref_data.tokenize_items(pairs, tok, max_len=33, length_policy="drop")
  found = {(p.code, p.where) for p in problems + over}
  assert found == {("missing_field", f"{path}:2"), ("empty_reply", f"{path}:3"),
                   ("identical_replies", f"{path}:4"), ("duplicate_pair", f"{path}:5"),
                   ("over_length", f"{path}:6"), ("wrong_type", f"{path}:7")}
  assert counts["dropped"] == 1 and len(kept) == 2
  with pytest.raises(Exception, match=f"{path}:6: over_length"):
    pref_data.tokenize_items(pairs, tok, max_len=33, length_policy="error")


def test_kto_rows_pair_each_prompt_with_the_previous_completion(tmp_path, tok):
  records = [{"prompt": f"Say {w}.", "completion": w, "label": i % 2 == 0}
             for i, w in enumerate(["one", "two", "three"])]
  records.append({"prompt": "x", "completion": "y", "label": "yes"})
  path = _write_jsonl(tmp_path / "kto.jsonl", records)
  items, problems = pref_data.read_pairs(sources.read_all(path)[0], unpaired=True)
  assert [(p.code, p.where) for p in problems] == [("bad_label", f"{path}:4")]
  kept, _, _ = pref_data.tokenize_items(items, tok, max_len=65)
  rows = pref_data.kto_rows(kept, tok, 64, pad_id=tok.pad_token_id)
  assert rows["label"].tolist() == [1.0, 0.0, 1.0]
  decode = lambda i, side, mask: tok.decode(rows["targets"][i, side][rows[mask][i, side] > 0].tolist())
  assert decode(1, 1, "loss_mask").startswith("one")  # prompt 2, completion 1
  assert decode(0, 1, "loss_mask").startswith("three")  # cyclic
  assert "Say two." in decode(1, 1, "target_mask")


# --- the objectives in a run ------------------------------------------------------------------

import importlib.util
import os

from ftjax import objectives
from ftjax import run as run_lib
from ftjax import train as train_lib
from ftjax.data import preference_task
from ftjax.errors import FtjaxError
from tiny import run_config


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("pref")
  preference_task.write_splits(str(out), n_train=16, n_eval=8, seed=3)
  return str(out)


def _pref_config(model_dir, pref_dir, objective="dpo", **overrides):
  c = run_config(model_dir, pref_dir, objective=objective, **{"train.steps": 1, **overrides})
  c.eval.generate = False
  c.eval.forgetting = False
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_example_config_trains_one_lora_dpo_step_with_trl_metric_names(model_dir, tmp_path):
  """configs/preference.py (runlocal), the tiny model in place of SmolLM2: the generated pairs,
  a LoRA DPO step whose first loss is ln 2, TRL's metric names under train/ and eval/, the
  generation metrics and the report."""
  spec = importlib.util.spec_from_file_location("pref_cfg", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "preference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.model.name_or_path = model_dir
  c.data.train, c.data.eval = str(tmp_path / "gen" / "train.jsonl"), str(tmp_path / "gen" / "eval.jsonl")
  c.train.steps, c.train.log_every, c.train.eval_batches = 1, 1, 1
  c.eval.max_examples, c.eval.max_new_tokens = 2, 4
  c.mesh.data = 1
  workdir = str(tmp_path / "run")
  train_lib.train(c, workdir)
  rows = _metrics(workdir)
  # Greedy answers to held-out prompts scored against the chosen reply, base vs tuned, and the
  # base's preference metrics measured (its reward margins 0: it is the reference).
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  assert abs(results["loss"]["base"]["rewards/margins"]) < 1e-6
  assert results["loss"]["base"]["rewards/accuracies"] == 0.0
  assert "rewards/accuracies" in results["loss"]["fine-tuned"]
  report = open(os.path.join(workdir, "report.md")).read()
  assert "exact_match" in report and "reference: its rewards and margins are 0" in report
  first = next(r for r in rows if "train/loss" in r)
  assert abs(first["train/loss"] - math.log(2)) < 1e-5
  for name in PAIR_METRICS:
    assert f"train/{name}" in first, name
  assert abs(first["train/rewards/margins"]) < 1e-6
  final_eval = [r for r in rows if "eval/rewards/accuracies" in r]
  assert final_eval and "eval/loss" in final_eval[-1]


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_each_objective_runs_a_step_from_its_config_block(model_dir, pref_dir, tmp_path, objective):
  if objective == "kto":  # unpaired records
    for split in ("train", "eval"):
      pairs = [json.loads(l) for l in open(os.path.join(pref_dir, f"{split}.jsonl"))]
      recs = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
              for p in pairs for k in ("chosen", "rejected")]
      _write_jsonl(tmp_path / f"{split}.jsonl", recs)
    data = str(tmp_path)
  else:
    data = pref_dir
  c = _pref_config(model_dir, data, objective, **{f"{objective}.beta": 0.2})
  run = run_lib.setup(c)
  assert run.objective.name == objective
  state, _ = run_lib.init_or_restore(run, None)
  step = run_lib.jit_train_step(run, state)
  rows = run.train_ds.batches(8, seed=0).next_batch(8)
  _, metrics = step(state, run.frozen, run.place_batch(rows))
  assert np.isfinite(float(metrics["loss"])) and "rewards/chosen" in metrics
  extra = {"orpo": "log_odds_ratio", "simpo": "nll_loss", "kto": "kl"}[objective]
  assert extra in metrics


def test_a_config_mixing_two_objectives_keys_is_refused_naming_them(model_dir, pref_dir):
  c = _pref_config(model_dir, pref_dir, "dpo", **{"orpo.beta": 0.5, "dpo.beta": 0.2})
  with pytest.raises(FtjaxError, match=r"orpo.beta belong\(s\) to objective 'orpo'.*objective='dpo'"):
    objectives.get(c)
  c = _pref_config(model_dir, pref_dir, "sft", **{"kto.desirable_weight": 2.0})
  with pytest.raises(FtjaxError, match=r"kto.desirable_weight"):
    objectives.get(c)
  c = _pref_config(model_dir, pref_dir, "dpo", **{"dpo.label_smoothing": 0.1})
  with pytest.raises(FtjaxError, match=r"dpo.label_smoothing=0.1; expected 0 unless dpo.loss_type='robust'"):
    objectives.get(c)


def test_full_fine_tuning_dpo_precomputes_and_stores_reference_logps(model_dir, pref_dir, tmp_path):
  """method=full: the reference log-probs are computed once from the starting model, stored in
  the workdir, and the first step's loss is still ln 2 (policy == reference at step 0)."""
  c = _pref_config(model_dir, pref_dir, "dpo", method="full")
  run = run_lib.setup(c)
  assert "ref_logps" in run.objective.row_spec()
  workdir = str(tmp_path)
  run.objective.before_training(run, workdir)
  stored = np.load(os.path.join(workdir, "ref_logps.npz"))
  assert stored["train"].shape == (16, 2) and stored["eval"].shape == (8, 2)
  state, _ = run_lib.init_or_restore(run, None)
  step = run_lib.jit_train_step(run, state)
  _, metrics = step(state, run.frozen, run.place_batch(run.train_ds.batches(8, seed=0).next_batch(8)))
  assert abs(float(metrics["loss"]) - math.log(2)) < 1e-5
  # A second run in the same workdir (a resume) reads them instead of scoring its model.
  again = run_lib.setup(c)
  again.trainable = jax.tree.map(lambda x: x * 0, again.trainable)  # would change every log-prob
  again.objective.before_training(again, workdir)
  np.testing.assert_array_equal(again.train_ds.rows["ref_logps"], stored["train"])


def test_data_check_reports_preference_problems_at_file_line(model_dir, tmp_path):
  from ftjax.models.resolve import tokenizer_for
  train = _write_jsonl(tmp_path / "train.jsonl", [
      {"prompt": "Name a colour.", "chosen": "red", "rejected": "7"},
      {"prompt": "Name a colour.", "chosen": "red", "rejected": "7"},
      {"prompt": "Name a fruit.", "chosen": "apple", "rejected": "apple"},
      {"prompt": "Name a tool."}])
  held = _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "name a colour", "chosen": "blue", "rejected": "x"}])
  c = _pref_config(model_dir, str(tmp_path), "dpo")
  report, kept = objectives.get(c).check_data(tokenizer_for(model_dir))
  codes = {(p["code"], p["where"]) for p in report["problems"]}
  assert codes == {("duplicate_pair", f"{train}:2"), ("identical_replies", f"{train}:3"),
                   ("missing_field", f"{train}:4")}
  assert report["failed"]
  # Prompt leakage: the check's leakage section compares user turns, i.e. the prompts (line 2,
  # a duplicate_pair error, is out of the kept examples).
  assert [(p["train"], p["eval"]) for p in report["leakage"]["listed"]] == [(f"{train}:1", f"{held}:1")]
  assert report["splits"]["train"]["rows"] == 1  # the one valid pair: both replies in one row
