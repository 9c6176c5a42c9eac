"""Mesh equivalence on the 8-device CPU mesh: three train steps on data=8, fsdp=8,
data=2 x fsdp=2 x tensor=2 and tensor=4 give the 1-device losses and parameters, for LoRA and
full fine-tuning, and the params, optimizer state and batch really are sharded as the rules say.

One tiny model, seq 128: each case is one setup and one compile (~4 s on 2 CPU cores)."""


import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ftjax import peft
from ftjax import run as run_lib
from ftjax.parallel import sharding
from tiny import quickstart_data, run_config

MESHES = {"data8": dict(data=8), "fsdp8": dict(fsdp=8), "2x2x2": dict(data=2, fsdp=2, tensor=2),
          "tensor4": dict(tensor=4)}

# mlp.up_proj's kernel is [layers, embed, mlp]: fsdp takes the model dim, tensor the mlp dim.
UP_PROJ_SPECS = {"data8": P(None, None, None), "fsdp8": P(None, "fsdp", None),
                 "2x2x2": P(None, "fsdp", "tensor"), "tensor4": P(None, None, "tensor")}
# LoRA's A of up_proj is [layers, embed, rank]: the rank is never split.
LORA_A_SPECS = {"data8": P(None, None, None), "fsdp8": P(None, "fsdp", None),
                "2x2x2": P(None, "fsdp", None), "tensor4": P(None, None, None)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return quickstart_data(tmp_path_factory, n_train=48, n_eval=8)


def mesh_config(model_dir, data_dir, method, data=1, fsdp=1, tensor=1):
  return run_config(model_dir, data_dir, with_eval=False, **{
      "method": method, "train.steps": 3, "train.lr": 1e-3, "mesh.data": data, "mesh.fsdp": fsdp,
      "mesh.tensor": tensor})


def three_steps(config):
  """(run, losses, final state, first batch) of three steps, batches placed as train() does."""
  run = run_lib.setup(config)
  state, _ = run_lib.init_or_restore(run, None)
  step = run_lib.jit_train_step(run, state)
  loader = run.train_ds.batches(config.train.batch_size, seed=0)
  losses, first_batch = [], None
  for _ in range(3):
    batch = run.place_batch(loader.next_batch(config.train.batch_size))
    first_batch = first_batch or batch
    state, metrics = step(state, run.frozen, batch)
    losses.append(float(metrics["loss"]))
  return run, losses, state, first_batch


@pytest.fixture(scope="module")
def single_device(model_dir, data_dir):
  out = {}
  for method in ("lora", "full"):
    _, losses, state, _ = three_steps(mesh_config(model_dir, data_dir, method))
    out[method] = losses, jax.device_get(state["trainable"])
  return out


def spec(x) -> P:
  """x's PartitionSpec with one entry per dim (a jit output drops trailing Nones)."""
  return P(*(tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))))


def check_rule_shardings(tree, axes, mesh):
  """Each array's sharding is the one its logical axes give under the rule table."""
  expected = sharding.tree_shardings(tree, axes, mesh)
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    want = expected
    for key in path:
      want = want[key.key]
    assert x.sharding.is_equivalent_to(want, x.ndim), (jax.tree_util.keystr(path), x.sharding, want)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_three_steps_on_a_mesh_equal_one_device(mesh_name, method, model_dir, data_dir, single_device):
  mesh_sizes = MESHES[mesh_name]
  run, losses, state, batch = three_steps(mesh_config(model_dir, data_dir, method, **mesh_sizes))
  mesh = run.mesh
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, **mesh_sizes}

  # --- the arrays are sharded as the rules say, read from their shardings ---
  if method == "lora":
    up = run.frozen["model"]["layers"]["mlp"]["up_proj"]["base_layer"]["kernel"]
    lora_a = state["trainable"]["model"]["layers"]["mlp"]["up_proj"]["lora_a"]
    assert spec(lora_a) == LORA_A_SPECS[mesh_name]
  else:
    up = state["trainable"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert spec(up) == UP_PROJ_SPECS[mesh_name]
  shard_shape = [n // (mesh.shape[a] if a else 1) for n, a in zip(up.shape, spec(up))]
  assert {s.data.shape for s in up.addressable_shards} == {tuple(shard_shape)}
  assert len(up.sharding.device_set) == mesh.size
  model = run.model()
  _, train_vars, frozen_vars = nnx.split(
      model, peft.trainable(model) if run.peft_configs else nnx.Param, nnx.Param)
  check_rule_shardings(state["trainable"], sharding.logical_axes(train_vars), mesh)
  check_rule_shardings(run.frozen, sharding.logical_axes(frozen_vars), mesh)
  # Adam's moments are sharded like the params they belong to.
  for moment in ("mu", "nu"):
    tree = optax.tree_utils.tree_get(state["opt_state"], moment)
    for m, p in zip(jax.tree.leaves(tree), jax.tree.leaves(state["trainable"])):
      assert m.sharding == p.sharding
  # The batch [accum, micro, seq]: micro-batch rows split over data x fsdp, one slice per device.
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  for x in batch.values():
    assert spec(x) == P(None, ("data", "fsdp"), None)
    assert {s.data.shape for s in x.addressable_shards} == {(1, 8 // data_parallel, 128)}

  # --- the same numbers as one device ---
  # Losses: 1e-5 relative (measured <= 4e-7: only the reduction order differs). Parameters: the
  # norm of each array's difference over its norm, 1e-5 (measured <= 1.1e-6). Not elementwise:
  # Adam maps a gradient entry near zero to about +-lr, amplifying rounding in those entries
  # (elementwise up to 4e-5 of the array's largest value).
  want_losses, want_params = single_device[method]
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  got = jax.device_get(state["trainable"])
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    b = want_params
    for key in path:
      b = b[key.key]
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)
