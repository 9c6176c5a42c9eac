"""The one exception type users see, and the command-line plumbing around it.

Anything raised as `FtjaxError` is bad input the user can fix: the command-line entry points
print its message on one line and exit non-zero, without a traceback.
"""

import functools
import sys


class FtjaxError(Exception):
  """Bad input: the message names the file, line, key or tensor and what was expected.

  `code`: an optional stable name for the kind of problem (the data check counts them, e.g.
  "missing_field"); None when there is none."""

  def __init__(self, message, code=None):
    super().__init__(message)
    self.code = code


def cli_errors(main):
  """Decorator for `main()` functions: FtjaxError -> one line on stderr, exit status 2."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except FtjaxError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapper


# Loggers whose INFO lines look like errors to a newcomer: JAX logs every accelerator backend
# it probes and cannot open ("Unable to initialize backend 'tpu': ... libtpu.so"), absl its flags.
_NOISY_LOGGERS = ("jax._src.xla_bridge", "absl")


def setup_logging(fmt: str = "%(asctime)s %(name)s: %(message)s") -> None:
  """INFO logs on stderr for the command-line entry points, without backend-probing noise."""
  import logging
  # force: an import may already have configured the root logger (absl does), hiding INFO.
  logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)
  for name in _NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
