"""One program on many hosts, on JAX's own runtime (`jax.distributed`, XLA SPMD).

Every process runs the same `train()`: it joins the others (`initialize`), holds only its own
devices' shards, reads only its share of the data (`batch_share`) and hands its rows to
`global_batch`, which assembles the global batch with `jax.make_array_from_process_local_data`.
Files that describe the run as a whole (metrics, reports, exports) are written by process 0
(`is_main`); orbax coordinates the checkpoint writes itself. On one process every function here
is the single-machine behaviour.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from ftjax.errors import FtjaxError

log = logging.getLogger("ftjax.distributed")

# Launchers that start one process per host and tell it about the others; with one of these in
# the environment `jax.distributed.initialize()` finds coordinator, count and id by itself.
_CLUSTER_ENV = (
    ("SLURM_NTASKS", "SLURM"),  # GPU clusters under SLURM (srun)
    ("OMPI_COMM_WORLD_SIZE", "Open MPI"),  # mpirun
    ("TPU_WORKER_HOSTNAMES", "a multi-host TPU slice"),  # comma-separated, one per host
)


def launcher() -> str | None:
  """The multi-process launcher detected in the environment, or None (one process)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  for var, name in _CLUSTER_ENV:
    value = os.environ.get(var, "")
    count = len(value.split(",")) if var == "TPU_WORKER_HOSTNAMES" else int(value or 0)
    if count > 1:
      return name
  return None


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               mode: str = "auto") -> bool:
  """`jax.distributed.initialize` when this process is one of several; True if it was called.

  mode "auto": when a coordinator is given or a launcher is detected (`launcher()`); "on":
  always (JAX detects the rest, e.g. a TPU pod slice's metadata); "off": never. Must run before
  anything asks JAX for its devices.
  """
  if mode == "off" or jax.distributed.is_initialized():
    return False
  found = "the config" if coordinator else launcher()
  if mode == "auto" and not found:
    return False
  if coordinator and (":" not in coordinator or num_processes < 1
                      or not 0 <= process_id < num_processes):
    raise FtjaxError(f"config: distributed.coordinator={coordinator!r} (host:port) needs "
                     f"distributed.num_processes >= 1 and 0 <= distributed.process_id < "
                     f"num_processes (got {num_processes}, {process_id})")
  jax.distributed.initialize(coordinator_address=coordinator or None,
                             num_processes=num_processes or None,
                             process_id=None if process_id < 0 else process_id)
  log.info("joined %d processes as process %d (%s); %d local of %d devices",
           jax.process_count(), jax.process_index(), found or "detected by JAX",
           jax.local_device_count(), jax.device_count())
  return True


def is_main() -> bool:
  """Process 0 writes what describes the whole run (metrics, config, reports, exports)."""
  return jax.process_index() == 0


def batch_share(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int) -> tuple[int, int]:
  """(index, count): this process supplies slice `index` of `count` equal slices of the global
  batch along `axis` -- the rows its devices hold. Processes whose devices hold the same rows
  (a tensor-parallel group spanning hosts) get the same slice and must read the same data."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    part = index[axis]
    rows.update(range(*part.indices(global_shape[axis])))
  start, size = min(rows), len(rows)
  if rows != set(range(start, start + size)) or global_shape[axis] % size or start % size:
    raise FtjaxError(f"mesh: process {jax.process_index()} holds batch rows {sorted(rows)}, not "
                     "one contiguous equal share; order the mesh's devices by process")
  return start // size, global_shape[axis] // size


def global_batch(local: dict, sharding: NamedSharding, global_shape: tuple[int, ...]) -> dict:
  """Global arrays from this process's rows (its `batch_share`), sharded by `sharding`; no
  process ever holds the whole batch."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), global_shape)
          for k, v in local.items()}


def any_process(*flags: bool) -> tuple[bool, ...]:
  """Each flag True on every process when it is True on any: decisions (stop, checkpoint now)
  that all must take together, or the next collective would wait forever."""
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(f) for f in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))
