"""Peak host memory of loading a model in float vs with its linear kernels quantised on the fly.

  python scripts/bench_load_memory.py MODEL [--types float,nf4,int8] [--mesh data=1,fsdp=8]

MODEL: anything ftjax.models.load takes (built-in name, HF directory, .gguf file). Each type
loads in a fresh child process, warmed first (tokenizer, jax runtime), then a thread samples the process's
anonymous resident memory (RssAnon: file-backed mmap pages of the checkpoint are not counted,
the kernel can drop them) every millisecond during the load. --warm loads once before the
measured load, so the one-off compilation of the quantiser is left out. Prints one JSON line per type:
the model's bytes and the peak over the warm process.

--mesh loads onto a mesh of that many host CPU devices (`ftjax.models.load(..., mesh=)`: each
param created sharded and filled as it is read). On a CPU mesh the devices' memory is this
process's memory, so the peak counts the sharded model itself: the host-copy-free load should
peak near the model's size, where loading to host arrays and then placing them held both.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys

from peak_rss import PeakRss  # scripts/ is on sys.path when a script runs


def child(model: str, kind: str, warm: bool, mesh_text: str = "") -> None:
  import gc
  import math
  import os
  mesh_sizes = {k: int(v) for k, v in (p.split("=") for p in mesh_text.split(",") if p)}
  if mesh_sizes:  # before jax starts
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={math.prod(mesh_sizes.values())}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  from flax import nnx
  from ftjax import models
  from ftjax.models.resolve import tokenizer_for
  from ftjax.parallel import sharding
  quantize = False if kind == "float" else dict(quant_type=kind)
  mesh = sharding.make_mesh(**mesh_sizes) if mesh_sizes else None
  tokenizer_for(model)
  jax.jit(lambda a: a + 1)(jnp.zeros(1))
  if warm:  # a first load compiles the quantiser's programs (one per kernel shape), then goes
    models.load(model, quantize=quantize, mesh=mesh)
    gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  with PeakRss() as rss:
    model_obj, _ = models.load(model, quantize=quantize, mesh=mesh)
  nbytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(model_obj)))
  print(json.dumps({"type": kind, "mesh": mesh_text or None, "model_mib": round(nbytes / 2**20),
                    "load_peak_mib": rss.rise // 2**20, "warm_quantiser": warm}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("model")
  parser.add_argument("--types", default="float,nf4")
  parser.add_argument("--warm", action="store_true", help="compile the quantiser before the load")
  parser.add_argument("--mesh", default="", help="e.g. data=1,fsdp=8: load onto a CPU mesh")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.model, args.child, args.warm, args.mesh)
  for kind in args.types.split(","):
    cmd = [sys.executable, __file__, args.model, "--child", kind, "--mesh", args.mesh] + (
        ["--warm"] if args.warm else [])
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
  main()
