"""scripts/bench_train.py end to end on a tiny model, including the side-by-side PEFT run."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_vs_peft_reports_rounds_and_their_median_ratio(model_dir, tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "bench_train.py"), "--config",
       os.path.join(REPO, "configs", "quickstart.py"), "--model", model_dir, "--batch", "8", "--seq", "16",
       "--steps", "2", "--rounds", "2", "--warmup", "1", "--gap", "0", "--vs-peft"],
      capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["framework"] == "ftjax" and result["method"] == "lora"
  assert len(result["step_s_all"]) == 4 and len(result["peft"]["step_s_all"]) == 4
  assert result["tokens_per_s"] > 0  # checked against a stopwatch in the test below
  assert result["peft"]["tokens_per_s"] > 0 and result["peft"]["peft"]  # the peft version
  assert len(result["ratio_vs_peft_rounds"]) == 2
  assert result["ratio_vs_peft"] == statistics.median(result["ratio_vs_peft_rounds"])
  assert result["flops_per_step"] > 0 and 0 < result["mfu"]


def _bench(model: str, *extra: str, config: str = "quickstart.py", batch: int = 8,
           seq: int = 16) -> dict:
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "bench_train.py"), "--config",
       os.path.join(REPO, "configs", config), "--model", model, "--batch", str(batch), "--seq",
       str(seq), "--steps", "1", "--warmup", "1", *extra], capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_side_by_side(result: dict, other: str, rounds: int) -> None:
  """The other side's rounds, its tokens/s over the same tokens per step, and the ratios."""
  theirs = result[other]
  assert len(result["step_s_all"]) == len(theirs["step_s_all"]) == rounds
  assert theirs["tokens_per_s"] == result["tokens_per_step"] / theirs["step_s"]
  assert result[f"ratio_vs_{other}"] == statistics.median(result[f"ratio_vs_{other}_rounds"])
  assert result[f"memory_ratio_vs_{other}"] == (result["host_peak_rss_gib"]
                                                / theirs["host_peak_rss_gib"])
  assert 0.1 < theirs["host_peak_rss_gib"] < 50  # GiB: a unit slip (KiB, bytes) is off by 1e3+


def _bench_module():
  path = os.path.join(REPO, "scripts", "bench_train.py")
  spec = importlib.util.spec_from_file_location("bench_train", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_dpo_pairs_against_trl(model_dir):
  """--vs-trl on the DPO config: ftjax's step over [pairs, 2, seq] rows (both replies in one
  forward) against trl's DPO loss + peft in the child, on the same token count."""
  result = _bench(model_dir, "--vs-trl", "--rounds", "2", "--gap", "0", "--set", "mesh.data=1",
                  config="preference.py", batch=2, seq=16)
  assert result["objective"] == "dpo" and result["tokens_per_step"] == 2 * 2 * 16
  assert result["trl"]["trl"] and result["trl"]["peft"]  # versions: the child ran trl + peft
  assert 0 < result["loss"] < 1.0  # a DPO loss near ln 2 = 0.69 after one step, not an SFT one
  _assert_side_by_side(result, "trl", rounds=2)


def test_bench_classification_against_peft_seq_cls_and_the_sft_step(model_dir):
  """--vs-peft on the classification config: peft SEQ_CLS (the child refuses to run when the
  score head is not trained); --vs-config: the SFT step of this checkout on the same shape."""
  result = _bench(model_dir, "--vs-peft", "--num-labels", "5", "--rounds", "2", "--gap", "0",
                  "--set", "mesh.data=1",
                  "--vs-config", os.path.join(REPO, "configs", "quickstart.py"),
                  config="classification.py", batch=8, seq=16)
  assert result["objective"] == "classification" and result["tokens_per_step"] == 8 * 16
  assert 0 < result["loss"] < 2 * math.log(5)  # cross-entropy over 5 classes, not the vocabulary
  _assert_side_by_side(result, "peft", rounds=2)
  assert result["config"]["objective"] == "sft"  # the child timed the SFT step
  assert len(result["config"]["step_s_all"]) == 2 and result["ratio_vs_config"] > 0


def test_bench_grpo_rollouts_and_update_against_trl(model_dir):
  """--vs-trl on the GRPO config: each step = rollout of batch completions of max_new_tokens
  (no stop token, both sides) + update; both sides time the parts apart."""
  result = _bench(model_dir, "--vs-trl", "--rounds", "2", "--gap", "0", "--set", "mesh.data=1",
                  "--set", "grpo.max_new_tokens=8", "--set", "grpo.num_generations=2",
                  config="grpo.py", batch=4, seq=24)  # 2 prompts x G=2 (the config's G=8 > 4)
  assert result["objective"] == "grpo"
  for side in (result, result["trl"]):
    assert side["rollout_tokens_per_s"] == 4 * 8 / side["rollout_s"]
    assert side["rollout_s"] > 0 and side["update_s"] > 0
    assert side["rollout_s"] + side["update_s"] <= 1.5 * side["step_s"]  # parts of the step
  assert result["trl"]["completion_tokens"] == 4 * 8  # min_new_tokens: TRL sampled every token
  assert result["rollout_ratio_vs_trl"] == result["trl"]["rollout_s"] / result["rollout_s"]
  _assert_side_by_side(result, "trl", rounds=2)


def test_vs_tree_reads_the_same_config_path_in_the_other_checkout(tmp_path, monkeypatch):
  """--vs-tree from any working directory: configs/x.py of this checkout -> ROOT/configs/x.py."""
  bench_train = _bench_module()
  monkeypatch.chdir(tmp_path)
  mine = os.path.join(REPO, "configs", "quickstart.py")
  assert bench_train.tree_config("/old", mine) == os.path.join("/old", "configs", "quickstart.py")
  outside = str(tmp_path / "c.py")
  assert bench_train.tree_config("/old", outside) == outside


def test_bench_accounts_memory_of_full_lora_and_qlora(model_dir):
  """The bench's memory accounting (FtjaxBench.memory), in this process: the command line
  around it runs in the tests above, and three more interpreters (jax, the peak-FLOPs probe)
  took ~30 s of the suite for the same numbers."""
  bench_train = _bench_module()

  def memory(method: str) -> dict:
    config = bench_train.load_config(os.path.join(REPO, "configs", "quickstart.py"))
    bench_train.apply_overrides(config, {"method": method, "model": model_dir})
    config.mesh.data = 1
    return bench_train.FtjaxBench(config, batch=8, seq=16).memory()

  full, lora, qlora = (memory(m) for m in ("full", "lora", "qlora"))
  assert full["base_bytes_per_param"] == lora["base_bytes_per_param"] == 4.0  # f32 weights
  assert full["quantised_bits_per_param"] is None
  # NF4 + double quantisation: 4 bits + 8 per 64-block + 32 per 256 blocks; embeddings stay f32.
  assert 4.0 < qlora["quantised_bits_per_param"] < 4.2
  assert qlora["base_gib"] < 0.5 * lora["base_gib"]
  # Full fine-tuning keeps AdamW moments of every weight: its step needs the most memory.
  assert full["step_device_gib"] > lora["step_device_gib"] > 0
  assert qlora["step_device_gib"] > 0 and qlora["host_peak_rss_gib"] > 0


def test_tokens_per_s_agrees_with_a_stopwatch_and_the_batch_it_trained_on(model_dir):
  """tokens_per_s checked independently of its formula: the tokens of the batch the timed steps
  trained on, over the wall time measured here around those steps (device work included). The
  bench reports the median step, the stopwatch sees the mean plus the loop's overhead, so they
  agree within a factor (measured: 0.9-1.1 on the 2-core VM); a timer that stopped before the
  device finished, or tokens counted per device or per accumulation step, are off by >= 4x."""
  bench_train = _bench_module()
  bench_train.peak_flops = lambda: (1e12, "not measured here")  # the MFU's ceiling: seconds
  config = bench_train.load_config(os.path.join(REPO, "configs", "quickstart.py"))
  config.model.name_or_path = model_dir
  config.mesh.data = 1
  bench = bench_train.FtjaxBench(config, batch=8, seq=64)
  bench.steps(1)  # warm-up
  n = 7
  t = time.perf_counter()
  times = bench.steps(n)
  jax.block_until_ready(bench.state)
  wall = time.perf_counter() - t
  result = bench.summary(times)
  assert sum(result["step_s_all"]) <= wall  # the bench timed nothing outside the steps
  tokens = bench.data["inputs"].size  # each step's batch: [accum, rows, seq] input tokens
  ratio = result["tokens_per_s"] / (n * tokens / wall)
  print(f"tokens_per_s / stopwatch: {ratio:.3f}")
  assert 0.5 < ratio < 2.0, (result["tokens_per_s"], n * tokens / wall, times)
