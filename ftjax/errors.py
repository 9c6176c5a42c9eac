"""The one exception type users see.

Anything raised as `FtjaxError` is bad input the user can fix: the command-line entry points
print its message on one line and exit non-zero, without a traceback.
"""

import functools
import sys


class FtjaxError(Exception):
  """Bad input: the message names the file, line, key or tensor and what was expected."""


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
