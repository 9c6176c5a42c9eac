"""The Jinja sandbox that chat templates render in, with bounds on time and output.

A chat template is code shipped with a model (tokenizer_config.json, chat_template.jinja, GGUF
metadata) or named in a config. transformers' sandbox already refuses attribute tricks
(`__class__`, `__globals__`) and ranges over 100,000 items, but not work: nested loops, a string
multiplied by 10**9, `10 ** 10 ** 9`. Here rendering stops with an FtjaxError once it has run
`MAX_SECONDS` or written `MAX_CHARS` characters, and the template's own errors (raise_exception,
a sandbox refusal, a type error) become one FtjaxError line instead of a Jinja traceback.

Time is checked where a template does work: every function or method call, attribute or item
lookup, `*` / `**`, item of `range()` and piece of output. A loop whose body does none of these
over something other than range() (e.g. `messages`, bounded by the input) is not interrupted.
"""

from __future__ import annotations

import collections.abc
import threading
import time

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

from ftjax.errors import FtjaxError

# Measured: a ChatML template renders a 4-turn conversation in ~16 µs (~19 µs with these checks);
# 10 s is five orders of magnitude of headroom for real templates, yet stops a runaway loop.
MAX_SECONDS = 10.0
# The longest legitimate rendering is one conversation: 16 Mi characters is ~4 M tokens, beyond
# any model's context; a template producing more is looping.
MAX_CHARS = 16 * 2 ** 20
# `a ** b` with |b| above this (and |a| > 1) is refused: 2 ** 10**9 alone takes minutes.
_MAX_EXPONENT = 10_000

_state = threading.local()  # .deadline of the render under way on this thread (None: none)


def _tick() -> None:
  deadline = getattr(_state, "deadline", None)
  if deadline is not None and time.monotonic() > deadline:
    raise FtjaxError(f"chat template: rendering ran over {MAX_SECONDS:g} s (a loop far larger "
                     "than any conversation needs?); fix the template or use another model's")


def _too_large(what: str) -> FtjaxError:
  return FtjaxError(f"chat template: {what} would exceed {MAX_CHARS} characters (a loop or "
                    "repetition far larger than any conversation needs?); fix the template")


class _TickingRange(collections.abc.Sequence):
  """`range()` for templates: transformers' limit on its length, and a time check per item."""

  def __init__(self, *args):
    self._range = safe_range(*args)

  def __len__(self):
    return len(self._range)

  def __getitem__(self, index):
    return self._range[index]

  def __iter__(self):
    for item in self._range:
      _tick()
      yield item


class BoundedSandbox(ImmutableSandboxedEnvironment):
  """transformers' ImmutableSandboxedEnvironment plus the time and size checks above."""

  intercepted_binops = frozenset({"*", "**"})

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.globals["range"] = _TickingRange

  def call_binop(self, context, operator, left, right):
    _tick()
    if operator == "**" and _number(left) and _number(right) and abs(left) > 1 and abs(right) > _MAX_EXPONENT:
      raise FtjaxError(f"chat template: {left!r} ** {right!r} is too large to compute; fix the template")
    if operator == "*":
      for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
          raise _too_large(f"repeating a {type(seq).__name__} {n} times")
    return super().call_binop(context, operator, left, right)

  def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
    _tick()
    return super().call(__context, __obj, *args, **kwargs)

  def getattr(self, obj, attribute):
    _tick()
    return super().getattr(obj, attribute)

  def getitem(self, obj, argument):
    _tick()
    return super().getitem(obj, argument)


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


# What a template's own mistakes raise at render time (besides jinja2.TemplateError): a filter
# applied to the wrong type, a missing key under a strict lookup, a macro that recurses forever.
_TEMPLATE_FAULTS = (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError)


def render(template: jinja2.Template, **variables) -> str:
  """template.render(**variables), stopped after MAX_SECONDS or MAX_CHARS; every failure of the
  template is an FtjaxError."""
  _state.deadline = time.monotonic() + MAX_SECONDS
  out, size = [], 0
  try:
    for piece in template.generate(**variables):
      size += len(piece)
      if size > MAX_CHARS:
        raise _too_large("the rendered text")
      _tick()
      out.append(piece)
  except SecurityError as e:
    raise FtjaxError(f"chat template: refused by the sandbox ({e}); the template tries to reach "
                     "Python internals: do not use it") from None
  except jinja2.TemplateError as e:  # raise_exception("...") in the template, among others
    raise FtjaxError(f"chat template: {' '.join(str(e).split())}") from None
  except _TEMPLATE_FAULTS as e:
    raise FtjaxError(f"chat template failed: {type(e).__name__}: {' '.join(str(e).split())}") from None
  finally:
    _state.deadline = None
  return "".join(out)
