"""Functions a config names as "pkg.module:function" (custom metrics, reward functions).

Such a function is code the config runs, exactly like a Python config file, so this is no
sandbox (the user's own module can call anything); refusing system modules catches a typo or a
copied config calling e.g. `os:symlink` or `shutil:rmtree` with the model's answers as arguments.
"""

from __future__ import annotations

import importlib
from typing import Callable

from ftjax.errors import FtjaxError

# Modules whose functions act on the system (files, processes, the interpreter): never a metric
# or a reward.
SYSTEM_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "pathlib", "io", "_io",
    "socket", "signal", "ctypes", "importlib", "runpy", "code", "pty", "tempfile", "glob",
    "multiprocessing", "threading", "pickle", "marshal", "webbrowser", "urllib", "http", "ftplib",
    "smtplib", "asyncio", "posixpath", "ntpath", "_posixsubprocess", "zipfile", "tarfile"})


def import_function(spec: str, *, key: str, what: str, signature: str) -> Callable:
  """"pkg.module:function" -> the function. FtjaxError naming the config `key` when it is not of
  that form, does not import, is not a plain function or belongs to a system module. `what`
  ("custom metric") and `signature` ("(prediction, reference) -> float") word the errors."""
  module_name, _, attr = spec.partition(":")
  if not module_name or not attr:
    raise FtjaxError(f"config: {key}: {spec!r} is not 'pkg.module:function'")
  _refuse_system_module(spec, module_name, key, what, signature)
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except Exception as e:  # any import-time failure of the user's module is bad input
    raise FtjaxError(f"config: {key}: {what} {spec!r} failed to import: "
                     f"{type(e).__name__}: {e}") from None
  if not callable(fn) or isinstance(fn, type):
    raise FtjaxError(f"config: {key}: {what} {spec!r} is not a function {signature}")
  _refuse_system_module(spec, getattr(fn, "__module__", None) or "", key, what, signature)
  return fn


def _refuse_system_module(spec, module_name, key, what, signature) -> None:
  if module_name.split(".")[0] in SYSTEM_MODULES:
    raise FtjaxError(f"config: {key}: {what} {spec!r} is a function of the system module "
                     f"{module_name!r}; name a function of your own module, {signature}")
