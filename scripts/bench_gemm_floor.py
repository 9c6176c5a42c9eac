"""The GEMM floor of one LoRA train step: XLA's and torch's matmul speed on the step's own shapes.

  python scripts/bench_gemm_floor.py [--tokens 1024]

A LoRA step on a frozen base runs every projection twice (forward x @ W and input gradient
dy @ W^T) plus the vocab head both ways. This times each of those GEMM shapes in isolation, in
XLA (jax.jit) and in torch (the library under HF PEFT), and prints their speeds and the sum of
the isolated GEMM times per step: no framework can run the step faster than its GEMM floor, so
the two floors bound the ratio any JAX step can reach against PEFT on this machine.
Shapes are SmolLM2-135M's (d=576, kv=192, mlp=1536, vocab=49152, 30 layers).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def step_gemms(d=576, kv=192, f=1536, vocab=49152, layers=30) -> dict:
  """(K, N) -> how many [tokens, K] x [K, N] GEMMs one frozen-base step runs."""
  counts: dict = {}
  for k, n in [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]:  # q k v o gate up down
    for shape in ((k, n), (n, k)):  # forward, input gradient
      counts[shape] = counts.get(shape, 0) + layers
  counts[(d, vocab)] = counts.get((d, vocab), 0) + 1
  counts[(vocab, d)] = counts.get((vocab, d), 0) + 1
  return counts


def median_time(fn, reps: int) -> float:
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, default=1024, help="batch x seq")
  parser.add_argument("--reps", type=int, default=15)
  args = parser.parse_args()
  import torch
  m = args.tokens
  rows, floor_xla, floor_torch, flops = [], 0.0, 0.0, 0
  for (k, n), count in step_gemms().items():
    x, w = jnp.ones((m, k)), jnp.full((k, n), 0.01)
    matmul = jax.jit(jnp.matmul)
    t_xla = median_time(lambda: matmul(x, w).block_until_ready(), args.reps)
    xt, wt = torch.ones(m, k), torch.full((k, n), 0.01)
    t_torch = median_time(lambda: xt @ wt, args.reps)
    f = 2 * m * k * n
    rows.append({"k": k, "n": n, "per_step": count, "xla_gflops": f / t_xla / 1e9,
                 "torch_gflops": f / t_torch / 1e9})
    floor_xla += count * t_xla
    floor_torch += count * t_torch
    flops += count * f
  print(json.dumps({"tokens": m, "torch_threads": torch.get_num_threads(), "gemms": rows,
                    "gflop_per_step": flops / 1e9, "floor_xla_s": floor_xla,
                    "floor_torch_s": floor_torch, "floor_ratio": floor_xla / floor_torch}))


if __name__ == "__main__":
  main()
