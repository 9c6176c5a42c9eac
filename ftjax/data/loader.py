"""Deterministic, resumable batches over packed rows.

Each epoch visits every row once in the order `np.random.default_rng([seed, epoch]).permutation`.
The order is a pure function of (seed, epoch), so the position in the data is three integers:
`get_state()` -> {"seed", "epoch", "row", "num_rows"}, JSON-serialisable, stored in checkpoints;
`set_state()` (or `state=`) continues with exactly the batches the original run would have seen.

Training (repeat=True) is an infinite stream: a batch that crosses an epoch boundary takes its tail
from the next epoch, so every batch is full. Evaluation (repeat=False, usually shuffle=False) is
one pass; the last partial batch is padded with rows whose loss_mask is all zero.

The batch size can differ per call (`next_batch(n)`), which is what gradient accumulation needs.
"""

import numpy as np

from ftjax.errors import FtjaxError
from ftjax.data.packing import FIELDS


class Loader:

  def __init__(self, rows, batch_size, *, seed=0, shuffle=True, repeat=True, state=None):
    self.rows = rows
    self.num_rows = int(rows["inputs"].shape[0])
    if self.num_rows == 0:
      raise FtjaxError("no rows to batch: the dataset is empty after the length policy")
    self.batch_size = int(batch_size)
    self.shuffle = shuffle
    self.repeat = repeat
    self.seed = int(seed)
    self.epoch = 0
    self.row = 0  # rows already consumed in the current epoch
    self._order_cache = (None, None)
    if state is not None:
      self.set_state(state)

  def get_state(self):
    return {"seed": self.seed, "epoch": self.epoch, "row": self.row, "num_rows": self.num_rows}

  def set_state(self, state):
    if int(state.get("num_rows", self.num_rows)) != self.num_rows:
      raise FtjaxError(f"data position in the checkpoint is for {state['num_rows']} rows but the "
                       f"dataset now has {self.num_rows}; the data or seq_len changed since")
    self.seed, self.epoch, self.row = int(state["seed"]), int(state["epoch"]), int(state["row"])

  def _order(self, epoch):
    if self._order_cache[0] != epoch:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
      else:
        order = np.arange(self.num_rows)
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def next_batch(self, batch_size=None):
    """The next batch: dict of [batch_size, seq_len] arrays. StopIteration after a single pass."""
    n = self.batch_size if batch_size is None else int(batch_size)
    parts, have = [], 0
    while have < n:
      if self.row >= self.num_rows:
        if not self.repeat:
          break
        self.epoch += 1
        self.row = 0
      take = min(n - have, self.num_rows - self.row)
      parts.append(self._order(self.epoch)[self.row:self.row + take])
      self.row += take
      have += take
    if not have:
      raise StopIteration
    idx = np.concatenate(parts)
    batch = {k: self.rows[k][idx] for k in FIELDS}
    if idx.size < n:  # padding rows: segment 0, nothing trained
      batch = {k: np.concatenate([v, np.zeros((n - idx.size,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    return batch

  def __iter__(self):
    return self

  def __next__(self):
    return self.next_batch()
