"""Orbax checkpoints of the train state (step, trainable params, optimizer state, RNG) plus the
data loader's position, so a run can continue where it stopped.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step to a temporary folder
and renames it when complete, so a crash never leaves a half-written step that looks finished.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 2, folder: str = "checkpoints"):
    # folder: "best" holds the best eval's state beside the latest ones (train.keep_best).
    self._manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), folder),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

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

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
