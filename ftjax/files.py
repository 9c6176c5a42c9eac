"""Small files: outputs that appear complete or not at all (written under a temporary name,
then renamed), and JSON inputs whose errors name the file and line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from ftjax.errors import FtjaxError


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


def read_json(path: str, hint: str = ""):
  """The parsed file; a missing or malformed file is an FtjaxError naming it (and the line)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FtjaxError(f"{path}: no such file{hint}") from None
  except json.JSONDecodeError as e:
    raise FtjaxError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
