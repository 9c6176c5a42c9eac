"""The cost plan (ftjax/cost.py): a probe of the real compiled step and the plan's arithmetic."""

import math
import os

import jax
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax import cost, cost_plan
from ftjax.data import quickstart_task, selection
from ftjax.data import report as data_report
from ftjax.errors import FtjaxError
from ftjax.flops import train_flops_per_token
from ftjax.models.config import load_hf_config
from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def config(model_dir, tmp_path_factory):
  data = str(tmp_path_factory.mktemp("cost_data"))
  quickstart_task.write_splits(data, n_train=40, n_eval=8, seed=1)
  c = config_lib.base_config()
  c.model.name_or_path = model_dir
  c.data.train = os.path.join(data, "train.jsonl")
  c.data.eval = os.path.join(data, "eval.jsonl")
  c.data.seq_len = 64
  c.train.steps, c.train.warmup_steps = 25, 0
  c.cost.probe_steps = 2
  return c


@pytest.fixture(scope="module")
def probed(config):
  return cost.probe(config, config.cost.probe_steps)


def test_probe_measures_the_real_step(probed, config, model_dir):
  assert probed["steps"] == 2 and len(probed["step_s_all"]) == 2
  assert probed["step_s"] > 0 and probed["compile_s"] > 0
  # LoRA r=8 on all 7 linear layers of 2 layers (d=64, q 64, kv 32, ffn 128): (in + out) * 8 each
  per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
  assert probed["trainable_params"] == 2 * per_layer
  mem = probed["memory"]
  # the frozen base and the LoRA state are arguments of the step: at least their bytes
  assert mem["arguments"] >= probed["weight_bytes"] > 0
  assert mem["step"] == mem["arguments"] + mem["outputs"] + mem["temporaries"] - mem["donated"]


def test_plan_arithmetic(probed, config, tmp_path):
  report, _ = selection.check(config, tiny_tokenizer())
  train = report["splits"]["train"]
  plan = cost_plan.plan(config, train, probed)
  epochs = 25 * 8 / train["rows"]
  assert plan["epochs"] == pytest.approx(epochs, abs=1e-3)
  assert plan["tokens_total"] == round(train["tokens"] * epochs)
  assert plan["trained_tokens_total"] == round(train["trained_tokens"] * epochs)
  assert plan["api"]["usd"] == pytest.approx(train["tokens"] * epochs / 1e6 * 25.0, abs=0.01)
  assert plan["here"]["train_s"] == pytest.approx(25 * probed["step_s"])
  flops = 25 * 8 * 64 * probed["flops_per_token"]
  assert plan["flops_total"] == pytest.approx(flops)
  a100 = plan["accelerators"]["A100"]
  assert a100["train_s"] == pytest.approx(flops / (312e12 * 0.35))
  assert a100["usd"] == pytest.approx(a100["train_s"] / 3600 * 2.0)
  mem = plan["memory"]
  step = probed["memory"]
  assert mem["peak_bytes"] >= mem["compiled_rss_bytes"] + step["temporaries"] > mem["base_rss_bytes"]
  assert mem["fits"] is True  # a 120k-param model fits this machine
  text = data_report.summary_text(dict(report, cost=plan))
  assert "cost plan: 25 steps" in text and "hosted API at $25/M tokens" in text


def test_prices_and_mfu_come_from_the_config(probed, config):
  c = config.copy_and_resolve_references()
  c.cost.usd_per_hour.H100, c.cost.mfu, c.cost.api_usd_per_million_tokens = 6.0, 0.5, 3.0
  stats = {"rows": 50, "tokens": 2_000_000, "trained_tokens": 500_000}
  plan = cost_plan.plan(c, stats, probed)
  h100 = plan["accelerators"]["H100"]
  assert h100["train_s"] == pytest.approx(plan["flops_total"] / (989e12 * 0.5))
  assert h100["usd"] == pytest.approx(h100["train_s"] / 3600 * 6.0)
  assert plan["api"]["usd"] == pytest.approx(2.0 * 25 * 8 / 50 * 3.0, abs=0.01)


def test_without_probe_only_tokens_and_api(config):
  plan = cost_plan.plan(config, {"rows": 10, "tokens": 1000, "trained_tokens": 400}, None)
  assert plan["epochs"] == 20.0 and plan["tokens_total"] == 20_000
  assert "here" not in plan and "memory" not in plan and "not probed" in plan["probe"]


@pytest.mark.parametrize("key,value", [("mfu", 0.0), ("mfu", 1.5), ("probe_steps", -1)])
def test_cost_config_validated(config, key, value):
  c = config_lib.base_config()
  c.data.train = "x.jsonl"
  c.cost[key] = value
  with pytest.raises(FtjaxError, match=f"cost.{key}"):
    config_lib.validate(c)


def dot_flops(jaxpr) -> int:
  """2 x (output size) x (contracted size) summed over every dot_general the program runs:
  scan bodies times their length, the costlier branch of a cond, every nested call."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    subs = [getattr(v, "jaxpr", v) for v in eqn.params.values()
            if isinstance(v, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))]
    if eqn.primitive.name == "cond":
      total += max(dot_flops(b.jaxpr) for b in eqn.params["branches"])
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    total += times * sum(dot_flops(sub) for sub in subs)
  return total


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_flops_per_token_against_the_step_s_own_matmuls(config, method):
  """The cost plan's FLOPs per token against an independent count: the matmul FLOPs of the
  traced train step itself (remat off, so no recomputation). The one known difference: the xla
  attention computes the whole causal row (the masked half too), which the formula halves; with
  that half added back the two agree exactly (1e-9: float rounding of the formula's divisions).
  main's formula, which counted the prefix/prompt tables as matmul weights and no virtual
  tokens, was 2.8% low for prefix tuning (20 keys) and 17% low for prompt tuning (20 positions).
  Elementwise work (norms, softmax, the optimizer) is in neither count."""
  from ftjax import run as run_lib
  c = config.copy_and_resolve_references()
  c.model.remat, c.method = "none", method
  run = run_lib.setup(c, with_data=False)
  state, _ = run_lib.init_or_restore(run, None)
  batch = run.objective.synthetic_batch(run.model_cfg.vocab_size)
  traced = run_lib.jit_train_step(run, state).trace(state, run.frozen, batch)
  measured = dot_flops(traced.jaxpr.jaxpr)
  m, seq = run.model_cfg, c.data.seq_len
  row = seq + (c.prompt.num_virtual_tokens if method == "prompt" else 0)
  masked_half = 3 * m.num_layers * 4 * m.q_size * row * row / 2 / seq  # per trained token
  predicted = batch["inputs"].size * (cost.model_facts(run, state)["flops_per_token"] + masked_half)
  assert predicted == pytest.approx(measured, rel=1e-9)
