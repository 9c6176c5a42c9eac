"""Deterministic, resumable batches over packed rows.

Each epoch visits every row once in the order `np.random.default_rng([seed, epoch]).permutation`.
The order is a pure function of (seed, epoch), so the position in the data is three integers:
`get_state()` -> {"seed", "epoch", "row", "num_rows"}, JSON-serialisable, stored in checkpoints;
`set_state()` (or `state=`) continues with exactly the batches the original run would have seen.

Training (repeat=True) is an infinite stream: a batch that crosses an epoch boundary takes its tail
from the next epoch, so every batch is full. Evaluation (repeat=False, usually shuffle=False) is
one pass; the last partial batch is padded with rows whose loss_mask is all zero.

The batch size can differ per call (`next_batch(n)`), which is what gradient accumulation needs.

`ShardedLoader`: on several hosts each process reads, tokenises and packs only its shards of the
data (`Shards`); every global batch takes an equal part from each shard, so a process returns
just its shards' parts, and one process holding every shard returns the very same global batch.
"""

import dataclasses

import numpy as np

from ftjax.errors import FtjaxError


class Loader:

  def __init__(self, rows, batch_size, *, seed=0, shuffle=True, repeat=True, state=None,
               stream=None):
    self.rows = rows
    self.stream = stream  # a shard's own shuffle stream (ShardedLoader); None: the plain order
    # every key has one entry per row ("inputs" for token rows; GRPO's prompt rows lack it)
    self.num_rows = int(next(iter(rows.values())).shape[0])
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
        key = [self.seed, epoch] + ([] if self.stream is None else [self.stream])
        order = np.random.default_rng(key).permutation(self.num_rows)
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
    batch = {k: v[idx] for k, v in self.rows.items()}
    if idx.size < n:  # padding rows: segment 0, nothing trained
      batch = {k: np.concatenate([v, np.zeros((n - idx.size,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    return batch

  def __iter__(self):
    return self

  def __next__(self):
    return self.next_batch()


class ShardedLoader:
  """Batches from this process's shards of `num_shards`: each global batch of n rows takes
  n / num_shards rows from every shard (its own rows, its own shuffle), micro-batch by
  micro-batch, so that `rows.reshape(accum, -1, seq)` splits the result into the process's part
  of each micro-batch. Every shard consumes the same number of rows per batch, so the position
  is one number for all processes (`consumed`), which is what a checkpoint saves."""

  def __init__(self, shard_rows: dict, num_shards: int, *, accum: int = 1, seed=0, state=None):
    self.num_shards, self.accum, self.seed = int(num_shards), int(accum), int(seed)
    self.loaders = {i: Loader(rows, 1, seed=seed, stream=i) for i, rows in sorted(shard_rows.items())}
    self.consumed = 0  # rows taken from each shard so far
    if state is not None:
      self.set_state(state)

  def get_state(self):
    return {"seed": self.seed, "num_shards": self.num_shards, "consumed": self.consumed}

  def set_state(self, state):
    if int(state.get("num_shards", 1)) != self.num_shards:
      raise FtjaxError(f"data position in the checkpoint is for {state.get('num_shards', 1)} data "
                       f"shard(s), but this run splits the data into {self.num_shards}; set "
                       "data.shards to the checkpoint's value")
    self.seed, self.consumed = int(state["seed"]), int(state["consumed"])
    for loader in self.loaders.values():
      loader.seed = self.seed
      loader.epoch, loader.row = divmod(self.consumed, loader.num_rows)

  def next_batch(self, batch_size):
    n = int(batch_size)
    if n % (self.num_shards * self.accum):
      raise FtjaxError(f"batch size {n} does not split into {self.accum} micro-batch(es) with "
                       f"equal parts from {self.num_shards} data shards")
    per_shard = n // self.num_shards // self.accum
    parts = [loader.next_batch(per_shard) for _ in range(self.accum)
             for loader in self.loaders.values()]
    self.consumed += per_shard * self.accum
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@dataclasses.dataclass
class Shards:
  """This process's shards (`ftjax.data.Dataset` each, by shard index) of `num_shards`; used
  where a Dataset is, for training batches."""
  datasets: dict
  num_shards: int
  accum: int = 1

  def batches(self, batch_size, *, seed=0, state=None):
    del batch_size  # per call, as Loader.next_batch(n)
    return ShardedLoader({i: d.rows for i, d in self.datasets.items()}, self.num_shards,
                         accum=self.accum, seed=seed, state=state)

  @property
  def summary(self):
    """Counts summed over this process's shards (they are what it read and tokenised)."""
    parts = list(self.datasets.values())
    out = {k: sum(p.summary[k] for p in parts) for k in ("examples", "kept", "rows", "tokens",
                                                         "trained_tokens")}
    return dict(parts[0].summary, **out, shards=sorted(self.datasets), num_shards=self.num_shards)

  def describe(self):
    return (f"shards {sorted(self.datasets)} of {self.num_shards}: "
            + "; ".join(d.describe() for d in self.datasets.values()))
