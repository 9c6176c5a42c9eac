"""What a training objective is, as the run sees it.

The run (ftjax.run), the step builder, the plan (ftjax.plan), the cost probe and the loop ask the
run's objective; none of them branches on its name. An objective says:

  row_spec()        the arrays of one training row: {key: (per-row shape, dtype)}. A batch holds
                    them as [accum, micro_batch, *shape]; the batch axis is sharded over the mesh.
  dataset(...)      how checked examples become those rows (a Dataset: `.rows`, `.batches()`).
  loss_fn(...)      `loss_fn(model, batch, rng) -> {"loss_sum", "count", other sums}` for
                    ftjax.step: sums, which the step divides by the window's total count; every
                    key but loss_sum and count is logged as train/<key> (eval/<key> in evals).
                    A key `x` returned with `x__count` is divided by that sum instead (a mean
                    per completion, say, where the loss counts tokens).
  synthetic_batch   one batch of row_spec's shapes, for the cost probe's timing.
  next_rows(...)    the next step's rows from the data's (SFT: as they are), given the state.
  validate()        checks across config keys that the schema cannot make alone.

Supervised fine-tuning (ftjax.objectives.sft) is the worked example; docs/design.md, "Adding an
objective", walks through it. A capability an objective needs that the base lacks (a model head,
a pre-training pass, batches built from the current params) is added here as a method whose
default keeps what every other objective does, and called from the run or the loop.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np

from ftjax.errors import FtjaxError


class Objective:
  """A training objective; subclasses set `name` and implement the methods that raise."""

  name: ClassVar[str] = ""
  # The config block of this objective's own keys ("dpo" for dpo.*), or None. A run refuses a
  # changed key in another objective's block: it would silently do nothing.
  config_block: ClassVar[str | None] = None

  def __init__(self, config):
    self.config = config

  def validate(self) -> None:
    """Checks beyond the schema's, raising FtjaxError naming the key."""

  def row_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    raise NotImplementedError

  def dataset(self, examples: list, tokenizer, *, train: bool, name: str):
    """A Dataset of `examples` (checked by ftjax.data.check) with `row_spec`'s rows."""
    raise NotImplementedError

  def loss_fn(self, model_cfg, mesh) -> Callable:
    """The step's loss function; hashable (it is a static argument of the jitted step)."""
    raise NotImplementedError

  def next_rows(self, run, state, take_rows: Callable[[int], dict]) -> dict:
    """The rows of the next train step, [train.batch_size, ...] each. `take_rows(n)` reads the
    next n rows of the train data (the checkpointed position advances by them; padding rows
    past an epochs budget). `state` is the train state this step updates (its params current:
    an objective that samples from the policy does so here)."""
    return take_rows(self.config.train.batch_size)

  def synthetic_batch(self, vocab_size: int, seed: int = 0) -> dict:
    """A batch [accum, micro, *shape] of random rows: dense compute does not depend on the
    values, so the cost probe times the step on it without reading data."""
    cfg = self.config.train
    rng = np.random.default_rng(seed)
    out = {}
    for key, (shape, dtype) in self.row_spec().items():
      full = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum) + tuple(shape)
      out[key] = (rng.integers(0, vocab_size, full, dtype=np.int32).astype(dtype)
                  if np.issubdtype(dtype, np.integer) else np.ones(full, dtype))
    return out


def refuse_other_blocks(config, registry: dict[str, type[Objective]], defaults) -> None:
  """A changed key in the block of an objective the run does not train is refused by name."""
  for name, cls in registry.items():
    block = cls.config_block
    if name == config.objective or block is None or block not in config:
      continue
    changed = [f"{block}.{k}" for k, v in config[block].items() if defaults[block].get(k) != v]
    if changed:
      raise FtjaxError(f"config: {', '.join(changed)} belong(s) to objective {name!r}, but "
                       f"objective={config.objective!r}; remove them or set objective={name!r}")
