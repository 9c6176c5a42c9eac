"""The data check at the start of training, train.epochs, and "auto" epochs / batch size / lr."""

import collections
import json
import logging

import pytest

from ftjax import config as config_lib
from ftjax import train as train_lib
from ftjax.data import auto, quickstart_task
from ftjax.data.loader import Loader
from ftjax.errors import FtjaxError
from test_data_check import EXPECTED, _write_planted


def _config(model_dir, train, **train_keys):
  c = config_lib.base_config()
  c.model.name_or_path = model_dir
  c.data.train, c.data.seq_len = train, 128
  c.train.steps, c.train.warmup_steps, c.train.log_every, c.train.eval_every = 2, 0, 0, 0
  c.export.adapter = False
  for key, value in train_keys.items():
    c.train[key] = value
  return c


def test_fail_policy_stops_before_anything_loads(tmp_path, model_dir, monkeypatch):
  def no_setup(*args, **kwargs):
    raise AssertionError("setup (model load, compile) ran after a failed data check")
  monkeypatch.setattr(train_lib, "setup", no_setup)
  path = _write_planted(tmp_path / "bad.jsonl")
  workdir = tmp_path / "run"
  with pytest.raises(FtjaxError, match=f"{len(EXPECTED) - 1} data problems") as e:
    train_lib.train(_config(model_dir, path), str(workdir))
  for line, code in EXPECTED:
    if code != "over_length":  # truncated under the default length policy, not an error
      assert f"{path}:{line}: " in str(e.value), code
  assert "python -m ftjax.data check" in str(e.value)
  assert not workdir.exists()  # bad input leaves nothing behind


def test_skip_policy_trains_on_the_rest(tmp_path, model_dir):
  path = _write_planted(tmp_path / "bad.jsonl")
  c = _config(model_dir, path)
  c.data.check.on_error, c.data.length_policy = "skip", "drop"
  workdir = tmp_path / "run"
  summary = train_lib.train(c, str(workdir))
  assert summary["steps"] == 2 and summary["train_data"]["kept"] == 7
  report = json.loads((workdir / "data_report.json").read_text())
  train = report["splits"]["train"]
  # every planted error but over_length (dropped by the length policy) is a skipped record
  assert train["skipped"] == len(EXPECTED) - 1 and train["dropped"] == 1 and train["kept"] == 7
  assert not report["failed"] and report["cost"]["steps"] == 2
  assert report["counts"]["bad_json"] == 1 and report["counts"]["unknown_role"] == 1
  assert "| train | 7 |" in (workdir / "data_report.md").read_text()


def test_epochs_runs_exactly_that_many_passes(tmp_path, model_dir, monkeypatch, caplog):
  data = tmp_path / "data"
  quickstart_task.write_splits(str(data), n_train=100, n_eval=4, seed=5)
  c = _config(model_dir, str(data / "train.jsonl"), epochs=3, batch_size=8)
  c.data.pack = False  # one example per row, so rows seen are examples seen
  seen = collections.Counter()
  next_batch = Loader.next_batch

  def recording(self, n=None):
    batch = next_batch(self, n)
    for inputs, mask in zip(batch["inputs"], batch["loss_mask"]):
      if mask.any():  # padding rows train nothing
        seen[inputs.tobytes()] += 1
    return batch
  monkeypatch.setattr(Loader, "next_batch", recording)
  with caplog.at_level(logging.INFO, logger="ftjax.data.auto"):
    summary = train_lib.train(c, str(tmp_path / "run"))
  assert summary["steps"] == 38  # ceil(3 * 100 / 8): the last step holds 4 rows and 4 of padding
  assert len(seen) == 100 and set(seen.values()) == {3}
  assert "chose train.steps=38: 3 epochs x 100 rows / batch 8" in caplog.text


def test_auto_rule():
  assert auto.auto_epochs(20)[0] == 5  # ceil(100 / 20): small sets get more epochs
  assert auto.auto_epochs(500)[0] == 3
  assert auto.auto_epochs(20_000)[0] == 1  # 25,000 // 20,000
  assert auto.auto_batch_size(250, 8)[0] == 8  # 0.2% of 250 is under the floor
  assert auto.auto_batch_size(50_000, 8)[0] == 104  # 100 rounded up to a multiple of 8
  assert auto.auto_batch_size(10**6, 8)[0] == 256
  assert auto.auto_batch_size(250, 6)[0] == 12  # a multiple of the data-parallel devices
  c = config_lib.base_config()
  c.method, c.train.epochs, c.train.batch_size, c.train.lr = "full", "auto", "auto", "auto"
  c.train.warmup_steps = 12
  reasons = auto.resolve(c, rows=20, examples=30, shards=8)
  assert (c.train.epochs, c.train.batch_size, c.train.lr) == (4, 8, 2e-5)  # ceil(100 / 30) epochs
  assert c.train.steps == 10 and c.train.warmup_steps == 1  # ceil(4 * 20 / 8); warmup cut to 1/10
  assert reasons[0].startswith("train.batch_size=8: ") and "30 examples is a small set" in reasons[2]
  c.method, c.train.lr = "lora", "auto"
  auto.resolve(c, rows=20, examples=30, shards=8)
  assert c.train.lr == 2e-4


def test_auto_must_be_resolved_before_setup(model_dir):
  c = _config(model_dir, "x.jsonl", lr="auto")
  config_lib.validate(c)  # "auto" is valid config ...
  from ftjax.run import setup
  with pytest.raises(FtjaxError, match="train.lr = 'auto' is chosen from the data"):
    setup(c, with_data=False)  # ... but a Run needs the number
  c.train.lr = "fast"
  with pytest.raises(FtjaxError, match="train.lr='fast'; expected 'auto' or a number"):
    config_lib.validate(c)
