"""Orbax checkpoints of the train state (step, trainable params, optimizer state, RNG) plus the
data loader's position, so a run can continue where it stopped.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step to a temporary folder
(`<step>.orbax-checkpoint-tmp*`) and renames it when complete, and ignores such folders when
listing steps, so a crash in the middle of a save never looks like a finished step; ftjax names
them in a warning. A step folder that is there but cannot be read back (truncated or damaged
afterwards) is not caught by orbax: `restore_latest` warns naming it, moves it aside to
`<step>.unreadable` and falls back to the step before.

Restoring takes the shardings of the live (abstract) state, so a run saved on one mesh continues
on another (8 devices -> 4 or 1). On several processes orbax coordinates the writes; process 0
alone moves folders aside.
"""

from __future__ import annotations

import glob
import logging
import os

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("ftjax.checkpoint")


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, state, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def latest_step(self):
    return self._manager.latest_step()

  def restore(self, step: int, abstract_state):
    """abstract_state: a tree of arrays or ShapeDtypeStructs with shardings, as the live state."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_latest(self, abstract_state):
    """(step, state, data state) of the newest readable checkpoint, or None when there is none.

    Unfinished saves are named in a warning; an unreadable step folder is moved aside (warning
    naming it and why) and the step before is tried.
    """
    for tmp in sorted(glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*"))):
      log.warning("ignoring %s: a checkpoint save that did not finish (the run stopped while "
                  "writing it)", tmp)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, abstract_state)
        return step, state, data
      except Exception as e:  # noqa: BLE001 -- any failure to read a step means: skip it
        path = os.path.join(self.directory, str(step))
        reason = " ".join(str(e).split())[:300]
        log.warning("checkpoint %s is unreadable (%s: %s); moving it to %s.unreadable and "
                    "trying the one before", path, type(e).__name__, reason, path)
        self._set_aside(path)
    return None

  def _set_aside(self, path: str) -> None:
    if jax.process_index() == 0 and os.path.isdir(path):
      target, n = path + ".unreadable", 1
      while os.path.exists(target):  # an older set-aside copy of the same step
        target, n = f"{path}.unreadable{n}", n + 1
      os.rename(path, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"ftjax set aside {path}")
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
