"""A run is built by one path (ftjax/run.py): the notebooks' model is the run's model, and the
plan refuses what setup refuses, in the same words."""

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax import notebook
from ftjax import plan as plan_lib
from ftjax import run as run_lib
from ftjax.errors import FtjaxError
from tiny import run_config


def test_the_notebook_model_is_the_runs_base_model(model_dir):
  """notebook.load_model and run.setup load through run.load_model: the same layers (cut to
  model.num_layers), storage dtype and values, bit for bit."""
  config = run_config(model_dir, "/nonexistent", method="full",
                      **{"model.num_layers": 1, "model.param_dtype": "bfloat16",
                         "model.trainable_dtype": "bfloat16"})
  model, _ = notebook.load_model(config)
  run = run_lib.setup(config, with_data=False)
  assert model.config.num_layers == run.model_cfg.num_layers == 1
  ours = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  theirs = nnx.to_pure_dict(nnx.state(run.model(), nnx.Param))
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.dtype == b.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_setup_and_the_plan_refuse_a_micro_batch_the_mesh_cannot_split_alike(model_dir):
  """One check (run.micro_batch): a micro-batch of 1 row over 2 data-parallel devices."""
  config = run_config(model_dir, "/nonexistent", **{"train.grad_accum": 8, "mesh.data": 2})
  messages = []
  for build in (lambda: run_lib.setup(config, with_data=False),
                lambda: plan_lib.abstract_run(config)):
    with pytest.raises(FtjaxError, match="micro-batch 1 .* divisible by the 2 data-parallel") as e:
      build()
    messages.append(str(e.value))
  assert messages[0] == messages[1]


def _saved_adapter(model_dir, tmp_path, rank: int = 4):
  """A LoRA adapter with non-zero B (a trained one's shape and scale), saved in HF PEFT format
  by a run of the tiny model; -> (its directory, the run)."""
  from ftjax import peft
  config = run_config(model_dir, "/nonexistent", **{"lora.rank": rank, "lora.alpha": 8.0})
  run = run_lib.setup(config, with_data=False)
  model = run.model()
  rng = np.random.RandomState(1)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, peft.LoraParam) and path[-1] == "lora_b":
      var.value = np.asarray(0.05 * rng.randn(*var.value.shape), var.value.dtype)
  peft.save_adapter(model, str(tmp_path / "adapter"))
  return str(tmp_path / "adapter"), model


def test_model_adapter_continues_a_saved_adapter_or_folds_it_into_the_base(model_dir, tmp_path):
  """model.adapter: the run's adapter starts from the saved tensors (continue), or the saved
  adapter is folded into the base and a new one starts at zero (merge): either way the run's
  model at step 0 computes what the saved adapter's model computes (f32, 1e-5: a merged kernel
  W + s·BA rounds once more than the unmerged sum). A rank that differs is refused by name."""
  adapter, saved_model = _saved_adapter(model_dir, tmp_path)
  tokens = np.arange(1, 17, dtype=np.int32)[None] % 50
  want = np.asarray(saved_model(tokens))
  fresh = run_lib.setup(run_config(model_dir, "/nonexistent", **{"lora.rank": 4}), with_data=False)
  assert np.abs(np.asarray(fresh.model()(tokens)) - want).max() > 1e-3  # the adapter matters
  for merge in (False, True):
    config = run_config(model_dir, "/nonexistent", **{"lora.rank": 4, "lora.alpha": 8.0,
                                                      "model.adapter": adapter,
                                                      "model.adapter_merge": merge})
    run = run_lib.setup(config, with_data=False)
    np.testing.assert_allclose(np.asarray(run.model()(tokens)), want, atol=1e-5, rtol=1e-5)
  config = run_config(model_dir, "/nonexistent", **{"lora.rank": 2, "lora.alpha": 8.0,
                                                    "model.adapter": adapter})
  with pytest.raises(FtjaxError, match=r"adapter: r=4 in its adapter_config.json, 2 in this run"):
    run_lib.setup(config, with_data=False)
