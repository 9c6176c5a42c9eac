"""Metrics sinks: metrics.jsonl (one JSON object per line) and TensorBoard event files.

tensorboardX writes the event files without TensorFlow. A resumed run continues both from its
checkpoint's step: lines and events logged after that step by the interrupted run are dropped,
so no step appears twice.
"""

from __future__ import annotations

import json
import os

import numpy as np


class MetricWriter:
  def __init__(self, workdir: str, resume_step: int | None = None):
    from tensorboardX import SummaryWriter
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a")
    purge = None if resume_step is None else resume_step + 1
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    scalars = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()
