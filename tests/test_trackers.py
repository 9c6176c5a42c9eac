"""log.trackers: a tiny training run logged to W&B (offline) and an MLflow file store, read back."""

import glob
import json
import os

import pytest

from ftjax import train as train_lib
from ftjax.errors import FtjaxError
from ftjax.metrics import MetricWriter
from tiny import make_model_dir, quickstart_data, run_config


def _wandb_records(path: str):
  """The protobuf records of a .wandb file: wandb's 7-byte header (":W&B", magic, version)
  then LevelDB-log blocks of 32 KiB, each chunk a 7-byte header (crc32, length, type: 1 full,
  2 first, 3 middle, 4 last). wandb 0.31 ships no Python reader of its own any more."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", path
  pos, pending, block = 7, b"", 32768
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is zero padding
      pos += block - pos % block
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    if kind == 0:
      break
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      yield record


def _wandb_history(run_dir: str) -> list[dict]:
  """The history rows (one per logged step) of an offline W&B run."""
  (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
  return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
           for item in r.history.item}
          for r in _wandb_records(path) if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_and_mlflow_file_store_get_config_metrics_and_report(tmp_path_factory, monkeypatch):
  pytest.importorskip("wandb", reason="the trackers extra (wandb) is not installed")
  pytest.importorskip("mlflow", reason="the trackers extra (mlflow-skinny) is not installed")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  model_dir = make_model_dir(tmp_path_factory.mktemp("model"))
  data_dir = quickstart_data(tmp_path_factory, n_train=8, n_eval=4)
  workdir = str(tmp_path_factory.mktemp("run"))
  c = run_config(model_dir, data_dir, **{
      "train.steps": 2, "train.log_every": 1, "eval.forgetting": False,
      "log.trackers": "tensorboard,wandb,mlflow", "log.project": "tiny-proj",
      "log.run_name": "tiny-run"})
  train_lib.train(c, workdir)
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = {k for line in lines for k in line if k != "step"}
  assert "train/loss" in logged and os.path.isfile(os.path.join(workdir, "report.md"))

  from mlflow.tracking import MlflowClient
  client = MlflowClient(tracking_uri="file:" + os.path.join(workdir, "mlruns"))
  experiment = client.get_experiment_by_name("tiny-proj")
  (run,) = client.search_runs([experiment.experiment_id])
  assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
  assert run.data.params["train.steps"] == "2" and run.data.params["log.trackers"] == c.log.trackers
  for key in logged:  # every metric, at every step it was logged
    history = client.get_metric_history(run.info.run_id, key.replace("/", "."))
    assert sorted(m.step for m in history) == sorted(l["step"] for l in lines if key in l), key
  artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
  assert {"report.md", "report.json", "config.json", "summary.json"} <= artifacts

  (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
  rows = _wandb_history(run_dir)
  assert {k for row in rows for k in row if not k.startswith("_")} == logged
  assert [row["train/loss"] for row in rows if "train/loss" in row] == pytest.approx(
      [l["train/loss"] for l in lines if "train/loss" in l])
  records = list(_wandb_records(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0]))
  (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  config = {item.key: item.value_json for item in run_record.config.update}
  assert run_record.project == "tiny-proj" and run_record.display_name == "tiny-run"
  assert json.loads(config["log"])["trackers"] == c.log.trackers
  assert json.loads(config["train"])["steps"] == 2
  artifact_files = {f.path for r in records if r.WhichOneof("record_type") == "artifact"
                    for f in r.artifact.manifest.contents}
  assert {"report.md", "report.json", "config.json", "summary.json"} <= artifact_files


def test_missing_tracker_package_and_unknown_name(tmp_path, monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
  with pytest.raises(FtjaxError, match=r"'wandb'.*pip install 'ftjax\[trackers\]'"):
    MetricWriter(str(tmp_path), trackers="tensorboard,wandb")
  with pytest.raises(FtjaxError, match="unknown tracker 'comet'"):
    MetricWriter(str(tmp_path), trackers="comet")
