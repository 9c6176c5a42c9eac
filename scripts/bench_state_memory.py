"""Per-device bytes of the train state on a CPU mesh: params, Adam moments, frozen base.

  python scripts/bench_state_memory.py [--model smollm2-135m-instruct] [--method full] [--fsdp 8]

Reads each array's addressable shards on device 0 after `init_or_restore` (what a run holds),
and, beside it, the optimizer state as a plain `jax.jit(init_state)` lays it out when its output
shardings are left to XLA (ftjax before `sharding.like_params`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device0_bytes(tree, device) -> int:
  import jax
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--method", default="full")
  p.add_argument("--fsdp", type=int, default=8)
  args = p.parse_args()
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.fsdp}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from ftjax import config as config_lib
  from ftjax import run as run_lib
  from ftjax import step as step_lib

  c = config_lib.base_config()
  c.model.name_or_path, c.method = args.model, args.method
  c.data.train = "unused.jsonl"  # with_data=False: only validated as set
  c.mesh.data, c.mesh.fsdp = 1, args.fsdp
  run = run_lib.setup(c, with_data=False)
  state, _ = run_lib.init_or_restore(run, None)
  device = run.mesh.devices.flat[0]
  left_to_xla = jax.jit(functools.partial(step_lib.init_state, optimizer=run.optimizer, seed=0))(
      run.trainable, run.mutable)
  mib = lambda n: round(n / 2**20, 1)
  print(json.dumps({
      "model": args.model, "method": args.method, "mesh": dict(run.mesh.shape),
      "trainable_mib_per_device": mib(device0_bytes(state["trainable"], device)),
      "frozen_mib_per_device": mib(device0_bytes(run.frozen, device)),
      "opt_state_mib_per_device": mib(device0_bytes(state["opt_state"], device)),
      "opt_state_mib_per_device_left_to_xla": mib(device0_bytes(left_to_xla["opt_state"], device)),
      "opt_state_mib_total": mib(sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))),
  }))


if __name__ == "__main__":
  main()
