"""One writer per workdir: the commands that write a workdir (train, export into it, evaluate
--workdir) hold WORKDIR/.ftjax.lock while they run.

The lock is `fcntl.flock` on the open file: the kernel drops it when the holder exits, however
it exits (SIGKILL, OOM, a lost host), so a lock is never stale and nothing needs clearing by
hand. The file also records the holder (pid, host, start time, command) for the refusal
message; a record with no lock behind it is what a killed holder leaves, and is overwritten.

On NFS, Linux turns flock into NFS byte-range locks, which every client sees (NFSv4, or v3 with
lockd). A file system without locks (an NFS mount with `nolock`, some FUSE mounts) gets a
warning and the holder's record alone: a live holder on this host, or any recorded holder on
another host, is refused, with the record's path to delete once that run is gone.

On several processes (multi-host), process 0 alone takes the lock (it alone writes the files
that describe the run) and the others stop with it when it cannot.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

from ftjax.errors import FtjaxError
from ftjax.files import LOCK_FILE
from ftjax.parallel import distributed

log = logging.getLogger("ftjax.lock")

# Locks this process holds (by real path): a second holder in the same process (a notebook
# cell starting train() while another runs) is refused without opening the file again.
_HELD: set[str] = set()


def _holder(what: str) -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "what": what,
          "command": " ".join(sys.argv)}


def _describe(record: dict) -> str:
  if not record:
    return "another process (it has not recorded itself yet)"
  return (f"{record.get('what')}, pid {record.get('pid')} on {record.get('host')} since "
          f"{record.get('started')} (command: {record.get('command')})")


def _read_record(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
  except (ValueError, UnicodeDecodeError):  # being written at this moment
    return {}


def _alive_here(record: dict) -> bool:
  """Whether the recorded holder is a live process on this host (False for other hosts)."""
  if record.get("host") != socket.gethostname():
    return False
  try:
    os.kill(int(record["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, TypeError, ValueError):
    return True  # someone else's process, or a record we cannot read: assume it is live
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir, "train"):` -- refused (FtjaxError naming the holder) while
  another process holds it. `what`: the command taking it, for that message."""

  def __init__(self, workdir: str, what: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.what = what
    self._fd = None
    self._created = False  # by this lock: removed again when nothing else was written

  def acquire(self) -> "WorkdirLock":
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise FtjaxError(f"{self.workdir}: a file is in the way; the workdir is a folder")
    key = os.path.realpath(self.path)
    if key in _HELD:
      raise FtjaxError(f"{self.workdir}: in use by this process already (another train/export "
                       "into it is running here); wait for it, or use another --workdir")
    self._created = not os.path.exists(self.workdir)
    fd = self._open_locked()
    try:
      previous = _read_record(fd)
      if previous:  # the kernel dropped its lock: that holder is gone
        log.warning("%s: the previous holder, %s, ended without releasing it (killed?); taking "
                    "over", self.path, _describe(previous))
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(_holder(self.what)).encode(), 0)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    _HELD.add(key)
    return self

  def _open_locked(self) -> int:
    """The lock file's descriptor, locked. Retried when the file was replaced while we waited
    (a release that removed the workdir it had created: see `release`)."""
    while True:
      os.makedirs(self.workdir, exist_ok=True)
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except FileNotFoundError:  # the folder went between the two lines
        continue
      try:
        self._lock(fd)
        if os.path.samestat(os.fstat(fd), os.stat(self.path)):
          return fd
      except FileNotFoundError:
        pass
      except BaseException:
        os.close(fd)
        raise
      os.close(fd)

  def _lock(self, fd: int) -> None:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise FtjaxError(
          f"{self.workdir}: in use by {_describe(_read_record(fd))}; two runs writing one workdir "
          f"would overwrite each other. Wait for it to finish, stop it, or use another --workdir "
          f"(the lock is released when that process exits; holder recorded in {self.path})"
      ) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      self._record_only(fd)

  def _record_only(self, fd: int) -> None:
    """No locks on this file system: the holder's record decides (see the module docstring)."""
    log.warning("%s: the file system does not support locks; only the holder's record guards "
                "this workdir against a second writer", self.path)
    record = _read_record(fd)
    if record and (_alive_here(record) or record.get("host") != socket.gethostname()):
      raise FtjaxError(f"{self.workdir}: in use by {_describe(record)} (as {self.path} records; "
                       f"this file system has no locks). If that run is gone, delete {self.path}")

  def release(self) -> None:
    if self._fd is None:
      return
    # An empty record: a release, not a killed holder (what _record_only relies on, too).
    os.ftruncate(self._fd, 0)
    if self._created and os.listdir(self.workdir) == [LOCK_FILE]:
      # A run refused before writing anything leaves no workdir behind (removed while still
      # locked; a process that opened the file meanwhile sees it gone and retries).
      os.unlink(self.path)
      with contextlib.suppress(OSError):
        os.rmdir(self.workdir)
    os.close(self._fd)  # drops the flock
    self._fd = None
    _HELD.discard(os.path.realpath(self.path))

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold_workdir(workdir: str, what: str):
  """The workdir's lock for the block, taken by process 0 (see the module docstring); every
  process raises when it cannot be taken."""
  lock, error = None, None
  if distributed.is_main():
    try:
      lock = WorkdirLock(workdir, what).acquire()
    except Exception as e:  # raised below, once the other processes know to stop too
      error = e
  (failed,) = distributed.any_process(error is not None)
  if error is not None:
    raise error
  if failed:
    raise FtjaxError(f"{workdir}: process 0 could not lock this workdir (its log says why)")
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
