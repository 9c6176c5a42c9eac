"""ftjax.plan: the abstract plan against the real run it stands for (same shapes, shardings and
compiled program), published model shapes, the knobs, and the command line."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE
from ftjax import config as config_lib
from ftjax import losses
from ftjax import plan as plan_lib
from ftjax import run as run_lib
from ftjax.errors import FtjaxError
from ftjax.parallel import sharding
from tiny import quickstart_data, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return quickstart_data(tmp_path_factory, n_train=32, n_eval=8)


def tiny_config(model_dir, data_dir, **changes):
  c = run_config(model_dir, data_dir, with_eval=False, **{"mesh.fsdp": 4, "mesh.tensor": 2})
  return plan_lib.with_changes(c, changes)


def _structs(tree):
  return jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype).name, x.sharding.spec), tree)


def test_plan_is_the_real_runs_step(model_dir, data_dir):
  """The abstract state has exactly the shapes, dtypes and shardings `run.setup` gives the
  loaded model (a 4-bit base's codes and statistics included), and the step lowered from it is
  the real step's program, text for text: the plan is of the program that will run."""
  config = tiny_config(model_dir, data_dir, method="qlora")
  abstract, abstract_state, batch = plan_lib.abstract_run(config)
  run = run_lib.setup(config)
  state, _ = run_lib.init_or_restore(run, None)
  assert _structs(abstract.frozen) == _structs(run.frozen)
  assert _structs(abstract_state) == _structs(state)

  # The same program: the real step lowers to the very text the plan compiles.
  real = run_lib.jit_train_step(run, state).lower(state, run.frozen, batch).as_text()
  planned = run_lib.jit_train_step(abstract, abstract_state).lower(
      abstract_state, abstract.frozen, batch).as_text()
  assert real == planned
  result = plan_lib.plan_of(abstract, abstract_state, batch)
  held = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)  # noqa: E731
                          for s in x.addressable_shards[:1])
  assert result.params == held(run.frozen)  # device 0's shards; a quarter or less of the tree
  float_bytes = 4 * abstract.model_cfg.num_params()
  assert result.params < float_bytes / 4  # 4-bit kernels, and sharded over fsdp x tensor
  assert result.adapters == held(state["trainable"])
  assert result.optimizer == held(state["opt_state"])
  assert result.total > result.params + result.adapters + result.optimizer + result.temporaries


def test_known_models_have_their_published_sizes():
  """Parameter counts of the published checkpoints (8,030,261,248 and 70,553,706,496)."""
  assert plan_lib.model_config("llama-3-8b").num_params() == 8_030_261_248
  assert plan_lib.model_config("meta-llama/Meta-Llama-3-70B-Instruct").num_params() == 70_553_706_496


def test_fsdp_gathers_weights_per_layer_and_knobs_lower_the_plan(model_dir, data_dir):
  """On fsdp=8 the compiled step all-gathers one layer's kernel at a time ([64, 128], not the
  [2, 64, 128] stack) and never the activations' 8 x 128 tokens (what XLA chose before the
  activations were pinned to the batch axes). Then suggest() offers remat first when it is
  off, plans it for real, and stops at a fit."""
  config = tiny_config(model_dir, data_dir, **{"model.remat": "none", "mesh.fsdp": 8,
                                               "mesh.tensor": 1})
  base = plan_lib.plan(config)
  gathered = set(re.findall(r"= \w+\[([\d,]+)\][^\n]*? all-gather\(", base.compiled.as_text()))
  assert "64,128" in gathered and "2,64,128" not in gathered, gathered
  assert not any(shape.startswith("1024,") for shape in gathered), gathered
  assert [k for _, k in plan_lib.knobs(config)][0] == {"model.remat": "full"}
  lines = []
  found = plan_lib.suggest(config, None, report=lines.append, usable=base.total - 1)
  (what, result), = found  # the first knob fits, so no other is planned
  assert what.startswith("remat") and result.temporaries < base.temporaries
  assert result.total <= base.total - 1 and lines == [f"  {what}: {result.total / 2**30:.2f} GiB "
                                                      "per device -> fits"]


def test_vocab_chunk_is_on_where_the_logits_would_not_fit():
  """train.vocab_chunk=0 (auto): Llama 3's 128k vocab at 8 x 2048 tokens on fsdp=8 (1 GiB of
  f32 logits per device) is chunked; SmolLM2's quickstart (400 MiB on one device) is not."""
  mesh = sharding.make_mesh(1, 8, 1)
  c = config_lib.base_config()
  c.train.batch_size, c.data.seq_len = 8, 2048
  llama = plan_lib.model_config("llama-3-8b")
  chunk = losses.vocab_chunk(c, llama, mesh)
  assert 0 < chunk < 2048 and 2048 % chunk == 0 and chunk * llama.vocab_size * 4 <= losses.LOGITS_BUDGET_BYTES // 4
  smol = llama.replace(vocab_size=49152)
  c.data.seq_len = 256
  assert losses.vocab_chunk(c, smol, mesh) == 0
  c.train.vocab_chunk = -1
  assert losses.vocab_chunk(c, llama, mesh) == 0
  c.train.vocab_chunk = 64
  assert losses.vocab_chunk(c, smol, mesh) == 64


def test_a_hub_id_reads_only_its_config(monkeypatch):
  """Offline here: the Hub is asked for config.json alone, and its failure is one FtjaxError."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FtjaxError, match="someorg/somemodel: could not fetch its config.json"):
    plan_lib.model_config("someorg/somemodel")


def test_bad_mesh_and_device_are_errors(capsys):
  with pytest.raises(FtjaxError, match="--mesh"):
    plan_lib.parse_mesh("data=1,pipeline=2")
  with pytest.raises(SystemExit) as exit_:
    plan_lib._main(["plan"], {}, None, "tpu9", True)
  assert exit_.value.code == 2 and "--device 'tpu9'; known: v5e" in capsys.readouterr().err


def test_cli_prints_the_plan_and_the_fit(model_dir, data_dir, tmp_path):
  config_file = tmp_path / "plan_config.py"
  config_file.write_text(
      "from ftjax.config import base_config\n\n"
      "def get_config():\n"
      "  c = base_config()\n"
      f"  c.model.name_or_path = {model_dir!r}\n"
      f"  c.data.train = {os.path.join(data_dir, 'train.jsonl')!r}\n"
      "  c.data.seq_len = 128\n"
      "  return c\n")
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")  # the CLI sets the device count
  cmd = [sys.executable, "-m", "ftjax.plan", "--config", str(config_file),
         "--mesh", "data=2,fsdp=4", "--device", "v5e"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "mesh data=2, fsdp=4, tensor=1" in out.stdout
  assert "total per device" in out.stdout and "v5e: 16 GiB HBM" in out.stdout
  assert "-> FITS" in out.stdout
