"""The command line's shared piece: absl flags with a `--config` file -> the config, every
error as one FtjaxError line. The entry points (ftjax.train, ftjax.plan, `python -m ftjax.data
check`) define their flags and call `parse_flags`."""

from __future__ import annotations

import os

import ml_collections
from absl import flags

from ftjax.errors import FtjaxError, setup_logging


def parse_flags(argv) -> ml_collections.ConfigDict:
  """absl flags (a `--config` file among them) from argv -> the config; errors as one
  FtjaxError line."""
  try:  # a typo in --config.a.b=v or a bad value: one line, not absl's traceback
    flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    if isinstance(e, KeyError) and e.args:
      key, *hint = str(e.args[0]).split("\n")
      message = f"unknown config key {key.strip(chr(39))!r}. {' '.join(hint)}"
    else:
      message = " ".join(str(e).split())
    raise FtjaxError(f"command line: {message}") from None
  setup_logging()
  if flags.FLAGS.config is None:
    raise FtjaxError("--config is required, e.g. --config configs/quickstart.py")
  if not isinstance(flags.FLAGS.config, ml_collections.ConfigDict):
    _config_load_error(flags.FLAGS["config"].config_filename)
  return flags.FLAGS.config


def _config_load_error(spec: str) -> None:
  """ml_collections turns an unreadable --config file into a placeholder that raises a long
  IOError on first use, deep inside training: say which file, here."""
  path = spec.split(":", 1)[0]
  if not os.path.exists(path):
    raise FtjaxError(f"--config {path}: no such file; pass a config file such as "
                     "configs/quickstart.py (relative to the current folder, or an absolute path)")
  raise FtjaxError(f"--config {path}: could not be read as a config file (a readable .py file "
                   "defining get_config() is expected)")
