"""The loop's hooks (ftjax/hooks.py): a hook added from outside the loop sees every step, can
replace the batch before a step and stop the run after one, with no edit to the loop."""

import json
import os

import jax
import pytest

from ftjax import train as train_lib
from ftjax.hooks import Hook, Loop
from tiny import quickstart_data, run_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return quickstart_data(tmp_path_factory, n_train=32, n_eval=8)


class Recorder(Hook):
  """Records what the loop shows it; on `stop_at` ends the loop; from `blank_from` on trains on
  an all-masked batch (as a rollout hook replaces the batch: same shapes and shardings)."""

  def __init__(self, every: int, stop_at: int = 0, blank_from: int = 0):
    self.every, self.stop_at, self.blank_from = every, stop_at, blank_from
    self.calls, self.losses = [], {}

  def start(self, loop: Loop) -> None:
    self.calls.append(("start", loop.step))

  def before_step(self, loop: Loop) -> None:
    self.calls.append(("before", loop.step))
    if self.blank_from and loop.step + 1 >= self.blank_from:  # the step about to run
      loop.batch = jax.tree.map(lambda x: x * 0, loop.batch)

  def after_step(self, loop: Loop) -> None:
    self.calls.append(("after", loop.step))
    self.losses[loop.step] = float(loop.metrics["loss"])
    if loop.step == self.stop_at:
      loop.stop_reason = "test"

  def close(self, loop: Loop) -> None:
    self.calls.append(("close", loop.step))


def test_an_added_hook_runs_every_n_steps_replaces_the_batch_and_stops_the_run(
    model_dir, data_dir, tmp_path):
  """A hook with every=2 passed to train(): start once, before_step before each step, after_step
  after steps 2 and 4; from step 3 on it zeroes the batch (no target token counted), and the
  steps train on that batch: step 4's loss is 0 where step 2's, on real rows, is not. It stops
  the loop after step 4 of 6: the end phase still runs (final checkpoint at 4, summary), and
  metrics.jsonl has no step past 4. One run for all of it: a tiny run costs mostly its compile."""
  config = run_config(model_dir, data_dir, **{"train.steps": 6, "train.log_every": 1})
  hook = Recorder(every=2, stop_at=4, blank_from=3)
  summary = train_lib.train(config, str(tmp_path), hooks=[hook])
  assert hook.calls == [("start", 0), ("before", 0), ("before", 1), ("after", 2), ("before", 2),
                        ("before", 3), ("after", 4), ("close", 4)]
  assert hook.losses[2] > 1.0  # a random tiny model on real rows: loss ~ log(vocab)
  assert hook.losses[4] == 0.0
  assert summary["steps"] == 4 and "stopped_by" not in summary
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert max(steps) == 4
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "4"))
