"""Two processes on JAX's own distributed runtime (`jax.distributed.initialize` on 127.0.0.1,
CPU collectives over gloo), 2 CPU devices each, run the CLI as two hosts would: each reads and
tokenises only its half of the data (counted), SIGTERM to one of them stops both after the same
step with a checkpoint, the relaunch resumes, and the result matches one process on 4 devices
given the same two data shards.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ftjax import train as train_lib
from ftjax.checkpoint import Checkpointer
from ftjax.data import quickstart_task
from conftest import FAST_COMPILE
from test_faults import config_file, losses, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
N_TRAIN = 48


@pytest.fixture(scope="module")
def overrides(model_dir, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  quickstart_task.write_splits(str(data_dir), n_train=N_TRAIN, n_eval=8, seed=3)
  return {"model.name_or_path": model_dir, "data.train": str(data_dir / "train.jsonl"),
          "data.eval": str(data_dir / "eval.jsonl"), "data.seq_len": 128,
          "train.steps": STEPS, "train.batch_size": 8, "train.lr": 1e-3, "train.warmup_steps": 0,
          "train.log_every": 1, "train.eval_every": 0, "train.checkpoint_every": 10,
          "mesh.data": -1, "eval.forgetting": False, "eval.report": False}  # not under test here


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(overrides, tmp_path, workdir):
  """Both processes of a 2-host run; each has 2 CPU devices."""
  cfg = config_file(tmp_path / "cfg.py", overrides)
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}",
             JAX_DEFAULT_MATMUL_PRECISION="highest",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)  # the relaunch reuses it
  return [subprocess.Popen(
      [sys.executable, "-m", "ftjax.train", "--config", cfg, "--workdir", workdir,
       f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2",
       f"--config.distributed.process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(procs, timeout=300):
  outs = [p.communicate(timeout=timeout)[1] for p in procs]
  for p, err in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return outs


def test_two_processes_train_checkpoint_resume_and_match_one_process(overrides, tmp_path):
  workdir = str(tmp_path / "two")
  procs = launch(overrides, tmp_path, workdir)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + 300
  while not (os.path.exists(metrics) and losses(workdir) and losses(workdir)[-1][0] >= 3):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
        [p.communicate()[1][-3000:] for p in procs if p.poll() is not None]
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)  # one host is preempted: both must stop together
  first = finish(procs)
  stopped = max(s for s, _ in losses(workdir))
  assert stopped < STEPS
  assert f"stopped by a signal to another process after step {stopped}; checkpoint saved" in first[0]
  assert f"stopped by SIGTERM after step {stopped}; checkpoint saved" in first[1]
  assert Checkpointer(workdir).latest_step() == stopped

  # Each process read and tokenised only its half of the examples (its data shard).
  for i, err in enumerate(first):
    counts = re.findall(r"train data: shards \[(\d+)\] of 2: (\d+) examples", err)
    assert counts == [(str(i), str(N_TRAIN // 2))], err[-3000:]

  second = finish(launch(overrides, tmp_path, workdir))
  assert f"restored checkpoint at step {stopped}" in second[0]
  assert json.load(open(os.path.join(workdir, "summary.json")))["steps"] == STEPS

  # One process on 4 devices with the same two data shards: the same run.
  single = str(tmp_path / "one")
  train_lib.train(make_config(overrides, **{"mesh.data": 4, "data.shards": 2}), single)
  two, one = losses(workdir), losses(single)
  assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, STEPS + 1))
  # 1e-5 relative: only the reduction order across processes differs (gloo vs in-process).
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
  a = load_file(os.path.join(workdir, "adapter", "adapter_model.safetensors"))
  b = load_file(os.path.join(single, "adapter", "adapter_model.safetensors"))
  assert sorted(a) == sorted(b)
  for key in a:
    assert np.linalg.norm(a[key] - b[key]) <= 1e-5 * np.linalg.norm(b[key]), key
  ev_two = json.load(open(os.path.join(workdir, "summary.json")))["eval"]["loss"]
  ev_one = json.load(open(os.path.join(single, "summary.json")))["eval"]["loss"]
  assert abs(ev_two - ev_one) <= 1e-5 * abs(ev_one)


def test_sharded_loader_parts_make_the_one_process_batches_and_resume():
  """Two processes' parts (shards [0] and [1] of 2), micro-batch by micro-batch, are the rows one
  process holding both shards returns; a position saved mid-epoch resumes on either layout."""
  from ftjax.data.loader import ShardedLoader
  from ftjax.data.packing import FIELDS
  rng = np.random.RandomState(0)
  shards = {i: {k: rng.randint(0, 100, (n, 4)).astype(np.int32) for k in FIELDS}
            for i, n in ((0, 7), (1, 5))}  # unequal: positions differ per shard, not `consumed`
  both = ShardedLoader(shards, 2, accum=2, seed=3)
  parts = [ShardedLoader({i: shards[i]}, 2, accum=2, seed=3) for i in (0, 1)]
  for _ in range(5):  # crosses epoch boundaries of both shards
    whole = both.next_batch(8)["inputs"].reshape(2, 4, 4)  # [accum, micro, seq]
    mine = [p.next_batch(8)["inputs"].reshape(2, 2, 4) for p in parts]
    np.testing.assert_array_equal(whole, np.concatenate(mine, axis=1))
  state = json.loads(json.dumps(both.get_state()))
  assert state == {"seed": 3, "num_shards": 2, "consumed": 20}
  resumed = ShardedLoader({1: shards[1]}, 2, accum=2, state=state)
  np.testing.assert_array_equal(resumed.next_batch(8)["inputs"], parts[1].next_batch(8)["inputs"])
  with pytest.raises(Exception, match="checkpoint is for 2 data shard"):
    ShardedLoader({0: shards[0]}, 4, state=state)


def test_launchers_are_detected_and_a_bad_coordinator_config_is_refused(monkeypatch):
  from ftjax.errors import FtjaxError
  from ftjax.parallel import distributed
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.launcher() is None
  assert distributed.initialize() is False  # one process: nothing to join
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0")  # a single-host TPU VM
  assert distributed.launcher() is None
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1")
  assert distributed.launcher() == "a multi-host TPU slice"
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.launcher() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.launcher() == "SLURM"
  with pytest.raises(FtjaxError, match=r"distributed.coordinator='127.0.0.1:1' \(host:port\) needs .*\(got 2, 5\)"):
    distributed.initialize("127.0.0.1:1", 2, 5)
  with pytest.raises(FtjaxError, match=r"distributed.coordinator='localhost' \(host:port\)"):
    distributed.initialize("localhost", 2, 0)
