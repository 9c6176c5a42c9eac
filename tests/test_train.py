"""The train step and loop: LoRA identity at init, merge/export parity with transformers and
peft, frozen leaves untouched, gradient accumulation, learning on a toy task, bad input."""

import functools
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from ftjax import config as config_lib
from ftjax import step as step_lib
from ftjax import train as train_lib
from ftjax.data import quickstart_task
from ftjax.errors import FtjaxError
from ftjax.models import llama
from ftjax.models.config import load_hf_config
from ftjax.models.hf import load_hf_params
from ftjax.models.params import flatten, get_path
from ftjax.peft.lora import LoRA
from tiny import TINY, make_model_dir, random_batch, tiny_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return make_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("data")
  quickstart_task.write_splits(str(out), n_train=96, n_eval=16, seed=3)
  return str(out)


def tiny_config(model_dir, data_dir, **overrides):
  c = config_lib.base_config()
  c.model.name_or_path = model_dir
  c.data.train = os.path.join(data_dir, "train.jsonl")
  c.data.eval = os.path.join(data_dir, "eval.jsonl")
  c.data.seq_len = 128
  c.train.steps = 60
  c.train.batch_size = 8
  c.train.lr = 1e-2
  c.train.warmup_steps = 0
  c.train.log_every = 10
  c.train.eval_every = 0
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.mesh.data = 1  # one device: the sharding tests below use the 8-device mesh explicitly
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# --- LoRA algebra ------------------------------------------------------------------------

def test_lora_with_zero_b_is_exactly_the_base_model():
  params = tiny_params()
  lora = LoRA(rank=4, alpha=8)
  adapters = lora.init(jax.random.key(1), params, TINY)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))
  base = llama.forward(params, tokens, TINY)
  adapted = llama.forward(params, tokens, TINY, adapters=adapters, plug=lora)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def test_lora_init_matches_peft_conventions():
  params = tiny_params()
  adapters = LoRA(rank=4).init(jax.random.key(0), params, TINY)
  a = np.asarray(adapters["layers"]["attn"]["q_proj"]["lora_a"])
  assert a.shape == (2, 32, 4)
  assert np.abs(a).max() <= 1 / np.sqrt(32)  # kaiming-uniform(a=sqrt(5)) bound 1/sqrt(fan_in)
  assert np.abs(a).max() > 0.5 / np.sqrt(32)
  assert not np.any(np.asarray(adapters["layers"]["mlp"]["down_proj"]["lora_b"]))
  assert set(adapters["layers"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
  assert LoRA(rank=16, alpha=32, rslora=True).scale == pytest.approx(32 / 4)


def test_target_regex_matching_nothing_lists_real_paths():
  with pytest.raises(FtjaxError, match=r"match no linear layer.*layers/attn/q_proj"):
    LoRA(targets=r".*query").init(jax.random.key(0), tiny_params(), TINY)
  only_v = LoRA(targets=("v_proj",)).init(jax.random.key(0), tiny_params(), TINY)
  assert list(only_v["layers"]["attn"]) == ["v_proj"]


def test_merge_matches_unmerged_model():
  params = tiny_params()
  lora = LoRA(rank=4, alpha=8)
  adapters = lora.init(jax.random.key(1), params, TINY)
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))
  unmerged = llama.forward(params, tokens, TINY, adapters=adapters, plug=lora)
  merged = llama.forward(lora.merge(params, adapters), tokens, TINY)
  assert rel_err(merged, unmerged) < 1e-5


# --- the step ----------------------------------------------------------------------------

def _step_fn(trainable, plug, optimizer):
  schedule = optax.constant_schedule(0.1)
  return jax.jit(functools.partial(step_lib.train_step, loss_fn=step_lib.LossFn(TINY, plug),
                                   optimizer=optimizer, schedule=schedule))


def _capture_gradient():
  """An 'optimizer' whose state is the last gradient it saw (and which never moves params):
  comparing gradients directly avoids the rounding of params + tiny update."""
  return optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


def test_remat_policies_agree_on_loss_and_gradients():
  """Remat changes what the backward pass recomputes, never the numbers (up to op order)."""
  params = tiny_params()
  plug = LoRA(rank=2, alpha=4.0)
  adapters = jax.tree.map(lambda x: x + 0.1, plug.init(jax.random.key(0), params, TINY))  # B != 0
  tree = {"base": params, "adapters": adapters}
  batch = random_batch(np.random.RandomState(0), 2, 12)

  def loss_and_grads(policy):
    loss_fn = step_lib.LossFn(TINY, plug, remat=policy)
    return jax.jit(jax.value_and_grad(lambda t: loss_fn(t, batch)["loss_sum"]))(tree)

  ref_loss, ref_grads = loss_and_grads("none")
  for policy in ("full", "dots", "dots_no_batch", "projections"):
    loss, grads = loss_and_grads(policy)
    # Same ops recomputed; only XLA's fusion and summation order may differ.
    assert rel_err(loss, ref_loss) < 1e-6, policy
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      assert rel_err(got, want) < 1e-5, policy


@pytest.mark.parametrize("method", ["lora", "full"])
def test_grad_accumulation_equals_one_big_batch(method):
  """4 micro-batches of 2 == one batch of 8: the loss and the gradient given to the optimizer."""
  params = tiny_params()
  plug = LoRA(rank=4, alpha=8) if method == "lora" else train_lib.NO_PLUG
  adapters = plug.init(jax.random.key(1), params, TINY)
  if method == "lora":  # non-zero B so that A gets gradients too
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)
  trainable, frozen = step_lib.partition({"base": params, "adapters": adapters},
                                         ["adapters/.*"] if method == "lora" else ["base/.*"])
  optimizer = _capture_gradient()
  step = _step_fn(trainable, plug, optimizer)
  state = step_lib.init_state(trainable, optimizer, 0)
  batch = random_batch(np.random.RandomState(0), 8, 16)  # uneven token counts per micro-batch
  one, m1 = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
  four, m4 = step(state, frozen, jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch))
  assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5 * float(m1["loss"])
  leaves1, leaves4 = jax.tree.leaves(one["opt_state"]), jax.tree.leaves(four["opt_state"])
  assert len(leaves1) == len(jax.tree.leaves(trainable))
  # f32 sums over tokens in a different order: relative L2 distance of the whole update.
  # (Single entries that are sums with heavy cancellation differ by up to ~2e-5 of their leaf's
  # max, which is rounding, not a normalisation error: that would be off by 10%+.)
  diff = optax.tree.norm(jax.tree.map(jnp.subtract, leaves4, leaves1))
  assert float(diff) <= 1e-5 * float(optax.tree.norm(leaves1))
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves1)


def test_mean_of_micro_batch_means_would_differ():
  """Guards the test above: the token-count weighting is what makes it pass."""
  batch = random_batch(np.random.RandomState(0), 8, 16)
  counts = batch["loss_mask"].reshape(4, -1).sum(1)
  assert len(set(counts.tolist())) > 1


def test_sharded_step_on_cpu_mesh_matches_single_device(model_dir, data_dir):
  """The same train step on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices."""
  results = {}
  for name, mesh in (("single", dict(data=1)), ("mesh", dict(data=2, fsdp=2, tensor=2))):
    c = tiny_config(model_dir, data_dir, **{f"mesh.{k}": v for k, v in mesh.items()})
    c.mesh.fsdp = mesh.get("fsdp", 1)
    c.mesh.tensor = mesh.get("tensor", 1)
    run = train_lib.setup(c)
    state, _ = train_lib.init_or_restore(run, None)
    step = jax.jit(functools.partial(step_lib.train_step, loss_fn=run.loss_fn,
                                     optimizer=run.optimizer, schedule=run.schedule))
    batch = run.train_ds.batches(8, seed=0).next_batch(8)
    batch = {k: batch[k][None] for k in step_lib.BATCH_KEYS}
    state, metrics = step(state, run.frozen, batch)
    results[name] = (state, metrics, run)
  _, _, mesh_run = results["mesh"]
  up = mesh_run.frozen["base"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(up.sharding.device_set) == 8
  assert abs(float(results["single"][1]["loss"]) - float(results["mesh"][1]["loss"])) < 1e-5
  # Compare Adam's first moment (= (1 - b1) x gradient): the parameters themselves differ more,
  # since Adam's first step maps each gradient entry to about +-lr, amplifying rounding in
  # entries near zero.
  mu_mesh = optax.tree_utils.tree_get(results["mesh"][0]["opt_state"], "mu")
  mu_single = optax.tree_utils.tree_get(results["single"][0]["opt_state"], "mu")
  diff = optax.tree.norm(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), mu_mesh, mu_single))
  assert float(diff) <= 1e-5 * float(optax.tree.norm(mu_single))


# --- whole runs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(model_dir, data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  c = tiny_config(model_dir, data_dir, **{"export.merged": True})
  before = train_lib.setup(c)
  start = train_lib.evaluate_loss(before, jax.jit(functools.partial(step_lib.eval_step, loss_fn=before.loss_fn)),
                                  before.trainable)
  summary = train_lib.train(c, workdir)
  return c, workdir, summary, start


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_drives_eval_loss_down(method, model_dir, data_dir, lora_run, tmp_path):
  if method == "lora":
    _, _, summary, start = lora_run
  else:
    c = tiny_config(model_dir, data_dir, method="full", **{"train.lr": 3e-3})
    before = train_lib.setup(c)
    start = train_lib.evaluate_loss(
        before, jax.jit(functools.partial(step_lib.eval_step, loss_fn=before.loss_fn)), before.trainable)
    summary = train_lib.train(c, str(tmp_path))
  # The answer is a JSON object in a fixed schema: most of its tokens are learnable. A random
  # init starts near ln(512) = 6.2; demand the eval loss drops by at least 40%.
  assert start["loss"] > 5.0
  assert summary["eval"]["loss"] < 0.6 * start["loss"], (start, summary["eval"])


def test_lora_run_outputs(lora_run, model_dir):
  c, workdir, summary, _ = lora_run
  for name in ("config.json", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors", "merged/config.json", "merged/model.safetensors",
               "merged/tokenizer.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines if "train/loss" in l] == [10, 20, 30, 40, 50, 60]
  assert summary["steps"] == 60 and os.path.isdir(os.path.join(workdir, "checkpoints", "60"))


def test_frozen_base_is_bit_identical_after_training(lora_run, model_dir):
  """The merged export minus the LoRA delta is exactly the base, and the restored base params of
  the run equal the files on disk."""
  c, workdir, _, _ = lora_run
  run = train_lib.setup(c, with_data=False)
  from ftjax.checkpoint import Checkpointer
  state, _ = train_lib.init_or_restore(run, Checkpointer(workdir))
  assert int(state["step"]) == 60
  original = load_hf_params(model_dir, load_hf_config(model_dir))
  for path, leaf in flatten(run.frozen["base"]):
    np.testing.assert_array_equal(np.asarray(leaf), get_path(original, path))
  # And training really changed the adapters.
  assert float(jnp.abs(state["trainable"]["adapters"]["layers"]["attn"]["q_proj"]["lora_b"]).max()) > 0


def test_merged_export_and_peft_adapter_match_ftjax(lora_run, model_dir):
  import peft
  c, workdir, _, _ = lora_run
  run = train_lib.setup(c, with_data=False)
  from ftjax.checkpoint import Checkpointer
  state, _ = train_lib.init_or_restore(run, Checkpointer(workdir))
  tree = step_lib.combine(state["trainable"], run.frozen)
  tokens = np.random.RandomState(0).randint(0, 400, (2, 16))
  ours = np.asarray(llama.forward(tree["base"], jnp.asarray(tokens), run.model_cfg,
                                  adapters=tree["adapters"], plug=run.plug))
  merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "merged")).eval()
  with torch.no_grad():
    assert rel_err(merged(torch.tensor(tokens)).logits.numpy(), ours) < 1e-5
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  with_adapter = peft.PeftModel.from_pretrained(base, os.path.join(workdir, "adapter")).eval()
  with torch.no_grad():
    assert rel_err(with_adapter(torch.tensor(tokens)).logits.numpy(), ours) < 1e-5


# --- bad input ---------------------------------------------------------------------------

def test_bad_inputs_fail_before_writing(model_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "wd")
  bad = [
      ({"data.train": str(tmp_path / "nope.jsonl")}, "nope.jsonl"),
      ({"lora.targets": r"layers/attn/query"}, "match no linear layer"),
      ({"train.batch_size": 6, "train.grad_accum": 4}, "not divisible"),
      ({"method": "prefix"}, "method='prefix'"),
  ]
  for overrides, message in bad:
    with pytest.raises(FtjaxError, match=message):
      train_lib.train(tiny_config(model_dir, data_dir, **overrides), workdir)
    assert not os.path.exists(workdir)
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"input": "a", "output": "b"}\n{"input": "a"\n')
  with pytest.raises(FtjaxError, match=r"broken.jsonl:2: not valid JSON"):
    train_lib.train(tiny_config(model_dir, data_dir, **{"data.train": str(broken)}), workdir)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(FtjaxError, match="empty"):
    train_lib.train(tiny_config(model_dir, data_dir, **{"data.train": str(empty)}), workdir)
  assert not os.path.exists(workdir)


def test_cli_config_typo_is_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ftjax.train", "--config", os.path.join(REPO, "configs", "quickstart.py"),
       "--config.trian.lr=0.1", "--workdir", str(tmp_path / "wd")],
      capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
  assert proc.returncode != 0
  assert "trian" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "wd")


def test_cli_bad_value_is_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ftjax.train", "--config", os.path.join(REPO, "configs", "quickstart.py"),
       "--config.train.schedule=wavy", "--workdir", str(tmp_path / "wd")],
      capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config: train.schedule='wavy'")
  assert "Traceback" not in proc.stderr


# --- every shipped config runs one tiny step ---------------------------------------------

@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))),
                         ids=os.path.basename)
def test_every_config_runs_one_tiny_step(path, model_dir, data_dir, tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("shipped_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.name_or_path = model_dir
  c.model.num_layers = 1
  if c.data.generate:  # generated on first run: into the test's tmp dir
    c.data.train = str(tmp_path / "gen" / "train.jsonl")
    c.data.eval = str(tmp_path / "gen" / "eval.jsonl")
  else:
    c.data.train = os.path.join(data_dir, "train.jsonl")
    c.data.eval = os.path.join(data_dir, "eval.jsonl")
  c.data.seq_len = 128
  c.train.steps = 1
  c.train.warmup_steps = 0
  c.train.batch_size = max(c.train.grad_accum, 2)
  c.train.eval_batches = 1
  c.eval.max_examples = 2
  c.eval.max_new_tokens = 4
  c.mesh.data = 1
  summary = train_lib.train(c, str(tmp_path / "wd"))
  assert summary["steps"] == 1
  assert np.isfinite(summary["eval"]["loss"])


def test_chunked_cross_entropy_matches_full():
  params = tiny_params()
  batch = random_batch(np.random.RandomState(0), 3, 10)  # 30 tokens: chunks of 8 need padding
  full = step_lib.LossFn(TINY, train_lib.NO_PLUG)
  chunked = step_lib.LossFn(TINY, train_lib.NO_PLUG, vocab_chunk=8)
  tree = {"base": params, "adapters": {}}
  a, b = full(tree, batch), chunked(tree, batch)
  for k in a:
    assert abs(float(a[k]) - float(b[k])) <= 1e-5 * max(abs(float(a[k])), 1.0), k
  ga = jax.grad(lambda p: full({"base": p}, batch)["loss_sum"])(params)
  gb = jax.grad(lambda p: chunked({"base": p}, batch)["loss_sum"])(params)
  diff = optax.tree.norm(jax.tree.map(jnp.subtract, ga, gb))
  assert float(diff) <= 1e-5 * float(optax.tree.norm(ga))


def test_unrolled_layers_match_scanned():
  params = tiny_params()
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))
  scanned = llama.forward(params, tokens, TINY)
  unrolled = llama.forward(params, tokens, TINY, unroll=True)
  assert rel_err(unrolled, scanned) < 1e-6


def test_export_cli_writes_the_trained_run(lora_run, tmp_path):
  from ftjax import export
  _, workdir, _, _ = lora_run
  export.main(["--workdir", workdir, "--merged", str(tmp_path / "m"), "--adapter", str(tmp_path / "a")])
  for name in ("m/config.json", "m/model.safetensors", "m/tokenizer.json",
               "a/adapter_config.json", "a/adapter_model.safetensors"):
    assert os.path.exists(tmp_path / name), name
  from safetensors.numpy import load_file
  again = load_file(str(tmp_path / "m" / "model.safetensors"))
  first = load_file(os.path.join(workdir, "merged", "model.safetensors"))
  assert again.keys() == first.keys()
  for key in first:
    np.testing.assert_array_equal(again[key], first[key])
  config = json.load(open(tmp_path / "a" / "adapter_config.json"))
  assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16.0
  assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                              "q_proj", "up_proj", "v_proj"]


def test_export_cli_on_a_folder_that_is_not_a_run(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ftjax.export", "--workdir", str(tmp_path)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "config.json: no such file" in proc.stderr


def test_interrupted_run_resumes_to_the_same_result(model_dir, data_dir, tmp_path, monkeypatch):
  """Stop a run right after its step-2 checkpoint, start it again: the final adapters equal those
  of an uninterrupted run (state, optimizer, RNG and data position all restored)."""
  from ftjax.checkpoint import Checkpointer
  overrides = {"train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 1,
               "lora.dropout": 0.1}  # dropout: the RNG must be restored too
  straight = train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "a"))

  class Stop(Exception):
    pass

  real_save = Checkpointer.save

  def save_then_stop(self, step, state, data_state):
    real_save(self, step, state, data_state)
    if step == 2:
      self.close()
      raise Stop

  monkeypatch.setattr(Checkpointer, "save", save_then_stop)
  with pytest.raises(Stop):
    train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "summary.json")  # not a finished run
  monkeypatch.setattr(Checkpointer, "save", real_save)
  resumed = train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "b"))
  assert resumed["steps"] == straight["steps"] == 4
  from safetensors.numpy import load_file
  a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
  b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert resumed["eval"]["loss"] == straight["eval"]["loss"]
