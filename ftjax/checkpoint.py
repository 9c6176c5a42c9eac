"""Orbax checkpoints of the train state (step, trainable params, optimizer state, RNG) plus the
data loader's position, so a run can continue where it stopped.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step to a temporary folder
(`<step>.orbax-checkpoint-tmp*`) and renames it when complete, and ignores such folders when
listing steps, so a crash in the middle of a save never looks like a finished step; ftjax names
them in a warning. A step folder that is there but cannot be read back (truncated or damaged
afterwards) is not caught by orbax: `restore_latest` falls back to the step before, then warns
naming the bad folder and moves it aside to `<step>.unreadable`.

A save that fails (a read-only or full disk) stops the run with one FtjaxError naming the step,
the folder and the checkpoint that is still intact: orbax deletes older steps only after a new
one is complete, so a failed save never costs the previous checkpoint. Step folders are created
synchronously, so a read-only folder fails the save at once (created in the background, the
writer threads waited 300 s for a folder that never came before the process could exit).

Restoring takes the shardings of the live (abstract) state, so a run saved on one mesh continues
on another (8 devices -> 4 or 1). On several processes orbax coordinates the writes; process 0
alone moves folders aside.
"""

from __future__ import annotations

import glob
import logging
import os
import sys

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ftjax.errors import FtjaxError

log = logging.getLogger("ftjax.checkpoint")


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 2, folder: str = "checkpoints"):
    # folder: "best" holds the best eval's state beside the latest ones (train.keep_best).
    self.directory = os.path.join(os.path.abspath(workdir), folder)
    _CHECKPOINT_FOLDERS.add(self.directory)
    _quiet_orbax_noise()
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))
    self._in_flight = None  # the step whose save may still be writing in the background
    self._failed = False  # a save failed and was reported: close() must not raise it again

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving `step` in the background, once the previous save is complete; a failed
    save (the previous one, or this one's start) raises FtjaxError naming its step."""
    self.wait()  # orbax waits for the previous save too: here its failure gets its own step
    with _SaveFailures(self, step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    self._in_flight = step

  def check_for_errors(self) -> None:
    """Raises FtjaxError when the background save has failed; cheap, and never waits for a save
    still writing. (orbax's own check_for_errors races with its finalize thread, which then no
    longer sees the error and deletes the older steps as if the save had succeeded.)"""
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight is complete; FtjaxError when it failed."""
    if self._in_flight is None:
      return
    with _SaveFailures(self, self._in_flight):
      self._manager.wait_until_finished()
    self._in_flight = None

  def save_failed(self, step: int, error: BaseException) -> FtjaxError:
    """The one-line error of a failed save of `step`, naming the checkpoint still intact."""
    self._failed = True
    intact = sorted(int(n) for n in os.listdir(self.directory)
                    if n.isdigit() and int(n) != step) if os.path.isdir(self.directory) else []
    if intact:
      kept = (f"the previous checkpoint, step {intact[-1]} "
              f"({os.path.join(self.directory, str(intact[-1]))}), is intact: run the same "
              "command again to continue from it once the disk is writable and has space")
    else:
      kept = "no earlier checkpoint exists, so a rerun starts from step 0"
    return FtjaxError(f"{os.path.join(self.directory, str(step))}: saving the checkpoint of step "
                      f"{step} failed ({_short(error)}); {kept}")

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
        failed.append((os.path.join(self.directory, str(step)), _short(e)))
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
    if not self._failed:
      self.wait()
      self._manager.close()
      return
    try:  # the failure was reported already; orbax raises it again on every wait
      self._manager.close()
    except Exception:  # noqa: BLE001
      pass


def _short(error: BaseException, limit: int = 300) -> str:
  """The error on one line, its middle cut when long: tensorstore names the file first and the
  OS error ("File too large", "No space left on device") last."""
  text = f"{type(error).__name__}: " + " ".join(str(error).split())
  return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


class _SaveFailures:
  """`with`: any exception of an orbax save or wait -> the checkpointer's FtjaxError naming the
  failed step."""

  def __init__(self, checkpointer: Checkpointer, step: int):
    self.checkpointer, self.step = checkpointer, step

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is None or not isinstance(exc, Exception) or isinstance(exc, FtjaxError):
      return False
    self.checkpointer._in_flight = None
    raise self.checkpointer.save_failed(self.step, exc) from exc


_ORBAX = f"{os.sep}orbax{os.sep}"
# Every checkpoint folder of this process: an abandoned write's error names its file there.
_CHECKPOINT_FOLDERS: set[str] = set()


def _is_orbax_leftover(args) -> bool:
  """An unraisable exception left behind by an orbax save or restore that failed, and was
  reported: orbax runs each in a fresh event loop and closes it as soon as the first array fails
  (a damaged file, a full disk). The sibling tensorstore reads and writes still in flight then
  call back into the closed loop ("Event loop is closed": 36-99 tracebacks for one damaged
  checkpoint), and their abandoned coroutines are closed later, at the latest when the
  interpreter shuts down. Their results are not needed (the step before is restored, or the
  failed save is reported), so these are dropped."""
  if args.exc_type is RuntimeError and str(args.exc_value) == "Event loop is closed":
    tb = args.exc_traceback
    while tb is not None:
      if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
        return True
      tb = tb.tb_next
  code = getattr(args.object, "cr_code", None)  # a coroutine being closed
  return code is not None and _ORBAX in code.co_filename


def _from_orbax(exc_info) -> bool:
  """The error passed through orbax's code, or (a tensorstore future's error, set and never
  raised, so it has no traceback) names a file in one of this process's checkpoint folders."""
  if not isinstance(exc_info, tuple):
    return False
  if exc_info[2] is None:
    text = str(exc_info[1])
    return any(folder + os.sep in text for folder in _CHECKPOINT_FOLDERS)
  tb = exc_info[2]
  while tb is not None:
    if _ORBAX in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _DropOrbaxTracebacks(logging.Filter):
  """orbax logs each failed background save thread with its traceback (a full disk: 640
  lines); ftjax re-raises the same error as one FtjaxError naming the step, so orbax's records
  keep their one-line message and lose the traceback. On the asyncio logger: the futures of the
  event loop orbax abandoned ("exception was never retrieved") hold that same error: dropped.
  Some of those futures hold a tensorstore error that was set, never raised: it has no traceback
  to show it came through orbax, and logged it printed a bare "ValueError: OUT_OF_RANGE: Error
  writing ..." line after ftjax's own error (when the garbage collector got to the future last),
  so such errors are recognised by the checkpoint folder they name."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio":
      return not (record.exc_info and _from_orbax(record.exc_info))
    if record.exc_info and _ORBAX in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


def _quiet_orbax_noise() -> None:
  """Installs the filters above, once (each passes everything else on). The hook is checked
  each time: a test runner may have swapped sys.unraisablehook since."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropOrbaxTracebacks) for f in logger.filters):
      logger.addFilter(_DropOrbaxTracebacks())
  if getattr(sys.unraisablehook, "ftjax_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(args):
    if not _is_orbax_leftover(args):
      previous(args)
  hook.ftjax_quiet = True
  sys.unraisablehook = hook
