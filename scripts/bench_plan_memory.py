"""ftjax.plan's figure against the memory a real train step uses on the CPU mesh.

  python scripts/bench_plan_memory.py --config configs/quickstart.py --devices 8 [--mesh data=1,fsdp=8]

Runs in one fresh process with N host CPU devices: plans the config (abstract, nothing
loaded), then sets the same run up for real, compiles and runs one warm step, and measures:

  live      bytes of every addressable shard of the state, the frozen params and the batch
            (exact, read from the arrays), summed over the devices
  step      the rise of the process's anonymous resident memory (RssAnon, sampled every
            millisecond) over its level just before the next steps, while they run: the
            temporaries and outputs of the 8 device programs executing together
  measured  live + step, over all devices; the plan's figure is per device, times N.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

from peak_rss import PeakRss  # scripts/ is on sys.path when a script runs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--mesh", default="data=1,fsdp=8")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--set", action="append", default=[], help="config changes, key=value")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import gc
  import importlib.util

  import jax
  from ftjax import plan as plan_lib
  from ftjax.run import init_or_restore, jit_train_step, setup
  from ftjax.data import packing

  spec = importlib.util.spec_from_file_location("bench_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  changes = {f"mesh.{k}": v for k, v in plan_lib.parse_mesh(args.mesh).items()}
  for item in args.set:
    key, value = item.split("=", 1)
    changes[key] = type(module.get_config()[key.split(".")[0]][key.split(".")[1]])(value)
  config = plan_lib.with_changes(module.get_config(), changes)

  planned = plan_lib.plan(config)
  run = setup(config)
  state, _ = init_or_restore(run, None)
  cfg = config.train
  accum, micro = cfg.grad_accum, cfg.batch_size // cfg.grad_accum
  loader = run.train_ds.batches(cfg.batch_size, seed=cfg.seed)
  batch_sharding = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None))

  def next_batch():
    rows = loader.next_batch(cfg.batch_size)
    return jax.device_put({k: rows[k].reshape(accum, micro, -1) for k in packing.FIELDS},
                          batch_sharding)

  batch = next_batch()
  step = jit_train_step(run, state).lower(state, run.frozen, batch).compile()
  state, metrics = step(state, run.frozen, batch)  # warm: first-run allocations happen here
  jax.block_until_ready(metrics)
  batches = [next_batch() for _ in range(args.steps)]
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  live = sum(s.data.nbytes for x in jax.tree.leaves((state, run.frozen, batches[0]))
             for s in x.addressable_shards)
  with PeakRss() as rss:
    for b in batches:
      state, metrics = step(state, run.frozen, b)
      jax.block_until_ready(metrics)
  n = len(run.mesh.devices.flat)
  measured = live + rss.rise
  mem = step.memory_analysis()
  print(json.dumps({
      "config": args.config, "mesh": dict(run.mesh.shape), "method": config.method,
      "planned_per_device_mib": round(planned.total / 2**20, 1),
      "planned_all_devices_mib": round(planned.total * n / 2**20, 1),
      "planned_temp_per_device_mib": round(planned.temporaries / 2**20, 1),
      "real_step_temp_per_device_mib": round(mem.temp_size_in_bytes / 2**20, 1),
      "live_arrays_mib": round(live / 2**20, 1), "step_rise_mib": round(rss.rise / 2**20, 1),
      "measured_all_devices_mib": round(measured / 2**20, 1),
      "plan_over_measured": round(planned.total * n / measured, 3)}), flush=True)


if __name__ == "__main__":
  main()
