"""scripts/bench_train.py end to end on a tiny model, including the side-by-side PEFT run."""

import json
import os
import statistics
import subprocess
import sys

from tiny import make_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_vs_peft_reports_rounds_and_their_median_ratio(tmp_path):
  model = make_model_dir(tmp_path / "model")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "bench_train.py"), "--config",
       os.path.join(REPO, "configs", "quickstart.py"), "--model", model, "--batch", "8", "--seq", "16",
       "--steps", "2", "--rounds", "2", "--warmup", "1", "--gap", "0", "--vs-peft"],
      capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["framework"] == "ftjax" and result["method"] == "lora"
  assert len(result["step_s_all"]) == 4 and len(result["peft"]["step_s_all"]) == 4
  assert result["tokens_per_s"] == 8 * 16 / statistics.median(result["step_s_all"])
  assert result["peft"]["tokens_per_s"] > 0 and result["peft"]["peft"]  # the peft version
  assert len(result["ratio_vs_peft_rounds"]) == 2
  assert result["ratio_vs_peft"] == statistics.median(result["ratio_vs_peft_rounds"])
  assert result["flops_per_step"] > 0 and 0 < result["mfu"]


def _bench(model: str, *extra: str) -> dict:
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "bench_train.py"), "--config",
       os.path.join(REPO, "configs", "quickstart.py"), "--model", model, "--batch", "8", "--seq", "16",
       "--steps", "1", "--warmup", "1", *extra], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_accounts_memory_of_full_lora_and_qlora(tmp_path):
  model = make_model_dir(tmp_path / "model")
  full, lora, qlora = (_bench(model, "--method", m) for m in ("full", "lora", "qlora"))
  assert full["base_bytes_per_param"] == lora["base_bytes_per_param"] == 4.0  # f32 weights
  assert full["quantised_bits_per_param"] is None
  # NF4 + double quantisation: 4 bits + 8 per 64-block + 32 per 256 blocks; embeddings stay f32.
  assert 4.0 < qlora["quantised_bits_per_param"] < 4.2
  assert qlora["base_gib"] < 0.5 * lora["base_gib"]
  # Full fine-tuning keeps AdamW moments of every weight: its step needs the most memory.
  assert full["step_device_gib"] > lora["step_device_gib"] > 0
  assert qlora["step_device_gib"] > 0 and qlora["host_peak_rss_gib"] > 0
