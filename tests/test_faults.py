"""Preemption and faults: SIGKILL at a random step then a restart gives bitwise the losses and
adapters of an uninterrupted run, resuming from the last checkpoint without running earlier
steps again; SIGTERM checkpoints the finished step and exits 0, and the restart continues; a
truncated checkpoint is skipped with a warning naming it (and no asyncio noise); a save that
fails on a read-only or full disk stops the run with one error naming the step, leaving the
earlier checkpoints byte for byte; a run saved on 8 devices restores on 4 and on 1.

All runs share one config on the 8-device CPU mesh (data=2 x fsdp=2 x tensor=2), so one
uninterrupted run is the reference for all of them. The killed runs are subprocesses running the
CLI, as a preempted job would.
"""

import contextlib
import glob
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ftjax import config as config_lib
from ftjax import run as run_lib
from ftjax import train as train_lib
from ftjax.checkpoint import Checkpointer
from ftjax.errors import FtjaxError
from ftjax.data import quickstart_task
from tiny import set_dotted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


@pytest.fixture(scope="module")
def overrides(model_dir, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  quickstart_task.write_splits(str(data_dir), n_train=48, n_eval=8, seed=3)
  # batch 4: the smallest the 2 x 2 (data x fsdp) mesh splits evenly; these tests are about
  # checkpoints, and 40 steps at batch 8 were most of the module's CPU time (93 -> 64 CPU s)
  return {"model.name_or_path": model_dir, "data.train": str(data_dir / "train.jsonl"),
          "data.seq_len": 128, "train.steps": STEPS, "train.batch_size": 4, "train.lr": 1e-3,
          "train.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 0,
          "train.checkpoint_every": 4, "train.keep_checkpoints": 3,
          "lora.dropout": 0.1,  # the restored RNG matters
          "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
          # checkpoints and resumes are under test, not the run-end evaluation: no forgetting
          # probe or report (their compiles and matplotlib in every process)
          "eval.forgetting": False, "eval.report": False}


def make_config(overrides, **more):
  return set_dotted(config_lib.base_config(), {**overrides, **more})


def config_file(path, overrides) -> str:
  """A configs/-style file for the CLI holding `overrides`."""
  lines = ["from ftjax.config import base_config", "", "def get_config():", "  c = base_config()"]
  lines += [f"  c.{key} = {value!r}" for key, value in overrides.items()]
  lines += ["  return c", ""]
  path.write_text("\n".join(lines))
  return str(path)


def losses(workdir) -> list:
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(l["step"], l["train/loss"]) for l in lines if "train/loss" in l]


def adapter(workdir) -> dict:
  return load_file(os.path.join(workdir, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight(overrides, tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train_lib.train(make_config(overrides), workdir)
  return workdir


def start_cli(overrides, tmp_path, workdir, max_file_bytes=None):
  """`python -m ftjax.train` on `overrides`; max_file_bytes: as `ulimit -f` (set by a small
  Python that then execs the CLI: a preexec_fn would fork this multithreaded process)."""
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",  # as conftest sets in-process
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  command = [sys.executable, "-m", "ftjax.train", "--config",
             config_file(tmp_path / "cfg.py", overrides), "--workdir", workdir]
  if max_file_bytes is not None:
    command = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource."
               f"RLIMIT_FSIZE, ({max_file_bytes}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
               "os.execv(sys.argv[1], sys.argv[1:])", *command]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, workdir, step, timeout=240):
  """Polls metrics.jsonl until it has logged `step`."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-3000:]}"
    if os.path.exists(path) and any(s >= step for s, _ in losses(workdir)):
      return
    time.sleep(0.005)
  proc.kill()
  raise AssertionError(f"no step {step} within {timeout} s")


def steps_around_resume(workdir) -> tuple[list, int | None, list]:
  """(train steps logged before the "resumed_from_step" row, its step, steps logged after it)
  from metrics.jsonl; (all steps, None, []) when the run never resumed. The rows before the
  marker were written by the interrupted process, the ones after it by the resumed one."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  marks = [i for i, r in enumerate(rows) if "resumed_from_step" in r]
  assert len(marks) <= 1, rows
  cut = marks[0] if marks else len(rows)
  steps = lambda part: [r["step"] for r in part if "train/loss" in r]
  return steps(rows[:cut]), rows[cut]["resumed_from_step"] if marks else None, steps(rows[cut + 1:])


def assert_resumed(workdir, summary, messages, at: int | None):
  """The run restored the checkpoint of step `at` (None: started over) and ran only the steps
  after it: each step's row is in metrics.jsonl once, those up to `at` written before resuming."""
  assert summary["resumed_from_step"] == at
  assert (f"resumed from step {at}: steps 1..{at} are not run again" in messages) == (at is not None)
  before, marker, after = steps_around_resume(workdir)
  cut = STEPS if at is None else at
  assert (marker, before, after) == (at, list(range(1, cut + 1)), list(range(cut + 1, STEPS + 1)))


def assert_same_run(workdir, straight):
  assert losses(workdir) == losses(straight)  # every step once, bitwise the same loss
  want, got = adapter(straight), adapter(workdir)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_sigkill_at_a_random_step_then_restart_is_bitwise_the_uninterrupted_run(
    overrides, straight, tmp_path, caplog):
  kill_at = random.Random().randint(2, 20)  # checkpoints every 4 steps: often between two
  workdir = str(tmp_path / "run")
  proc = start_cli(overrides, tmp_path, workdir)
  wait_for_step(proc, workdir, kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  killed_after = max(s for s, _ in losses(workdir))
  assert proc.returncode == -signal.SIGKILL and killed_after < STEPS, f"killed at step {kill_at}"
  # orbax saves in the background: a save still running when the kill came is a tmp folder.
  unfinished = glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))
  # Checkpoints every 4 steps; killed before the first one finished, the restart starts over.
  latest = Checkpointer(workdir, keep=3).latest_step()
  assert latest is None or latest % 4 == 0 and latest <= killed_after
  # step 8's save starts once step 4's is complete, before step 9 runs
  assert latest is not None or killed_after <= 8
  with caplog.at_level(logging.INFO):
    summary = train_lib.train(make_config(overrides), workdir)
  assert summary["steps"] == STEPS
  messages = [r.getMessage() for r in caplog.records]
  restored = [int(m.split()[-1]) for m in messages if m.startswith("restored checkpoint at step")]
  assert restored == ([] if latest is None else [latest]), messages
  assert_resumed(workdir, summary, messages, latest)
  # Named when a finished checkpoint is restored; killed during the first save, the run starts
  # over without reading the folder (orbax replaces the unfinished step when it saves it again).
  for path in unfinished if latest is not None else []:
    assert any(f"ignoring {path}: a checkpoint save that did not finish" in m for m in messages)
  assert_same_run(workdir, straight)


def test_sigterm_checkpoints_the_step_and_exits_0_and_the_restart_continues(
    overrides, straight, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  proc = start_cli(overrides, tmp_path, workdir)
  wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  stopped = max(s for s, _ in losses(workdir))
  assert stopped < STEPS
  assert f"stopped by SIGTERM after step {stopped}; checkpoint saved in" in stderr
  # The finished step itself is checkpointed, not only the last multiple of checkpoint_every.
  assert Checkpointer(workdir).latest_step() == stopped
  assert not os.path.exists(os.path.join(workdir, "summary.json"))  # not a finished run
  with caplog.at_level(logging.INFO):
    summary = train_lib.train(make_config(overrides), workdir)
  assert summary["steps"] == STEPS
  assert_resumed(workdir, summary, [r.getMessage() for r in caplog.records], stopped)
  assert_same_run(workdir, straight)


def test_truncated_checkpoint_is_skipped_with_a_warning_naming_it(overrides, straight, tmp_path, caplog):
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight, workdir)
  last = os.path.join(workdir, "checkpoints", str(STEPS))
  chunks = glob.glob(os.path.join(last, "state", "**", "d", "*"), recursive=True)
  assert chunks
  for path in chunks:  # cut every array file short, as a disk filling up mid-write would
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  # Restored on one device (a smaller machine): there each array is read whole, and the noise
  # below showed (44 tracebacks; none when restored on the 8-device mesh it was saved on).
  run = run_lib.setup(make_config(overrides, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}),
                      with_data=False)
  # orbax stops at the first bad array and closes its event loop while the other reads are in
  # flight; each then reported "Event loop is closed" as an unraisable exception.
  unraisable, hook = [], sys.unraisablehook
  sys.unraisablehook = lambda args: unraisable.append(f"{args.exc_type.__name__}: {args.exc_value}")
  try:
    with caplog.at_level(logging.WARNING):
      state, _ = run_lib.init_or_restore(run, Checkpointer(workdir, keep=3))
    time.sleep(0.5)  # the reads still in flight finish (measured: within ~10 ms)
  finally:
    sys.unraisablehook = hook
  assert unraisable == []
  assert int(state["step"]) == STEPS - 4  # the checkpoint before
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f"checkpoint {last} is unreadable" in w for w in warnings), warnings
  assert os.path.isdir(last + ".unreadable") and not os.path.exists(last)
  assert Checkpointer(workdir).latest_step() == STEPS - 4


def test_a_state_no_checkpoint_fits_moves_nothing_aside(overrides, straight, tmp_path):
  """Restoring into a differently shaped state (LoRA rank 4 instead of 8) fails for every step:
  that is the run's doing, not damage, so the checkpoints stay and the error says so."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight, workdir)
  run = run_lib.setup(make_config(overrides, **{"lora.rank": 4}), with_data=False)
  with pytest.raises(FtjaxError, match=rf"checkpoints/{STEPS}: no checkpoint in .* could be restored"):
    run_lib.init_or_restore(run, Checkpointer(workdir, keep=3))
  assert sorted(Checkpointer(workdir, keep=3)._manager.all_steps()) == [STEPS - 8, STEPS - 4, STEPS]


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=4, tensor=1), dict(data=1, fsdp=1, tensor=1)])
def test_a_run_saved_on_8_devices_restores_on_fewer(mesh, overrides, straight):
  saved = make_config(overrides)
  on_8 = run_lib.init_or_restore(run_lib.setup(saved, with_data=False), Checkpointer(straight))[0]
  moved = make_config(overrides, **{f"mesh.{k}": v for k, v in mesh.items()})
  train_lib.check_resume_config(os.path.join(straight, "config.json"), moved, allow_change=False)
  run = run_lib.setup(moved, with_data=False)
  state, data_state = run_lib.init_or_restore(run, Checkpointer(straight))
  assert int(state["step"]) == STEPS and data_state is not None
  size = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(on_8)):
    assert len(a.sharding.device_set) in (1, size) and len(b.sharding.device_set) in (1, 8)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lora_a = state["trainable"]["model"]["layers"]["mlp"]["up_proj"]["lora_a"]
  assert len(lora_a.sharding.device_set) == size


def test_checkpoint_every_minutes_saves_between_step_multiples(overrides, tmp_path):
  """checkpoint_every=0 (by steps: off) and a 0.3 s interval: the run saves along the way, not
  only at the end. 40 steps take well over 0.3 s (orbax's save alone takes ~0.1 s)."""
  workdir = str(tmp_path / "timed")
  train_lib.train(make_config(overrides, **{"train.checkpoint_every": 0, "train.keep_checkpoints": 50,
                                            "train.checkpoint_every_minutes": 0.005}), workdir)
  steps = Checkpointer(workdir, keep=50)._manager.all_steps()
  assert STEPS in steps and len(steps) >= 2, steps


def test_keep_checkpoints_below_1_is_refused(overrides):
  """0 let orbax delete every checkpoint, the final one too: nothing to export or resume."""
  for keep in (0, -1):
    with pytest.raises(FtjaxError, match=rf"train.keep_checkpoints={keep}; must be an integer >= 1"):
      config_lib.validate(make_config(overrides, **{"train.keep_checkpoints": keep}))
  config_lib.validate(make_config(overrides, **{"train.keep_checkpoints": 1}))


def file_digests(folder) -> dict:
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


@contextlib.contextmanager
def read_only(folder):
  """`folder` read-only for this process: a read-only bind mount as root (who ignores file
  modes), else its mode without write bits."""
  if os.geteuid() != 0:
    mode = os.stat(folder).st_mode
    os.chmod(folder, 0o555)
    try:
      yield
    finally:
      os.chmod(folder, mode)
    return
  mount = subprocess.run(f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}",
                         shell=True, capture_output=True, text=True)
  if mount.returncode:
    subprocess.run(["umount", folder], capture_output=True)
    pytest.skip(f"running as root and cannot bind-mount {folder} read-only: {mount.stderr}")
  try:
    yield
  finally:
    subprocess.run(["umount", folder], check=True)


def non_daemon_threads() -> list:
  """Threads that keep the interpreter from exiting (it joins them first)."""
  deadline = time.monotonic() + 10
  while True:
    alive = [t.name for t in threading.enumerate()
             if t.is_alive() and not t.daemon and t is not threading.main_thread()]
    if not alive or time.monotonic() > deadline:
      return alive
    time.sleep(0.05)


def copy_without_last_checkpoint(straight, tmp_path) -> tuple[str, dict]:
  """A copy of the finished run as if stopped after step STEPS - 4: continuing it (same config,
  same compiled step) runs 4 steps and saves step STEPS. Returns (workdir, its checkpoint files'
  digests)."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  return workdir, file_digests(os.path.join(workdir, "checkpoints"))


def assert_failed_save_named_and_nothing_lost(workdir, before, message):
  checkpoints = os.path.join(workdir, "checkpoints")
  after = file_digests(checkpoints)
  assert {k: after.get(k) for k in before} == before  # every earlier checkpoint, byte for byte
  # what the failed save wrote is a tmp folder, which the next restore ignores with a warning
  assert all(k.startswith(f"{STEPS}.orbax-checkpoint-tmp/") for k in set(after) - set(before))
  assert Checkpointer(workdir, keep=3).latest_step() == STEPS - 4
  assert "\n" not in message
  assert message.startswith(f"{checkpoints}/{STEPS}: saving the checkpoint of step {STEPS} failed (")
  assert message.endswith(f"the previous checkpoint, step {STEPS - 4} ({checkpoints}/{STEPS - 4}), is "
                          "intact: run the same command again to continue from it once the disk "
                          "is writable and has space")


def test_a_read_only_checkpoint_folder_fails_the_save_at_once_naming_it(overrides, straight, tmp_path):
  workdir, before = copy_without_last_checkpoint(straight, tmp_path)
  with read_only(os.path.join(workdir, "checkpoints")), pytest.raises(FtjaxError) as error:
    train_lib.train(make_config(overrides), workdir)
  # orbax's writer threads used to wait 300 s for a step folder that was never created, and
  # the process could not exit before they gave up (Python joins such threads at exit).
  assert non_daemon_threads() == []
  assert_failed_save_named_and_nothing_lost(workdir, before, str(error.value))
  assert "Read-only file system" in str(error.value) or "Permission denied" in str(error.value)


def test_a_full_disk_fails_the_save_naming_it_and_keeps_earlier_checkpoints(overrides, straight, tmp_path):
  """The CLI under `ulimit -f` of half the largest checkpoint file, as on a full disk (Python
  ignores SIGXFSZ: the write fails with EFBIG); the run's other files are far smaller."""
  workdir, _ = copy_without_last_checkpoint(straight, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  before = file_digests(checkpoints)
  limit = max(os.path.getsize(os.path.join(checkpoints, path)) for path in before) // 2
  proc = start_cli(overrides, tmp_path, workdir, max_file_bytes=limit)
  _, stderr = proc.communicate(timeout=180)
  assert proc.returncode == 2, stderr[-3000:]
  # before: a 640-line traceback, and dozens of "Event loop is closed" ones
  assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "File too large" in last, last
  assert_failed_save_named_and_nothing_lost(workdir, before, last[len("error: "):])


def test_an_abandoned_write_future_naming_a_checkpoint_file_is_not_logged(tmp_path):
  """A full disk's tensorstore error can sit in a future of the event loop orbax abandoned: set,
  never raised, so without a traceback. Collected last, asyncio logged it as a bare
  "ValueError: OUT_OF_RANGE: Error writing ..." line after ftjax's one-line error (a flaky CI
  failure of the full-disk test). It is dropped when it names a file in a checkpoint folder of
  this process; the same error about any other file is still logged."""
  import asyncio
  import gc
  folder = Checkpointer(str(tmp_path / "run")).directory

  class Records(logging.Handler):
    def __init__(self):
      super().__init__()
      self.seen = []

    def emit(self, record):
      self.seen.append(record.getMessage())

  def abandon(path):
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(ValueError(f'OUT_OF_RANGE: Error writing "{path}": File too large'))
    loop.close()
    del future
    gc.collect()

  records = Records()
  logging.getLogger("asyncio").addHandler(records)
  try:
    abandon(os.path.join(folder, "40.orbax-checkpoint-tmp", "state", "d", "27dc"))
    assert records.seen == []
    abandon(str(tmp_path / "elsewhere" / "file"))
    assert len(records.seen) == 1 and "exception was never retrieved" in records.seen[0]
  finally:
    logging.getLogger("asyncio").removeHandler(records)


def test_sigint_and_sigterm_set_the_stop_flag_and_a_second_ctrl_c_stops_at_once():
  from ftjax.preemption import StopOnSignal
  before = signal.getsignal(signal.SIGINT)
  for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
    with StopOnSignal() as stop:
      os.kill(os.getpid(), signum)
      time.sleep(0.01)  # the handler runs between bytecodes
      assert stop.signal == name
      if signum == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt):
          os.kill(os.getpid(), signal.SIGINT)
          time.sleep(0.01)
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored
