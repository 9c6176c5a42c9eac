"""Orbax checkpoints of the train state (step, trainable params, optimizer state, RNG) plus the
data loader's position, so a run can continue where it stopped.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step to a temporary folder
(`<step>.orbax-checkpoint-tmp*`) and renames it when complete, and ignores such folders when
listing steps, so a crash in the middle of a save never looks like a finished step; ftjax names
them in a warning. A step folder that is there but cannot be read back (truncated or damaged
afterwards) is not caught by orbax: `restore_latest` falls back to the step before, then warns
naming the bad folder and moves it aside to `<step>.unreadable`.

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

from ftjax.errors import FtjaxError

log = logging.getLogger("ftjax.checkpoint")


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 2, folder: str = "checkpoints"):
    # folder: "best" holds the best eval's state beside the latest ones (train.keep_best).
    self.directory = os.path.join(os.path.abspath(workdir), folder)
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

    Unfinished saves are named in a warning. Step folders that fail to load are moved aside
    (a warning naming each and why) once an older step loads: then the failure was that
    folder's. When none loads, the cause is more likely this run (a changed model or adapter
    shape) than every folder at once: nothing is moved and an FtjaxError says why.
    """
    for tmp in sorted(glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*"))):
      log.warning("ignoring %s: a checkpoint save that did not finish (the run stopped while "
                  "writing it)", tmp)
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 -- any failure to read a step: try the one before
        failed.append((os.path.join(self.directory, str(step)), f"{type(e).__name__}: "
                       + " ".join(str(e).split())[:300]))
        continue
      for path, reason in failed:
        log.warning("checkpoint %s is unreadable (%s); moved it to %s.unreadable and restored "
                    "step %d instead", path, reason, path, step)
        self._set_aside(path)
      return step, state, data
    if failed:
      path, reason = failed[0]
      raise FtjaxError(f"{path}: no checkpoint in {self.directory} could be restored into this "
                       f"run's state (newest: {reason}). If the model or adapter changed shape, "
                       "use a new --workdir; if the files are damaged, move them away.")
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
