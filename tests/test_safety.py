"""Nothing lost: exports never delete or replace files they did not write and never reach a
workdir's own files; adapter names cannot become paths out of the export folder; one writer per
workdir (a lock that a SIGKILLed holder cannot leave stale). Each check compares the user's
files byte for byte before and after."""

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from ftjax import export, models, peft
from ftjax import evaluate as evaluate_lib
from ftjax import run as run_lib
from ftjax import train as train_lib
from ftjax.checkpoint import Checkpointer
from ftjax.errors import FtjaxError
from ftjax.files import write_json
from ftjax.lock import WorkdirLock
from tiny import quickstart_data, run_config, tiny_model


def snapshot(root) -> dict:
  """{relative path: bytes} of every file under `root`."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def user_folder(path) -> dict:
  """A folder of someone's own files (one of them named like an export file), and its snapshot."""
  os.makedirs(os.path.join(path, "data"), exist_ok=True)
  for name, text in {"notes.txt": "mine", "data/train.jsonl": '{"a": 1}\n',
                     "model.bin": "not ftjax's"}.items():
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  return snapshot(path)


def lora_model():
  return peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.fixture(scope="module")
def workdir(model_dir, tmp_path_factory):
  """A LoRA run's workdir as training leaves it (config.json, a checkpoint, the adapter, its
  metrics), made from the run's own pieces without compiling a train step (~15 s saved)."""
  data = quickstart_data(tmp_path_factory, n_train=16, n_eval=8)
  path = str(tmp_path_factory.mktemp("run"))
  config = run_config(model_dir, data, with_eval=False, **{"train.steps": 2, "lora.rank": 2})
  run = run_lib.setup(config, with_data=False)
  state, _ = run_lib.init_or_restore(run, None)
  checkpointer = Checkpointer(path)
  checkpointer.save(2, state, {"epoch": 0, "row": 16})
  checkpointer.close()
  write_json(os.path.join(path, "config.json"), run.config.to_dict())
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write('{"step": 2, "train/loss": 4.2}\n')
  export.write_adapters(run.model(state["trainable"]), os.path.join(path, "adapter"), "base")
  return config, path


@contextlib.contextmanager
def warnings_of(logger: str):
  """The messages `logger` warns with in the block (a handler of its own: the CLIs' logging
  setup replaces the root handlers that pytest's caplog listens on)."""
  messages = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = lambda record: messages.append(record.getMessage())
  logging.getLogger(logger).addHandler(handler)
  try:
    yield messages
  finally:
    logging.getLogger(logger).removeHandler(handler)


def cli_error(main, argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


# --- 1. exports delete nothing they did not write -------------------------------------------

def test_save_adapter_and_save_pretrained_refuse_a_folder_of_other_files(tmp_path):
  model = lora_model()
  for i, save in enumerate([lambda out, **kw: peft.save_adapter(model, out, **kw),
                            lambda out, **kw: models.save_pretrained(tiny_model(), out, **kw)]):
    out = str(tmp_path / f"mine{i}")
    before = user_folder(out)
    with pytest.raises(FtjaxError, match=rf"{out}: the folder holds files .*notes.txt.*--overwrite"):
      save(out)
    assert snapshot(out) == before
    save(out, overwrite=True)  # the export's files written beside the user's, which stay
    after = snapshot(out)
    assert {k: after[k] for k in before} == before and len(after) > len(before)


def test_a_previous_export_is_replaced_keeping_what_ftjax_did_not_write(tmp_path):
  """Re-exporting into the same folder: the old export's files go (stale shards and their
  index would mix two models), a model card beside them stays."""
  out = str(tmp_path / "merged")
  model = tiny_model()
  models.save_pretrained(model, out, max_shard_size="20KB")  # several shards + index
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("my model card")
  models.save_pretrained(model, out)  # one file now
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
  assert open(os.path.join(out, "README.md")).read() == "my model card"
  assert load_file(os.path.join(out, "model.safetensors"))


def test_export_cli_never_writes_into_a_workdir_or_a_folder_of_other_files(workdir, tmp_path,
                                                                           monkeypatch, capsys):
  _, wd = workdir
  run_files = snapshot(wd)
  err = cli_error(export.main, ["--workdir", wd, "--merged", wd, "--no-adapter"], capsys)
  assert f"{wd}: this is a training workdir" in err
  err = cli_error(export.main, ["--workdir", wd, "--adapter", os.path.join(wd, "checkpoints"),
                                "--no-merged", "--overwrite"], capsys)
  assert "inside the checkpoints/ folder of the training workdir" in err
  project = tmp_path / "project"
  mine = user_folder(project)
  monkeypatch.chdir(project)
  err = cli_error(export.main, ["--workdir", wd, "--adapter", ".", "--no-merged"], capsys)
  assert ".: the folder holds files that are not a PEFT adapter export" in err
  assert snapshot(project) == mine and snapshot(wd) == run_files
  export.main(["--workdir", wd, "--adapter", ".", "--no-merged", "--overwrite"])
  after = snapshot(project)
  assert {k: after[k] for k in mine} == mine
  assert after["adapter_model.safetensors"] == run_files["adapter/adapter_model.safetensors"]


# --- 2. adapter names ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../victim", "a/b", "a.b", ""])
def test_adapter_names_peft_refuses_are_refused(name):
  model = lora_model()
  with pytest.raises(FtjaxError, match="adapter name"):
    peft.add_adapter(model, name, peft.LoraConfig(r=2, target_modules=["v_proj"]))
  assert list(peft.configs(model)) == ["default"]  # nothing attached


def test_write_adapters_stays_inside_its_folder(tmp_path):
  """Names are checked where adapters are added; the joined path is checked again, so a name
  slipped past that (set by hand here) still cannot reach a folder outside."""
  victim = tmp_path / "victim"
  mine = user_folder(victim)
  model = peft.add_adapter(lora_model(), "other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
  config = peft.configs(model)
  model.peft_config = type(model.peft_config)({"default": config["default"], "../../victim": config["other"]})
  out = tmp_path / "out" / "adapters"
  with pytest.raises(FtjaxError, match="not inside"):
    export.write_adapters(model, str(out), "base")
  assert snapshot(victim) == mine and not out.exists()


# --- 3. one writer per workdir ---------------------------------------------------------------

HOLDER = """
import sys, time
from ftjax.lock import WorkdirLock
WorkdirLock(sys.argv[1], "train").acquire()
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(workdir):
  """Another process holding the workdir's lock, as a running training does."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, workdir[1]], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "ready"
  yield proc
  proc.kill()
  proc.wait()


def test_a_second_writer_is_refused_while_the_first_runs(workdir, holder, capsys):
  config, wd = workdir
  run_files = snapshot(wd)
  with pytest.raises(FtjaxError, match=rf"{wd}: in use by train, pid {holder.pid} on \S+ since "):
    train_lib.train(config, wd)
  err = cli_error(export.main, ["--workdir", wd, "--no-merged"], capsys)  # into WORKDIR/adapter
  assert f"in use by train, pid {holder.pid}" in err
  err = cli_error(evaluate_lib.main, ["--workdir", wd], capsys)
  assert f"in use by train, pid {holder.pid}" in err
  assert snapshot(wd) == run_files
  # SIGKILL: the kernel drops the lock with the process; the next writer takes over at once.
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with warnings_of("ftjax.lock") as warned, WorkdirLock(wd, "test"):
    pass
  assert f"previous holder, train, pid {holder.pid}" in warned[0]


def test_the_lock_is_released_when_train_fails(workdir, tmp_path):
  config, _ = workdir
  broken = config.copy_and_resolve_references()
  broken.data.train = str(tmp_path / "missing.jsonl")
  new = str(tmp_path / "new")
  with pytest.raises(FtjaxError, match="missing.jsonl"):
    train_lib.train(broken, new)
  assert not os.path.exists(new)  # refused before writing anything: not even the workdir
  existing = str(tmp_path / "existing")
  os.makedirs(existing)
  with pytest.raises(FtjaxError, match="missing.jsonl"):
    train_lib.train(broken, existing)
  assert os.listdir(existing) == [".ftjax.lock"]  # train took the lock...
  with WorkdirLock(existing, "test"):  # ... and released it
    with pytest.raises(FtjaxError, match="in use by this process"):
      WorkdirLock(existing, "test").acquire()


def test_without_file_locks_the_holders_record_decides(tmp_path, monkeypatch):
  """A file system without flock (NFS mounted nolock): a live holder on this host is refused,
  a dead one's record is taken over."""
  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr("fcntl.flock", no_locks)
  wd = str(tmp_path)
  record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "then", "what": "train",
            "command": "x"}
  with open(os.path.join(wd, ".ftjax.lock"), "w") as f:
    json.dump(record, f)
  with pytest.raises(FtjaxError, match=rf"in use by train, pid {os.getpid()} .*delete"):
    WorkdirLock(wd, "test").acquire()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(os.path.join(wd, ".ftjax.lock"), "w") as f:
    json.dump(dict(record, pid=dead.pid), f)
  with warnings_of("ftjax.lock") as warned, WorkdirLock(wd, "test"):
    assert "does not support locks" in warned[0]
  assert os.path.getsize(os.path.join(wd, ".ftjax.lock")) == 0  # released: no record left
