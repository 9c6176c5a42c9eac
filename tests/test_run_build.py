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
