"""Peak anonymous RSS of this process over a block, sampled every millisecond by a thread: what
the memory benchmarks measure (on a CPU mesh the devices' memory is the process's).

  with PeakRss() as rss:
    ...
  rss.rise  # bytes: the peak over the block minus the value at its start
"""

from __future__ import annotations

import re
import threading
import time


def anon_bytes() -> int:
  with open("/proc/self/status") as f:
    return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) * 1024


class PeakRss:
  def __enter__(self) -> "PeakRss":
    self.base = self.peak = anon_bytes()
    self._done = False
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self) -> None:
    while not self._done:
      self.peak = max(self.peak, anon_bytes())
      time.sleep(0.001)

  def __exit__(self, *exc) -> None:
    self._done = True
    self._thread.join()

  @property
  def rise(self) -> int:
    return self.peak - self.base
