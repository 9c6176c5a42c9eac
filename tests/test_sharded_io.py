"""Loading straight onto a mesh (safetensors and GGUF, float and 4-bit) and the streamed,
size-split HF export from sharded arrays, checked against the host load and transformers."""

import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
from ftjax import models
from ftjax.models.config import load_hf_config
from ftjax.models.gguf import load_gguf
from ftjax.models.hf import load_hf_params
from ftjax.models.params import param_specs
from ftjax.tree import flatten, get_path
from ftjax.models.sharded import collect_mesh_sinks, mesh_sinks
from ftjax.parallel import sharding
from test_gguf import write_gguf


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(1, 4, 2)  # fsdp x tensor: every rule of the table is exercised


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  return write_gguf(hf_models.build("llama"), path, "llama", quant=gguf.GGMLQuantizationType.Q8_0)


def _load(path, dtype, allocate=None):
  if path.endswith(".gguf"):
    return load_gguf(path, dtype, allocate)
  cfg = load_hf_config(path)
  return cfg, load_hf_params(path, cfg, dtype, allocate)


@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_params_load_sharded_in_storage_dtype(hf_llama_dir, tiny_gguf, mesh, source):
  """Each param is created on the mesh with the sharding its logical axes give, in the storage
  dtype, and holds exactly what the host load reads."""
  path = hf_llama_dir if source == "safetensors" else tiny_gguf
  cfg, host = _load(path, jnp.bfloat16)
  _, placed = _load(path, jnp.bfloat16, mesh_sinks(mesh))
  placed = collect_mesh_sinks(placed)
  for spec in param_specs(cfg):
    array = get_path(placed, spec.path)
    assert isinstance(array, jax.Array) and array.dtype == jnp.bfloat16, spec.path
    assert array.sharding.spec == sharding.logical_to_spec(spec.axes, spec.shape, mesh), spec.path
    np.testing.assert_array_equal(np.asarray(array), get_path(host, spec.path), err_msg=spec.path)
  up = get_path(placed, "model/layers/mlp/up_proj/kernel")
  assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // 4, up.shape[2] // 2)


def test_4bit_kernels_still_quantise_while_loading_onto_a_mesh(model_dir, mesh):
  settings = dict(quant_type="nf4")
  _, host, _, _ = models.resolve_params(model_dir, quantize=settings)
  _, placed, _, transform = models.resolve_params(model_dir, quantize=settings, mesh=mesh)
  assert transform is not None
  codes = get_path(placed, "model/layers/mlp/up_proj/codes")
  assert codes.dtype == np.uint8
  for path, value in flatten(host):
    np.testing.assert_array_equal(np.asarray(get_path(placed, path)), value, err_msg=path)
  assert isinstance(get_path(placed, "model/norm/scale"), jax.Array)  # floats on the mesh


def test_streamed_export_is_split_by_size_and_loads_in_transformers(model_dir, mesh, tmp_path,
                                                                   monkeypatch):
  """A model sharded over 8 devices is written in files of at most 64 KiB (one tensor larger
  than that gets a file alone) with transformers' index, without gathering the tree; the
  result gives transformers' logits of the original checkpoint within 1e-5 (f32 round trip)."""
  model, tokenizer = models.load(model_dir, mesh=mesh)
  monkeypatch.setattr(jax, "device_get", lambda *_: pytest.fail("gathered the tree"))
  limit = 64 * 1024
  models.save_pretrained(model, str(tmp_path / "out"), tokenizer, max_shard_size=f"{limit}B")
  monkeypatch.undo()
  with open(tmp_path / "out" / "model.safetensors.index.json") as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert sorted(os.listdir(tmp_path / "out")) == sorted(
      files + ["config.json", "model.safetensors.index.json"] + [
          f for f in os.listdir(tmp_path / "out") if f.startswith(("tokenizer", "special", "chat"))]
      + (["generation_config.json"] if os.path.exists(os.path.join(model_dir, "generation_config.json")) else []))
  from safetensors import safe_open
  total = 0
  for name in files:
    with safe_open(str(tmp_path / "out" / name), framework="np") as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    assert sum(sizes) <= limit or len(sizes) == 1, name
    total += sum(sizes)
  assert index["metadata"]["total_size"] == total
  cfg = model.config
  assert set(index["weight_map"]) == {n for s in param_specs(cfg) for n in s.hf_names(cfg.num_layers)}

  tokens = torch.tensor(np.arange(12)[None] % cfg.vocab_size)
  with torch.no_grad():
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(tokens).logits.numpy()
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()(tokens).logits.numpy()
  assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
