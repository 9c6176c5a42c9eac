"""Metrics sinks: metrics.jsonl (one JSON object per line) and TensorBoard event files.

tensorboardX writes the event files without TensorFlow.
"""

from __future__ import annotations

import json
import os

import numpy as np


class MetricWriter:
  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    scalars = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()
