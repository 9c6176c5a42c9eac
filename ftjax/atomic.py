"""Outputs appear complete or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil


@contextlib.contextmanager
def atomic_dir(out_dir: str):
  """Yields a temporary folder beside `out_dir` that replaces it when the block succeeds."""
  tmp = out_dir.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
