"""Metrics sinks: metrics.jsonl (one JSON object per line) always, plus the trackers of
`log.trackers`: TensorBoard event files (default), Weights & Biases, MLflow.

tensorboardX writes the event files without TensorFlow. A resumed run continues both from its
checkpoint's step: lines and events logged after that step by the interrupted run are dropped,
so no step appears twice. wandb and mlflow are optional (`pip install ftjax[trackers]`); each
gets the resolved config as run parameters, every metric logged here, and at the end the
report files as artifacts. Offline: WANDB_MODE=offline (runs under WORKDIR/wandb), and MLflow
logs to the file store WORKDIR/mlruns unless MLFLOW_TRACKING_URI names another.
"""

from __future__ import annotations

import glob
import importlib
import json
import os

import numpy as np

from ftjax import config as config_lib
from ftjax.errors import FtjaxError

TRACKERS = config_lib.TRACKERS
# The files of a finished run that trackers receive as artifacts (those that exist).
ARTIFACTS = ("report.md", "report.json", "*.png", "data_report.json", "summary.json",
             "eval_results.json", "config.json")
# A run's tracker ids, so a resumed run logs into the same W&B / MLflow run.
_IDS_FILE = "trackers.json"


def parse_trackers(spec: str) -> list[str]:
  """"tensorboard,wandb" -> ["tensorboard", "wandb"]; an unknown name is a config error."""
  names = [n.strip() for n in str(spec).split(",") if n.strip()]
  unknown = [n for n in names if n not in TRACKERS]
  if unknown:
    raise FtjaxError(f"log.trackers: unknown tracker {unknown[0]!r}; known: {', '.join(TRACKERS)}")
  return names


def _require(package: str):
  try:
    return importlib.import_module(package)
  except ImportError:
    raise FtjaxError(f"log.trackers includes {package!r} but the {package} package is not "
                     f"installed: pip install 'ftjax[trackers]' (or pip install {package})") from None


class _WandbSink:
  def __init__(self, workdir, project, run_name, config, run_id):
    wandb = _require("wandb")
    self._run = wandb.init(project=project, name=run_name, dir=workdir, config=config,
                           id=run_id, resume="allow" if run_id else None)
    self.run_id = self._run.id

  def write(self, step, scalars):
    self._run.log(scalars, step=step)

  def artifacts(self, files):
    import wandb
    artifact = wandb.Artifact(f"report-{self.run_id}", type="report")
    for f in files:
      artifact.add_file(f)
    self._run.log_artifact(artifact)

  def close(self):
    self._run.finish()


class _MlflowSink:
  def __init__(self, workdir, project, run_name, config, run_id):
    mlflow = _require("mlflow")
    from mlflow.tracking import MlflowClient
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
      uri = "file:" + os.path.join(os.path.abspath(workdir), "mlruns")
      # MLflow 3 refuses a file store unless asked (it is "in maintenance mode"); it is the one
      # store that needs no server nor SQLAlchemy, so an offline run opts in.
      os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    self._client = MlflowClient(tracking_uri=uri)
    if run_id is None:
      experiment = self._client.get_experiment_by_name(project)
      exp_id = experiment.experiment_id if experiment else self._client.create_experiment(project)
      run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id
      params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in config_lib.flat(config).items()]
      for start in range(0, len(params), 100):  # MLflow's per-batch limit
        self._client.log_batch(run_id, params=params[start:start + 100])
    self.run_id = run_id

  def write(self, step, scalars):
    from mlflow.entities import Metric
    import time
    now = int(time.time() * 1000)
    self._client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "."), v, now, step)
                                                 for k, v in scalars.items()])

  def artifacts(self, files):
    for f in files:
      self._client.log_artifact(self.run_id, f)

  def close(self):
    self._client.set_terminated(self.run_id)


class MetricWriter:
  def __init__(self, workdir: str, resume_step: int | None = None, trackers: str = "tensorboard",
               project: str = "ftjax", run_name: str = "", config: dict | None = None):
    names = parse_trackers(trackers)
    self._workdir = workdir
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a")
    self._tb = None
    if "tensorboard" in names:
      from tensorboardX import SummaryWriter
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
    self._sinks = self._open_trackers(names, project, run_name or os.path.basename(
        os.path.abspath(workdir)), config or {}, resume_step is not None)

  def _open_trackers(self, names, project, run_name, config, resuming):
    ids_path = os.path.join(self._workdir, _IDS_FILE)
    ids = {}
    if resuming and os.path.exists(ids_path):
      with open(ids_path) as f:
        ids = json.load(f)
    sinks = {}
    for name, cls in (("wandb", _WandbSink), ("mlflow", _MlflowSink)):
      if name in names:
        sinks[name] = cls(self._workdir, project, run_name, config, ids.get(name))
    if sinks:
      with open(ids_path, "w") as f:
        json.dump({n: s.run_id for n, s in sinks.items()}, f)
    return sinks

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    scalars = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, int(step))
    for sink in self._sinks.values():
      sink.write(int(step), scalars)

  def close(self, artifacts: bool = False) -> None:
    """Ends every sink; `artifacts`: first hand the trackers the run's report files."""
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    files = sorted({f for pattern in ARTIFACTS
                    for f in glob.glob(os.path.join(self._workdir, pattern))}) if artifacts else []
    sinks, self._sinks = self._sinks, {}
    for sink in sinks.values():
      if files:
        sink.artifacts(files)
      sink.close()
