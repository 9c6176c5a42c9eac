"""The cost plan's estimates against a real run, on this machine.

  python scripts/bench_cost.py --config configs/quickstart.py [--set method=full --set train.lr=2e-5]
      [--steps N]

Runs, one after the other, each in its own process:
  1. `python -m ftjax.data check` (the probe: model load, compile, cost.probe_steps timed steps)
     -> the estimated wall time of the steps and the estimated peak memory;
  2. `python -m ftjax.train` of the same config (generation eval off, it is not training)
     -> the measured wall time of the steps (summary.json's train_s: the loop, evals excluded)
     and the run's peak RSS (the child's rusage).
Prints one JSON line with both and their ratios. Run on an otherwise idle machine: the two runs
are minutes apart, so a neighbour's load shifts one and not the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(args: list[str]) -> int:
  """Runs a child to completion; returns its peak RSS in bytes (from its rusage)."""
  proc = subprocess.Popen([sys.executable, *args], cwd=REPO)
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{' '.join(args[:3])} failed with status {os.waitstatus_to_exitcode(status)}")
  return usage.ru_maxrss * 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override, e.g. method=full (passed as --config.KEY=VALUE)")
  parser.add_argument("--steps", type=int, default=0, help="train.steps (0: the config's)")
  args = parser.parse_args()
  overrides = [f"--config.{kv}" for kv in args.set] + ["--config.eval.generate=False"]
  if args.steps:
    overrides.append(f"--config.train.steps={args.steps}")
  with tempfile.TemporaryDirectory() as tmp:
    run_child(["-m", "ftjax.data", "check", "--config", args.config, f"--out={tmp}", *overrides])
    with open(os.path.join(tmp, "data_report.json")) as f:
      cost = json.load(f)["cost"]
    workdir = os.path.join(tmp, "run")
    rss = run_child(["-m", "ftjax.train", "--config", args.config, f"--workdir={workdir}", *overrides])
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
  estimate_s, estimate_mem = cost["here"]["train_s"], cost["memory"]["peak_bytes"]
  print(json.dumps({
      "config": args.config, "overrides": args.set, "steps": cost["steps"],
      "probe_step_s": cost["here"]["step_s"], "probe_steps": cost["here"]["probe_steps"],
      "estimated_train_s": estimate_s, "measured_train_s": summary["train_s"],
      "time_ratio": estimate_s / summary["train_s"],
      "estimated_compile_s": cost["here"]["compile_s"], "measured_compile_s": summary["compile_s"],
      "estimated_peak_gib": estimate_mem / 2**30, "step_gib": cost["memory"]["step_bytes"] / 2**30,
      "base_rss_gib": cost["memory"]["base_rss_bytes"] / 2**30,
      "measured_peak_rss_gib": rss / 2**30, "memory_ratio": estimate_mem / rss}))


if __name__ == "__main__":
  main()
