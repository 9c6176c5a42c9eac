"""Whole training runs: sharding on a CPU mesh, learning, outputs and exports vs transformers and
peft, the frozen base in memory, resume, non-finite steps, bad input, every shipped config."""

import functools
import glob
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import run as run_lib
from ftjax import step as step_lib
from ftjax.data import packing
from ftjax import train as train_lib
from ftjax.checkpoint import Checkpointer
from ftjax.errors import FtjaxError
from ftjax.models.config import load_hf_config
from ftjax.models.hf import load_hf_params
from ftjax.tree import flatten, get_path
from tiny import quickstart_data, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return quickstart_data(tmp_path_factory, n_train=96, n_eval=16)


def tiny_config(model_dir, data_dir, **overrides):
  return run_config(model_dir, data_dir, **{"train.steps": 60, "train.lr": 1e-2, "train.log_every": 10,
                                            "lora.rank": 8, "lora.alpha": 16.0, **overrides})


# --- sharding ------------------------------------------------------------------------------

def test_qlora_codes_shard_like_the_float_kernel(model_dir, data_dir):
  """The 4-bit codes [layers, out, in / 2] carry the float kernel's logical axes, so the rules
  shard them as they shard the kernel [layers, in, out]; the step gives the single-device loss."""
  losses = {}
  for name, mesh in (("single", dict(data=1)), ("mesh", dict(data=2, fsdp=2, tensor=2))):
    c = tiny_config(model_dir, data_dir, method="qlora", **{f"mesh.{k}": v for k, v in mesh.items()})
    run = run_lib.setup(c)
    state, _ = run_lib.init_or_restore(run, None)
    step = run_lib.jit_train_step(run, state)
    batch = run.train_ds.batches(8, seed=0).next_batch(8)
    state, metrics = step(state, run.frozen, {k: batch[k][None] for k in packing.FIELDS})
    losses[name] = float(metrics["loss"])
  up = run.frozen["model"]["layers"]["mlp"]["up_proj"]["base_layer"]
  assert up["codes"].dtype == np.uint8
  assert up["codes"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  assert abs(losses["single"] - losses["mesh"]) < 1e-5


# --- whole runs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(model_dir, data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  # Norms trained whole beside LoRA (modules_to_save): they must reach both exports.
  c = tiny_config(model_dir, data_dir, **{"export.merged": True, "modules_to_save": "norm"})
  summary = train_lib.train(c, workdir)
  return c, workdir, summary, initial_eval_loss(c)


def initial_eval_loss(config) -> dict:
  run = run_lib.setup(config)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=run.graphdef, loss_fn=run.loss_fn))
  return train_lib.evaluate_loss(run, eval_fn, run.trainable)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_drives_eval_loss_down(method, model_dir, data_dir, lora_run, tmp_path):
  if method == "lora":
    _, _, summary, start = lora_run
  else:
    c = tiny_config(model_dir, data_dir, method="full", **{"train.lr": 3e-3})
    start = initial_eval_loss(c)
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


def test_frozen_base_is_bit_identical_in_memory_after_training(model_dir, data_dir):
  """Real train steps (the run's jitted, donating step): every frozen array is bit-for-bit what
  it was, and what the files on disk hold; the adapters did change."""
  run = run_lib.setup(tiny_config(model_dir, data_dir))
  before = jax.tree.map(np.array, run.frozen)  # copies
  state, _ = run_lib.init_or_restore(run, None)
  step = run_lib.jit_train_step(run, state)
  loader = run.train_ds.batches(8, seed=0)
  for _ in range(3):
    rows = loader.next_batch(8)
    state, metrics = step(state, run.frozen, {k: rows[k][None] for k in packing.FIELDS})
  assert bool(metrics["finite"])
  files = load_hf_params(model_dir, load_hf_config(model_dir))
  for path, leaf in flatten(run.frozen):
    np.testing.assert_array_equal(np.asarray(leaf), get_path(before, path), err_msg=path)
    np.testing.assert_array_equal(np.asarray(leaf), get_path(files, path.replace("/base_layer", "")),
                                  err_msg=path)
  lora_b = state["trainable"]["model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
  assert float(jnp.abs(lora_b).max()) > 0


def test_merged_export_and_peft_adapter_match_ftjax(lora_run, model_dir):
  import peft as hf_peft
  c, workdir, _, _ = lora_run
  run = run_lib.setup(c, with_data=False)
  state, _ = run_lib.init_or_restore(run, Checkpointer(workdir))
  tokens = np.random.RandomState(0).randint(0, 400, (2, 16))
  ours = np.asarray(run.model(state["trainable"])(jnp.asarray(tokens)))
  merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "merged")).eval()
  with torch.no_grad():
    assert rel_err(merged(torch.tensor(tokens)).logits.numpy(), ours) < 1e-5
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  with_adapter = hf_peft.PeftModel.from_pretrained(base, os.path.join(workdir, "adapter")).eval()
  with torch.no_grad():
    assert rel_err(with_adapter(torch.tensor(tokens)).logits.numpy(), ours) < 1e-5
  # The norms trained (modules_to_save) and travelled in the adapter file.
  from safetensors.numpy import load_file
  keys = load_file(os.path.join(workdir, "adapter", "adapter_model.safetensors"))
  assert "base_model.model.model.norm.weight" in keys
  assert "base_model.model.model.layers.1.post_attention_layernorm.weight" in keys
  trained = state["trainable"]["model"]["norm"]["trained"]["scale"]
  assert not np.array_equal(np.asarray(trained), np.asarray(run.frozen["model"]["norm"]["base_layer"]["scale"]))


# --- bad input ---------------------------------------------------------------------------

def test_bad_inputs_fail_before_writing(model_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "wd")
  bad = [
      ({"data.train": str(tmp_path / "nope.jsonl")}, "nope.jsonl"),
      ({"lora.targets": r".*query"}, "match no module"),
      ({"train.batch_size": 6, "train.grad_accum": 4}, "not divisible"),
      ({"method": "bitfit"}, "method='bitfit'"),
      ({"method": "prompt", "export.merged": True}, "export.merged: a prompt adapter has no merged form"),
      ({"method": "prompt", "modules_to_save": "norm"}, "modules_to_save goes with method lora"),
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
  elif c.objective == "classification":  # labelled texts: the quickstart inputs, two classes
    for split in ("train", "eval"):
      with open(os.path.join(data_dir, f"{split}.jsonl")) as f, open(tmp_path / f"{split}.jsonl", "w") as out:
        for i, line in enumerate(f):
          out.write(json.dumps({"text": json.loads(line)["input"], "label": "ab"[i % 2]}) + "\n")
      c.data[split] = str(tmp_path / f"{split}.jsonl")
  else:
    c.data.train = os.path.join(data_dir, "train.jsonl")
    c.data.eval = os.path.join(data_dir, "eval.jsonl")
  c.data.seq_len = 128
  c.train.steps = 1
  c.train.warmup_steps = 0
  # GRPO's batch counts completions: one prompt's group of num_generations
  c.train.batch_size = c.grpo.num_generations if c.objective == "grpo" else max(c.train.grad_accum, 2)
  c.train.eval_batches = 1
  c.eval.max_examples = 2
  c.eval.max_new_tokens = 4
  c.eval.forgetting = False  # the same probe for every config, tested in test_evaluate
  c.mesh.data = 1
  summary = train_lib.train(c, str(tmp_path / "wd"))
  assert summary["steps"] == 1
  if c.objective == "grpo":  # scored by rewards, no eval loss
    assert np.isfinite(summary["reward_eval"]["tuned"]["reward"])
  else:
    assert np.isfinite(summary["eval"]["loss"])


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


def test_export_cli_writes_a_gguf_of_the_merged_run(lora_run, tmp_path, capsys):
  """`--gguf f32`: the trained run's merged model as one GGUF file that ftjax's GGUF reader
  loads to the merged HF export's weights exactly (f32 stores them as they are); an existing
  file at a path of the user's is replaced only with --overwrite."""
  from ftjax import export
  from ftjax.models import from_params, load
  from ftjax.models.gguf import load_gguf
  _, workdir, _, _ = lora_run
  out = str(tmp_path / "g" / "run.gguf")
  export.main(["--workdir", workdir, "--no-merged", "--no-adapter", "--gguf", "f32", "--gguf-out", out])
  assert sorted(os.listdir(tmp_path / "g")) == ["Modelfile", "run.gguf"]
  cfg, params = load_gguf(out)
  merged, _ = load(os.path.join(workdir, "merged"))
  ids = jnp.arange(1, 13)[None]
  np.testing.assert_allclose(np.asarray(from_params(cfg, params)(ids)), np.asarray(merged(ids)),
                             rtol=1e-5, atol=1e-5)  # f32 both: only summation order may differ
  before = open(out, "rb").read()
  with pytest.raises(SystemExit) as exit_info:  # refused before anything is restored
    export.main(["--workdir", workdir, "--no-merged", "--no-adapter", "--gguf", "f16", "--gguf-out", out])
  assert exit_info.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
  assert open(out, "rb").read() == before


def test_export_does_not_import_the_train_loop():
  """export.py and train.py share ftjax/run.py; neither imports the other's module back."""
  code = "import sys, ftjax.export; assert 'ftjax.train' not in sys.modules, 'cycle'"
  assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_export_cli_on_a_folder_that_is_not_a_run(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ftjax.export", "--workdir", str(tmp_path)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "config.json: no such file" in proc.stderr


def test_interrupted_run_resumes_to_the_same_result(model_dir, data_dir, tmp_path, monkeypatch,
                                                   caplog):
  """Crash a run after it logged step 3 (its last checkpoint: step 2), start it again: it
  resumes from step 2 without running steps 1-2 again, the final adapters equal an uninterrupted
  run's (state, optimizer, RNG and data position restored), and metrics.jsonl has every step
  once."""
  from ftjax.metrics import MetricWriter
  overrides = {"train.steps": 6, "train.checkpoint_every": 2, "train.log_every": 1,
               "lora.dropout": 0.1}  # dropout: the RNG must be restored too
  straight = train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "a"))

  class Crash(Exception):
    pass

  real_write = MetricWriter.write
  crash_at = [1, 3]  # first before any checkpoint (the restart starts over), then after step 2's

  def write_then_crash(self, step, metrics, prefix=""):
    real_write(self, step, metrics, prefix)
    if step == crash_at[0]:
      raise Crash

  monkeypatch.setattr(MetricWriter, "write", write_then_crash)
  with pytest.raises(Crash):
    train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "b"))
  assert Checkpointer(str(tmp_path / "b")).latest_step() is None
  crash_at.pop(0)
  with pytest.raises(Crash):
    train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "summary.json")  # not a finished run
  assert Checkpointer(str(tmp_path / "b")).latest_step() == 2
  monkeypatch.setattr(MetricWriter, "write", real_write)
  with caplog.at_level(logging.INFO, logger="ftjax.train"):
    resumed = train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "b"))
  assert resumed["steps"] == straight["steps"] == 6
  # Deterministic runs end equal whether resumed or rerun from step 0: the restore itself shows.
  assert straight["resumed_from_step"] is None and resumed["resumed_from_step"] == 2
  # a local model folder has no Hub revision or wheel digest to record
  assert straight["model_source"] is None
  assert "resumed from step 2: steps 1..2 are not run again" in caplog.messages
  # metrics.jsonl: steps 1-2 logged by the crashed run, before the resume row; 3-6 after it.
  rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
  marks = [i for i, row in enumerate(rows) if "resumed_from_step" in row]
  assert [rows[i] for i in marks] == [{"step": 2, "resumed_from_step": 2.0}]
  assert [r["step"] for r in rows[:marks[0]] if "train/loss" in r] == [1, 2]
  assert [r["step"] for r in rows[marks[0]:] if "train/loss" in r] == [3, 4, 5, 6]
  from safetensors.numpy import load_file
  a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
  b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert resumed["eval"]["loss"] == straight["eval"]["loss"]
  lines = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
  assert [l["step"] for l in lines if "train/loss" in l] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_config_unless_allowed(model_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "wd")
  train_lib.train(tiny_config(model_dir, data_dir, **{"train.steps": 2}), workdir)
  # A workdir written before a config key existed resumes: the missing key meant its default.
  config_path = os.path.join(workdir, "config.json")
  saved = json.load(open(config_path))
  older = {k: v for k, v in saved.items() if k != "quant"}
  older["data"] = {k: v for k, v in saved["data"].items() if k != "check"}
  json.dump(older, open(tmp_path / "older.json", "w"))
  train_lib.check_resume_config(str(tmp_path / "older.json"),
                                tiny_config(model_dir, data_dir, **{"train.steps": 2}), False)
  changed = tiny_config(model_dir, data_dir, **{"train.steps": 4, "lora.rank": 4})
  with pytest.raises(FtjaxError, match=r"lora.rank: 8 -> 4, train.steps: 2 -> 4.*--allow_config_change"):
    train_lib.train(changed, workdir)
  # Logging / eval / export keys may change freely; a longer schedule only when allowed.
  longer = tiny_config(model_dir, data_dir, **{"train.steps": 4, "train.log_every": 1})
  with pytest.raises(FtjaxError, match=r"train.steps: 2 -> 4"):
    train_lib.train(longer, workdir)
  assert train_lib.train(longer, workdir, allow_config_change=True)["steps"] == 4
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 4


def test_log_every_zero_logs_the_last_step_only(model_dir, data_dir, tmp_path):
  summary = train_lib.train(tiny_config(model_dir, data_dir, **{"train.steps": 3, "train.log_every": 0}),
                            str(tmp_path))
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert summary["steps"] == 3 and [l["step"] for l in lines if "train/loss" in l] == [3]


def test_non_finite_steps_stop_or_skip_and_are_never_saved(model_dir, data_dir, tmp_path):
  """lr=1e30: the first update is finite but throws the weights to ~1e30, so every later loss
  overflows. "stop" ends the run naming step 2; "skip" runs on without those updates."""
  overrides = {"train.steps": 4, "train.lr": 1e30, "train.checkpoint_every": 1, "train.max_grad_norm": 0.0}
  with pytest.raises(FtjaxError, match=r"step 2: the loss \(\S+\) or its gradient is not finite.*latest: 1"):
    train_lib.train(tiny_config(model_dir, data_dir, **overrides), str(tmp_path / "stop"))
  assert Checkpointer(str(tmp_path / "stop")).latest_step() == 1
  summary = train_lib.train(tiny_config(model_dir, data_dir, **overrides, **{"train.nonfinite": "skip"}),
                            str(tmp_path / "skip"))
  assert summary["skipped_steps"] == [2, 3, 4]
  run = run_lib.setup(tiny_config(model_dir, data_dir, **overrides), with_data=False)
  state, _ = run_lib.init_or_restore(run, Checkpointer(str(tmp_path / "skip")))
  assert int(state["step"]) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


@pytest.mark.parametrize("trainable_dtype", ["float32", "bfloat16"])
def test_full_fine_tuning_of_a_bf16_base_keeps_f32_master_weights(model_dir, data_dir, trainable_dtype):
  c = tiny_config(model_dir, data_dir, method="full", **{
      "model.param_dtype": "bfloat16", "model.dtype": "bfloat16",
      "model.trainable_dtype": trainable_dtype})
  run = run_lib.setup(c, with_data=False)
  state, _ = run_lib.init_or_restore(run, None)
  assert not run.frozen  # everything trains
  dtypes = {x.dtype for x in jax.tree.leaves((state["trainable"], state["opt_state"])) if x.ndim}
  assert dtypes == {np.dtype(trainable_dtype)}
  # LoRA on the same bf16 base: the base stays bf16, the adapters f32.
  lora = run_lib.setup(tiny_config(model_dir, data_dir, **{"model.param_dtype": "bfloat16"}),
                       with_data=False)
  assert {x.dtype for x in jax.tree.leaves(lora.frozen)} == {np.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(lora.trainable)} == {np.dtype("float32")}


@pytest.mark.parametrize("method,overrides,peft_type", [
    ("lora", {"lora.use_dora": True, "lora.loraplus_lr_ratio": 16.0}, "LORA"),
    ("ia3", {"modules_to_save": "norm"}, "IA3"),
    ("prompt", {"prompt.num_virtual_tokens": 4, "prompt.init": "TEXT",
                "prompt.init_text": "Extract the expense"}, "PROMPT_TUNING"),
    ("prefix", {"prefix.num_virtual_tokens": 4, "prefix.projection": True}, "PREFIX_TUNING"),
    ("adapter", {"adapter.architecture": "pfeiffer", "adapter.reduction_factor": 4},
     "BOTTLENECK_ADAPTER"),
], ids=["dora+loraplus", "ia3", "prompt", "prefix", "adapter"])
def test_every_method_trains_from_the_config(method, overrides, peft_type, model_dir, data_dir,
                                             tmp_path):
  """`method` (and its block) selects any PEFT method; the saved adapter reloads to the same model."""
  from ftjax import models, peft
  c = tiny_config(model_dir, data_dir, method=method,
                  **{"train.steps": 3, "train.log_every": 1, **overrides})
  summary = train_lib.train(c, str(tmp_path / "wd"))
  assert summary["steps"] == 3 and summary["method"] == method
  assert np.isfinite(summary["eval"]["loss"])
  adapter = tmp_path / "wd" / "adapter"
  assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == peft_type
  run = run_lib.setup(c, with_data=False)
  state, _ = run_lib.init_or_restore(run, Checkpointer(str(tmp_path / "wd")))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 400, (2, 12)))
  trained = np.asarray(run.model(state["trainable"])(tokens))
  reloaded = peft.load_adapter(models.load(model_dir)[0], str(adapter))
  assert rel_err(reloaded(tokens), trained) < 1e-5
  if "lora.loraplus_lr_ratio" in overrides:
    _assert_loraplus_trained(run, tmp_path / "wd" / "metrics.jsonl")


def _assert_loraplus_trained(run, metrics_path):
  """The train loss fell (6.44 -> 5.41 measured over the 3 steps; a 0.3 drop is far above the
  batch-to-batch spread of a barely trained model), and the run's optimizer gives B and the DoRA
  magnitude 16x A's lr. Adam's first update is lr * g / (|g| + eps): with a uniform gradient
  (clipped to norm 1, so ~3e-3 per entry, >> eps = 1e-8) every entry moves by its group's lr."""
  losses = [json.loads(line)["train/loss"] for line in open(metrics_path) if "train/loss" in line]
  assert len(losses) == 3 and losses[-1] < losses[0] - 0.3, losses
  ones = jax.tree.map(jnp.ones_like, run.trainable)
  updates, _ = run.optimizer.update(ones, run.optimizer.init(run.trainable), run.trainable)
  moved = {}  # leaf name -> its largest move, in units of train.lr
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = str(path[-1].key)
    moved[name] = max(moved.get(name, 0.0), float(jnp.abs(u).max()) / run.config.train.lr)
  assert moved == pytest.approx({"lora_a": 1.0, "lora_b": 16.0, "lora_magnitude": 16.0}, rel=1e-4)


def test_a_combination_of_methods_trains_together(model_dir, data_dir, tmp_path):
  """method="lora+prompt": both attached as named adapters, trained together, each saved in
  PEFT's layout for several adapters (adapter/<name>/); reloaded together they give the run's
  model."""
  from ftjax import models, peft
  c = tiny_config(model_dir, data_dir, method="lora+prompt",
                  **{"train.steps": 2, "prompt.num_virtual_tokens": 3})
  train_lib.train(c, str(tmp_path / "wd"))
  run = run_lib.setup(c, with_data=False)
  state, _ = run_lib.init_or_restore(run, Checkpointer(str(tmp_path / "wd")))
  assert set(run.peft_configs) == {"lora", "prompt"}
  assert set(state["trainable"]["model"]) >= {"prompt", "layers"}  # both train
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 400, (2, 12)))
  trained = np.asarray(run.model(state["trainable"])(tokens))
  model = models.load(model_dir)[0]
  for name in ("lora", "prompt"):
    peft.load_adapter(model, str(tmp_path / "wd" / "adapter" / name), adapter_name=name)
  peft.set_adapter(model, ["lora", "prompt"])
  assert rel_err(model(tokens), trained) < 1e-5
  with pytest.raises(FtjaxError, match="method='lora\\+full'"):
    run_lib.setup(tiny_config(model_dir, data_dir, method="lora+full"), with_data=False)


def test_qlora_from_the_config(model_dir, data_dir, tmp_path):
  """method="qlora": kernels quantised to NF4 while loading, LoRA trained on top; the run's model
  equals LoRA on the dequantised base; the merged export (dequantise, merge in f32) loads in
  transformers; a 4-bit base with full fine-tuning is refused."""
  from ftjax import peft, quant
  c = tiny_config(model_dir, data_dir, method="qlora",
                  **{"train.steps": 3, "export.merged": True, "eval.generate": True,
                     "eval.max_examples": 2, "eval.max_new_tokens": 4})
  summary = train_lib.train(c, str(tmp_path / "wd"))
  assert summary["steps"] == 3 and np.isfinite(summary["eval"]["loss"])
  assert summary["finetuned"]["examples"] == 2
  run = run_lib.setup(c, with_data=False)
  assert run.quantised
  codes = run.frozen["model"]["layers"]["self_attn"]["q_proj"]["base_layer"]["codes"]
  assert codes.dtype == np.uint8 and codes.shape == (2, 64, 32)  # [layers, out, in / 2]
  state, _ = run_lib.init_or_restore(run, Checkpointer(str(tmp_path / "wd")))
  model = run.model(state["trainable"])
  assert quant.base_bits_per_param(model) < 4.2
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 400, (2, 12)))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "wd" / "merged")).eval()
  with torch.no_grad():
    assert rel_err(exported(torch.tensor(np.asarray(tokens))).logits.numpy(), model(tokens)) < 1e-4
  on_dequantised = peft.load_adapter(quant.dequantize_model(quant.quantize_model(
      models_from_params(*load_tiny(model_dir)))), str(tmp_path / "wd" / "adapter"))
  assert rel_err(on_dequantised(tokens), model(tokens)) < 1e-5
  with pytest.raises(FtjaxError, match="quantised weights cannot be trained"):
    run_lib.setup(tiny_config(model_dir, data_dir, method="full", **{"quant.type": "nf4"}),
                  with_data=False)


def models_from_params(cfg, params):
  from ftjax.models import from_params
  return from_params(cfg, params)


def load_tiny(model_dir):
  cfg = load_hf_config(model_dir)
  return cfg, load_hf_params(model_dir, cfg)
