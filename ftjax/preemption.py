"""SIGTERM / SIGINT end a run cleanly: the step in flight finishes, a checkpoint is written and
the command exits 0, so a preempted TPU VM or a cluster job's time limit (SLURM sends SIGTERM)
loses nothing, and the same command continues the run.

A second SIGINT (Ctrl-C twice) stops at once, as usual.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("ftjax.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
  """Within `with StopOnSignal() as stop:` the first SIGTERM/SIGINT sets `stop.signal` (its
  name) instead of killing the process; the loop checks it after each step. Outside the main
  thread (signals cannot be caught there) it does nothing."""

  def __init__(self):
    self.signal: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # asked twice: stop now
    self.signal = name
    log.warning("%s received: finishing the current step, then checkpointing and exiting", name)

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
