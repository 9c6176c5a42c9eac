"""Training objectives are plugs: the run, the step and the eval ask the objective, never its name."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax import objectives
from ftjax import run as run_lib
from ftjax import train as train_lib
from ftjax.errors import FtjaxError
from ftjax.losses import CausalLMLoss
from ftjax.objectives import SFT
from tiny import quickstart_data, run_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return quickstart_data(tmp_path_factory, n_train=16, n_eval=8)


@dataclasses.dataclass(frozen=True)
class _ScaledLoss:
  """SFT's loss times `scale`, with one extra metric: what a new objective's loss can add."""
  inner: CausalLMLoss
  scale: float

  def __call__(self, model, batch, rng=None):
    out = self.inner(model, batch, rng)
    # An extra sum (rows with a trained token); the step reports it per counted token.
    return dict(out, loss_sum=out["loss_sum"] * self.scale,
                trained_rows=(batch["loss_mask"].sum(-1) > 0).sum().astype("float32"))


class _Scaled(SFT):
  name = "scaled_sft"
  config_block = "scaled"

  def loss_fn(self, model_cfg, mesh):
    return _ScaledLoss(super().loss_fn(model_cfg, mesh), float(self.config.scaled.scale))


@pytest.fixture
def scaled_registered(monkeypatch):
  """_Scaled registered, and its block `scaled.scale` (default 3) in the config schema."""
  monkeypatch.setitem(objectives.REGISTRY, _Scaled.name, _Scaled)
  schema = config_lib.base_config

  def with_block():
    c = schema()
    with c.unlocked():
      c.scaled = ml_collections.ConfigDict({"scale": 3.0})
    return c
  monkeypatch.setattr(config_lib, "base_config", with_block)


def _config(model_dir, data_dir, **overrides):
  return run_config(model_dir, data_dir, **{"train.steps": 1, **overrides})


def test_unknown_objective_is_refused_naming_the_choices(model_dir, data_dir):
  c = run_config(model_dir, data_dir, objective="sfft")
  with pytest.raises(FtjaxError, match=r"objective='sfft'; expected one of \('sft'"):
    run_lib.setup(c)


def test_a_registered_objective_changes_the_step_and_eval_without_touching_the_loop(
    model_dir, data_dir, scaled_registered):
  """The same batch through SFT and through an objective registered from outside ftjax: the
  step's loss is the plug's (3x), its extra metric reaches the step's metrics and the eval's."""
  results = {}
  for name in ("sft", "scaled_sft"):
    run = run_lib.setup(_config(model_dir, data_dir, objective=name))
    assert type(run.objective).__name__ == ("SFT" if name == "sft" else "_Scaled")
    state, _ = run_lib.init_or_restore(run, None)
    step = run_lib.jit_train_step(run, state)
    rows = run.train_ds.batches(8, seed=0, shuffle=False).next_batch(8)
    _, metrics = step(state, run.frozen, run.place_batch(rows))
    eval_fn = jax.jit(lambda t, f, m, b, run=run: run_lib.step_lib.eval_step(
        t, f, m, b, graphdef=run.graphdef, loss_fn=run.loss_fn))
    results[name] = (jax.device_get(metrics), train_lib.evaluate_loss(run, eval_fn, run.trainable))
  (sft, sft_eval), (scaled, scaled_eval) = results["sft"], results["scaled_sft"]
  # Same params, same batch: only the loss's scale differs (f32 sums, relative 1e-6).
  np.testing.assert_allclose(scaled["loss"], 3 * sft["loss"], rtol=1e-6)
  np.testing.assert_allclose(scaled_eval["loss"], 3 * sft_eval["loss"], rtol=1e-6)
  assert "trained_rows" not in sft and "trained_rows" not in sft_eval
  assert float(scaled["trained_rows"]) > 0 and scaled_eval["trained_rows"] > 0


def test_a_changed_key_of_another_objectives_block_is_refused(model_dir, data_dir, scaled_registered):
  c = _config(model_dir, data_dir)  # objective "sft" ...
  c.scaled.scale = 5.0  # ... but a key of "scaled_sft" set
  with pytest.raises(FtjaxError, match=r"scaled.scale belong\(s\) to objective 'scaled_sft'"):
    objectives.get(c)
  c.objective = "scaled_sft"
  assert isinstance(objectives.get(c), _Scaled)


def test_sft_synthetic_batch_has_the_row_spec_shapes(model_dir, data_dir):
  c = run_config(model_dir, data_dir, **{"train.grad_accum": 2})
  batch = objectives.get(c).synthetic_batch(vocab_size=50)
  spec = objectives.get(c).row_spec()
  assert set(batch) == set(spec)
  for key, (shape, dtype) in spec.items():
    assert batch[key].shape == (2, 4) + shape and batch[key].dtype == dtype
  assert batch["inputs"].max() < 50 and (batch["loss_mask"] == 1).all()


def test_tokens_per_row_counts_both_replies_of_a_pair():
  """train/tokens_per_s and the step's FLOPs count a row's token positions: seq_len for SFT and
  classification rows, 2 x seq_len for a preference pair (chosen and rejected run through the
  model). Before, every objective counted seq_len, half of a DPO step's tokens."""
  c = config_lib.base_config()
  c.data.seq_len = 64
  assert objectives.get(c).tokens_per_row() == 64
  c.objective = "dpo"
  assert objectives.get(c).tokens_per_row() == 128
