"""GRPO against TRL: its loss and advantages on the same numbers, and its reward functions.

TRL's `_compute_loss` runs unmodified on a stand-in trainer holding only the attributes it reads;
its model forward is replaced by the fixed per-token log-probs (a leaf tensor, so torch gives the
gradient we compare with jax.grad). Tolerance 1e-5: both sides compute in float32 on values of
order 1; the measured differences are ~1e-7.
"""

import collections
import logging
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


# --- reward functions --------------------------------------------------------------------------

from ftjax.errors import FtjaxError  # noqa: E402
from ftjax.objectives import grpo_rewards  # noqa: E402


def test_exact_answer_reads_tags_or_the_last_number_and_compares_by_value():
  completions = ["so it is 12", "<answer>1,200</answer> not 7", "the answer is 3.0", "no idea",
                 "Paris", "<answer> paris </answer>"]
  answers = ["12", "1200", "3", "4", "paris", "Paris"]
  got = grpo_rewards.exact_answer(["p"] * 6, completions, answer=answers)
  assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # "Paris" alone has no tag and no number
  assert grpo_rewards.exact_answer(["p"], ["5"], answer=[""]) == [None]


def test_weighted_sum_skips_none_and_marks_unscorable():
  rewards = grpo_rewards.Rewards("json_valid,length_penalty", "2,0.5")
  per_func = np.array([[1, -0.01], [np.nan, -0.02], [np.nan, np.nan]], np.float32)
  np.testing.assert_allclose(rewards.weighted_sum(per_func)[:2], [2 - 0.005, -0.01], rtol=1e-6)
  assert np.isnan(rewards.weighted_sum(per_func)[2])


def _write_module(tmp_path, monkeypatch, name, body):
  (tmp_path / f"{name}.py").write_text(body)
  monkeypatch.syspath_prepend(str(tmp_path))


def test_a_user_reward_gets_trl_arguments_and_a_failure_names_the_prompt(tmp_path, monkeypatch):
  _write_module(tmp_path, monkeypatch, "my_rewards", (
      "def seen(prompts, completions, answer, **kw):\n"
      "    return [float(len(c)) if a != 'x' else None for c, a in zip(completions, answer)]\n"
      "def breaks(prompts, completions, **kw):\n"
      "    return [1.0 / (len(c) - 3) for c in completions]\n"))
  rewards = grpo_rewards.Rewards("my_rewards:seen,json_valid")
  scores = rewards(["q1", "q1", "q2"], ["{}", "abc", "[1]"], {"answer": ["1", "x", "2"]})
  np.testing.assert_array_equal(scores[:, 0], [2.0, np.nan, 3.0])
  np.testing.assert_array_equal(scores[:, 1], [1.0, 0.0, 1.0])
  broken = grpo_rewards.Rewards("my_rewards:breaks")
  with pytest.raises(FtjaxError, match=r"my_rewards:breaks raised ZeroDivisionError.* completion 1 "
                                       r"\(prompt 'second prompt'\)"):
    broken(["first prompt", "second prompt"], ["abcd", "abc"], {})


@pytest.mark.parametrize("funcs, weights, message", [
    ("", "", "grpo.reward_funcs is empty"),
    ("os:remove", "", "system module 'os'"),
    ("json_valid,length_penalty", "1", "1 weight\\(s\\) for 2 reward function\\(s\\)"),
    ("no_such_reward_module:f", "", "failed to import: ModuleNotFoundError"),
])
def test_bad_reward_config_is_named(funcs, weights, message):
  with pytest.raises(FtjaxError, match=message):
    grpo_rewards.Rewards(funcs, weights)


def test_a_reward_returning_a_non_number_is_named(tmp_path, monkeypatch):
  _write_module(tmp_path, monkeypatch, "my_bad_rewards",
                "def bad(prompts, completions, **kw):\n    return ['1'] * len(completions)\n")
  with pytest.raises(FtjaxError, match=r"my_bad_rewards:bad returned '1' for completion 0"):
    grpo_rewards.Rewards("my_bad_rewards:bad")(["p"], ["c"], {})


# --- rollouts and the loss on a tiny model ------------------------------------------------------

import functools  # noqa: E402

import optax  # noqa: E402

from ftjax import peft  # noqa: E402
from ftjax import step as step_lib  # noqa: E402
from ftjax.objectives import grpo_rollout  # noqa: E402
from tiny import tiny_model  # noqa: E402

EOS, LIKED = 1, 5  # the stop token; the token the toy reward likes


def _lora_model():
  model = tiny_model(seed=0)
  peft.add_adapter(model, "default", peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                   rngs=1)
  return model


def test_rollout_rows_mark_exactly_the_completion_tokens(monkeypatch):
  """Rows are prompt + completion with exactly the completion's targets trained. Each prompt is
  prefilled once for its G completions (the prefill sees 2 rows, not 2 x G; num_return_sequences)
  and its KV cache copied to its G rows: the completions equal those of generate_ids on every
  prompt repeated G times (the rollouts' path before), sampled with top-k / top-p. Measured on
  SmolLM2-135M: the prefill of 16 rows of 96 tokens took 1.9 s, of 2 rows 0.42 s (2 loaded CPU
  cores), in a 5.8 s rollout."""
  from ftjax import generate
  model = _lora_model()
  prompts = [[3, 4, 6], [7, 8, 9, 10, 11]]
  sampling = dict(temperature=0.7, top_k=20, top_p=0.9, seed=0)
  prefilled, prefill = [], generate._prefill

  def counting_prefill(graphdef, state, tokens, *rest):
    prefilled.append(tokens.shape[0])
    return prefill(graphdef, state, tokens, *rest)
  monkeypatch.setattr(generate, "_prefill", counting_prefill)
  rows, completions, truncated = grpo_rollout.rollout_rows(
      model, prompts, num_generations=3, seq_len=16, max_new_tokens=6, eos_ids=[EOS], **sampling)
  assert prefilled == [2]
  repeated = [p for p in prompts for _ in range(3)]
  assert completions == generate.generate_ids(model, repeated, 6, eos_ids=[EOS], prompt_width=10,
                                              **sampling)
  assert len({tuple(c) for c in completions}) > len(prompts)  # a prompt's rows sample apart
  assert rows["inputs"].shape == (6, 16) and len(completions) == 6
  for r, completion in enumerate(completions):
    prompt = prompts[r // 3]
    full = prompt + completion
    np.testing.assert_array_equal(rows["inputs"][r, :len(full) - 1], full[:-1])
    np.testing.assert_array_equal(rows["targets"][r, :len(full) - 1], full[1:])
    # the targets that are completion tokens: positions len(prompt)-1 .. len(full)-2
    want = np.zeros(16, np.float32)
    want[len(prompt) - 1:len(full) - 1] = 1
    np.testing.assert_array_equal(rows["loss_mask"][r], want)
    assert truncated[r] == (completion[-1] != EOS)
  masked, _, _ = grpo_rollout.rollout_rows(
      model, prompts, num_generations=3, seq_len=16, max_new_tokens=6, eos_ids=[EOS],
      mask_truncated=True, **sampling)
  assert (masked["loss_mask"][truncated] == 0).all()
  np.testing.assert_array_equal(masked["loss_mask"][~truncated], rows["loss_mask"][~truncated])

SAMPLER = ("_new_cache", "_prefill", "_tile_prefix", "_fan_out", "_first_token", "_decode")


def _sampler_compiles(records) -> dict:
  """How many times each of ftjax.generate's jitted pieces compiled, from jax's compile log."""
  found = {name: 0 for name in SAMPLER}
  for r in records:
    for name in SAMPLER:
      found[name] += f"Compiling jit({name}) " in r.getMessage()
  return found


def test_rollouts_compile_the_sampler_once_whatever_the_prompt_lengths(caplog):
  """Three steps' rollouts (the params changed between them, as training does) of prompts whose
  lengths fall in different 16-token buckets, with shared prefixes of different lengths: only
  the first compiles the sampler. Before, each bucket / prefix length compiled the prefill and
  the decode loop again (measured 3 compiles each here)."""
  model = _lora_model()
  graphdef, train, frozen, mutable = step_lib.split_model(model, peft.trainable(model))
  batches = [[[3] * 3, [4] * 5],  # 16 columns bucketed, no shared prefix
             [[5] * 20, [5] * 17 + [6] * 9],  # 32 columns, a 16-token shared prefix
             [[7] * 40, [8] * 2]]  # 48 columns
  compiles = []
  for i, prompts in enumerate(batches):
    params = jax.tree.map(lambda x: x + 0.01 * i, train)
    current = step_lib.merge_model(graphdef, params, frozen, mutable)
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
      caplog.clear()
      rows, completions, _ = grpo_rollout.rollout_rows(
          current, prompts, num_generations=2, seq_len=56, max_new_tokens=6, eos_ids=[EOS],
          temperature=1.0, seed=i)
      compiles.append(_sampler_compiles(caplog.records))
    assert rows["inputs"].shape == (4, 56) and len(completions) == 4
  assert compiles[1] == compiles[2] == {name: 0 for name in SAMPLER}, compiles


def test_grpo_lora_raises_a_toy_reward_and_beta_uses_the_adapter_free_reference():
  """A tiny LoRA model learns to emit the liked token: mean reward over the last three of 12
  steps above the first three's by > 0.1 (the toy reward is the liked token's share of the
  completion; random init starts near 1/64). With beta > 0 the KL is 0 at the first step (the
  adapter's B starts at 0, so policy = reference) and > 0 once the adapter has moved."""
  model = _lora_model()
  graphdef, train, frozen, mutable = step_lib.split_model(model, peft.trainable(model))
  optimizer = optax.adam(3e-2)
  state = step_lib.init_state(train, mutable, optimizer, seed=0)
  loss_fn = grpo_rollout.GRPOLoss(loss_type="dapo", beta=0.04, max_completion_length=6,
                                  row_stats=("reward",))
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, loss_fn=loss_fn,
                                   optimizer=optimizer))
  prompts = [[3, 4, 6], [7, 8, 9, 10], [12, 13], [20, 21, 22]]
  rewards_seen, kls = [], []
  for i in range(12):
    current = step_lib.merge_model(graphdef, state["trainable"], frozen, state["mutable"])
    rows, completions, _ = grpo_rollout.rollout_rows(
        current, prompts, num_generations=4, seq_len=16, max_new_tokens=6, eos_ids=[EOS], seed=i)
    reward = np.array([c.count(LIKED) / len(c) for c in completions], np.float32)
    advantages, _ = grpo_loss.group_advantages(jnp.asarray(reward), 4, "group")
    batch = dict(rows, advantages=np.asarray(advantages), reward=reward)
    state, metrics = step(state, frozen, jax.tree.map(lambda x: jnp.asarray(x)[None], batch))
    rewards_seen.append(float(metrics["reward"]))
    kls.append(float(metrics["kl"]))
    np.testing.assert_allclose(float(metrics["reward"]), reward.mean(), rtol=1e-5)
  assert kls[0] < 1e-6 < kls[-1]
  assert np.mean(rewards_seen[-3:]) > np.mean(rewards_seen[:3]) + 0.1, rewards_seen


# --- objective = "grpo" through ftjax.train -----------------------------------------------------

import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from ftjax import config as config_lib  # noqa: E402
from ftjax import objectives  # noqa: E402
from ftjax import train as train_lib  # noqa: E402
from ftjax.data import arithmetic_task  # noqa: E402

GRPO_METRICS = ("reward", "reward_std", "rewards/exact_answer", "rewards/answer_format", "kl",
                "completion_length", "clip_ratio/region_mean", "frac_reward_zero_std",
                "rollout_tokens_per_s")


def _example_config(model_dir, tmp_path, **overrides):
  """configs/grpo.py (runlocal) with the tiny model in place of SmolLM2, one step."""
  spec = importlib.util.spec_from_file_location("grpo_cfg", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "grpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.model.name_or_path = model_dir
  c.data.train, c.data.eval = str(tmp_path / "gen" / "train.jsonl"), str(tmp_path / "gen" / "eval.jsonl")
  c.train.steps, c.train.log_every, c.mesh.data = 1, 1, 1
  c.train.batch_size, c.grpo.num_generations = 8, 4  # 2 prompts x 4 completions
  c.grpo.max_new_tokens, c.eval.max_examples = 6, 2
  for key, value in overrides.items():
    block, name = key.split(".")
    c[block][name] = value
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_example_config_trains_grpo_with_trl_metric_names_reuse_and_a_reward_eval(model_dir, tmp_path):
  """Two LoRA GRPO steps of configs/grpo.py on generated arithmetic with num_iterations=2 and
  beta > 0 (one train() call: each costs ~1 min on the shared CPUs): TRL's metric names under
  train/, kl 0 at the first step (the fresh adapter computes as the reference), both steps
  training the same rollouts (same rewards and lengths) with old_logps kept, and the
  base-vs-tuned greedy reward eval in summary.json and report.md."""
  c = _example_config(model_dir, tmp_path, **{"grpo.beta": 0.04, "grpo.num_iterations": 2})
  c.train.steps = 2
  assert "old_logps" in objectives.get(c).row_spec()
  workdir = str(tmp_path / "run")
  summary = train_lib.train(c, workdir)
  rows = [r for r in _rows(workdir) if "train/loss" in r]
  assert len(rows) == 2
  for name in GRPO_METRICS:
    assert f"train/{name}" in rows[0], name
  assert abs(rows[0]["train/kl"]) < 1e-6
  assert rows[0]["train/completion_length"] >= 1 and rows[0]["train/rollout_tokens_per_s"] > 0
  for key in ("train/reward", "train/completion_length", "train/rollout_tokens_per_s"):
    assert rows[0][key] == rows[1][key], key  # the second iteration of the same rollouts
  ev = summary["reward_eval"]
  for side in ("base", "tuned"):
    assert ev[side]["prompts"] == 2 and 0.0 <= ev[side]["reward"] <= 1.5
    assert len(ev[side]["reward_ci95"]) == 2 and ev[side]["samples"]
    assert 0.0 <= ev[side]["sampled"]["reward"] <= 1.5
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["reward_eval"]["tuned"]["reward"] == ev["tuned"]["reward"]
  report = open(os.path.join(workdir, "report.md")).read()
  assert "## GRPO: eval rewards" in report
  assert f"rewards/exact_answer (sampled, T={c.grpo.temperature})" in report
  assert os.path.exists(os.path.join(workdir, "grpo_base_eval.json"))


def _sft_twin(grpo_config):
  """The SFT config of the same model, adapter, batch (rows) and row length."""
  c = config_lib.base_config()
  c.model.name_or_path, c.method, c.data.train = grpo_config.model.name_or_path, "lora", "unused.jsonl"
  c.lora = grpo_config.lora
  c.data.seq_len, c.mesh = grpo_config.data.seq_len, grpo_config.mesh
  c.train.batch_size, c.train.steps, c.train.warmup_steps = grpo_config.train.batch_size, 1, 0
  return c


def test_plan_counts_the_rollout_kv_cache_beside_the_train_state(model_dir, tmp_path, monkeypatch):
  """ftjax.plan of a GRPO config: its "rollout KV cache" line is the byte count of the cache
  that grpo_rollout's sampler allocates for train.batch_size (G x prompts) rows, measured on the
  arrays; with the rollout's other buffers it is in the total, which is the SFT twin's plan
  (same model, adapter, rows and length; its step) plus those lines and GRPO's extra per-row
  inputs (advantages, row stats). Before, planning a GRPO config raised AttributeError."""
  from ftjax import generate
  from ftjax import models
  from ftjax import plan as plan_lib
  c = _example_config(model_dir, tmp_path)  # 2 prompts x G=4 rows of 96 tokens, 6 new
  c.mesh.data = 1
  grpo_plan = plan_lib.plan(c)
  sft_plan = plan_lib.plan(_sft_twin(c))
  allocated, first_token = [], generate._first_token

  def counting_first_token(logits, carry, **kwargs):  # the cache the decode loop runs with
    allocated.append(sum(x.nbytes for x in jax.tree.leaves(carry["cache"])))
    return first_token(logits, carry, **kwargs)
  monkeypatch.setattr(generate, "_first_token", counting_first_token)
  model, _ = models.load(model_dir)
  prompt_budget = c.data.seq_len - c.grpo.max_new_tokens
  grpo_rollout.rollout_rows(model, [[5] * 30, [6] * prompt_budget], num_generations=4,
                            seq_len=c.data.seq_len, max_new_tokens=c.grpo.max_new_tokens,
                            eos_ids=[EOS], temperature=1.0)
  assert allocated == [grpo_plan.rollout_cache] and allocated[0] > 0
  assert grpo_plan.rollout_buffers >= grpo_plan.rollout_cache  # the prefill's second cache
  assert sft_plan.rollout_cache == sft_plan.rollout_buffers == 0
  rollout = grpo_plan.rollout_cache + grpo_plan.rollout_buffers
  step_difference = sum(getattr(grpo_plan, k) - getattr(sft_plan, k)
                        for k in ("batch", "temporaries", "outputs"))  # per-row inputs, metrics
  assert grpo_plan.total - sft_plan.total == rollout + step_difference
  # the steps differ by little next to the rollout (measured: the same temporaries, 256 bytes
  # of per-row inputs and 108 of metrics): the loss runs the same forward
  assert abs(step_difference) < grpo_plan.rollout_cache / 100, (grpo_plan, sft_plan)
  table = dict(grpo_plan.rows())
  assert table["GRPO rollout KV cache (G x prompts rows)"] == allocated[0]
  assert table["total per device"] == grpo_plan.total


def test_report_draws_the_reward_curve_and_the_trend_compares_quarters(tmp_path):
  """A run folder whose metrics.jsonl has train/reward gets rewards.png in its report (the
  reward per step, each function's too); reward_trend's quarters are the first and last
  quarter of the steps' values, their CIs inside the values' range."""
  from ftjax import evaluation
  from ftjax.objectives.grpo import reward_trend
  rewards = [0.1, 0.0, 0.2, 0.1, 0.3, 0.4, 0.2, 0.5, 0.6, 0.4, 0.7, 0.5]
  _write_jsonl(tmp_path / "metrics.jsonl", [
      {"step": i + 1, "train/loss": 0.1, "train/reward": r, "train/rewards/exact_answer": r}
      for i, r in enumerate(rewards)])
  report = evaluation.report.write(str(tmp_path), results={})
  assert report["plots"]["rewards"] == "rewards.png" and (tmp_path / "rewards.png").stat().st_size
  assert "![GRPO reward over steps](rewards.png)" in (tmp_path / "report.md").read_text()
  trend = reward_trend(rewards)
  assert trend["steps"] == 12 and trend["first"] == pytest.approx(0.1) and trend["last"] == pytest.approx(1.6 / 3)
  assert 0.0 <= trend["first_ci95"][0] <= 0.1 <= trend["first_ci95"][1] <= 0.2 + 1e-9
  assert 0.4 <= trend["last_ci95"][0] <= 1.6 / 3 <= trend["last_ci95"][1] <= 0.7
  assert reward_trend([0.1, 0.2, 0.3]) is None  # under 4 steps: no quarter to compare


def _write_jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_data_check_names_bad_prompts_at_file_line_and_over_long_ones(model_dir, tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", [
      {"prompt": "What is 2 + 2?", "answer": "4"},
      {"question": "no prompt key"},
      {"prompt": "   "},
      {"prompt": 7},
      {"prompt": [{"role": "user", "content": "What is 3 + 3?"}], "answer": "6"},
      {"prompt": "long " * 80, "answer": "1"}])
  c = _example_config(model_dir, tmp_path)
  c.data.train, c.data.eval = str(tmp_path / "train.jsonl"), ""
  c.data.generate = ""
  from ftjax.models.resolve import tokenizer_for
  report, _ = objectives.get(c).check_data(tokenizer_for(model_dir))
  where = {p["code"]: p["where"] for p in report["problems"]}
  path = str(tmp_path / "train.jsonl")
  assert where["missing_field"] == f"{path}:2"
  assert where["empty_prompt"] == f"{path}:3"
  assert where["wrong_type"] == f"{path}:4"
  over = next(p for p in report["problems"] if p["code"] == "over_length")
  assert over["where"] == f"{path}:6" and "data.seq_len - grpo.max_new_tokens" in over["message"]


@pytest.mark.parametrize("overrides, message", [
    ({"train.batch_size": 6}, "train.batch_size=6 counts completions and must be a multiple of "
                              "grpo.num_generations=4"),
    ({"grpo.num_generations": 1, "train.batch_size": 4}, "grpo.num_generations=1; expected >= 2"),
    ({"data.seq_len": 6}, "data.seq_len=6 must exceed grpo.max_new_tokens=6"),
    ({"grpo.loss_type": "ppo"}, "grpo.loss_type='ppo'"),
    ({"grpo.scale_rewards": "max"}, "grpo.scale_rewards='max'"),
    ({"grpo.reward_funcs": ""}, "grpo.reward_funcs is empty"),
    ({"grpo.num_iterations": 0}, "grpo.num_iterations=0; expected >= 1"),
    ({"grpo.beta": 0.1, "method": "full"}, "grpo.beta > 0 needs a reference model; under method=full"),
    ({"data.shards": 2}, "objective=grpo runs on one process with data.shards 0 or 1"),
])
def test_bad_grpo_config_is_named(model_dir, tmp_path, overrides, message):
  c = _example_config(model_dir, tmp_path)
  for key, value in overrides.items():
    if "." in key:
      block, name = key.split(".")
      c[block][name] = value
    else:
      c[key] = value
  with pytest.raises(FtjaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
    objectives.get(c)


def test_a_grpo_key_under_another_objective_is_refused(model_dir, tmp_path):
  c = _example_config(model_dir, tmp_path)
  c.objective = "sft"
  with pytest.raises(FtjaxError, match=r"grpo\..* belong\(s\) to objective 'grpo'"):
    objectives.get(c)
  assert config_lib.base_config().grpo.num_generations == 8  # TRL's default


def test_arithmetic_task_answers_are_right():
  for p in arithmetic_task.make_problems(50, seed=1):
    a, op, b = p["prompt"].split("?")[0].split()[2:5]
    assert int(p["answer"]) == eval(f"{int(a)} {op} {int(b)}")  # noqa: S307 - our own digits


def test_arithmetic_splits_share_no_prompt(tmp_path):
  """The held-out exact-answer rate is measured on prompts the run never trained on (the
  first generator's 400 + 100 draws repeated 25 train prompts in eval)."""
  train, held_out = (_read_jsonl(p) for p in arithmetic_task.write_splits(str(tmp_path)))
  prompts = [r["prompt"] for r in train]
  assert len(train) == 400 and len(held_out) == 100 and len(set(prompts)) == 400
  assert not set(prompts) & {r["prompt"] for r in held_out}


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_answer_format_wants_exactly_one_non_empty_tag():
  got = grpo_rewards.answer_format(["p"] * 4, ["<answer>85</answer>", "85", "<answer> </answer>",
                                               "<answer>1</answer><answer>2</answer>"])
  assert got == [1.0, 0.0, 0.0, 0.0]


def test_the_rollout_timer_starts_after_the_previous_update_has_finished(monkeypatch):
  """jax runs the previous train step asynchronously: the rollout waits for its params before
  its timer starts, so rollout_tokens_per_s times the sampler alone. Before, the rollout got
  the params still being computed (a SmolLM2 run logged 17-29 rollout tokens/s, the update's
  time included). The 'update' here is ~7 GFLOP of matmuls, still running when dispatch returns."""
  from ftjax.config import base_config
  from ftjax.objectives import grpo as grpo_objective

  class Sampled(Exception):
    pass

  def fake_rollout_rows(model, *args, **kwargs):  # the model here is the update's output
    raise Sampled(all(x.is_ready() for x in jax.tree.leaves(model)))
  monkeypatch.setattr(grpo_objective, "rollout_rows", fake_rollout_rows)
  c = base_config()
  c.objective, c.train.batch_size, c.grpo.num_generations = "grpo", 2, 2
  update = jax.jit(lambda x: jax.lax.fori_loop(0, 200, lambda i, a: jnp.tanh(a @ a), x))
  trainable = update(jnp.ones((256, 256), jnp.float32) * 0.01)
  run = types.SimpleNamespace(train_ds=types.SimpleNamespace(examples=["an example"]),
                              model=lambda params: params, tokenizer=types.SimpleNamespace(
                                  pad_token_id=0, eos_token_id=EOS, chat_template=None),
                              model_cfg=types.SimpleNamespace(eos_token_id=EOS,
                                                              generation_eos_token_ids=None))
  prompt_rows = {"prompt_ids": np.array([[3, 4, 0]]), "prompt_len": np.array([2]),
                 "index": np.array([0])}
  with pytest.raises(Sampled) as sampled:
    grpo_objective.GRPO(c)._rollout(run, {"trainable": trainable, "step": 0}, prompt_rows)
  assert sampled.value.args == (True,)
