"""Train-step throughput of ftjax, optionally side by side with HF transformers + peft.

  python scripts/bench_train.py --config configs/quickstart.py --batch 8 --seq 128 [--vs-peft]

Trains on random tokens of shape [batch, seq] with the config's model and method and prints one
JSON line: tokens_per_s, step_s (median of --steps after --warmup), compile_s, model FLOPs per
step, MFU against a measured f32 matmul ceiling on CPU (the device's peak on GPU/TPU), peak host
RSS and device memory. With --vs-peft the same weights, batch and sequence length are trained
by transformers + peft (LoRA, same rank/alpha/targets, AdamW) in a child process, and the line
also carries their tokens/s and the ratio. Run on an otherwise idle machine: the two are
measured one after the other, so noise shows up in the ratio.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

# Published bf16 dense peaks (FLOP/s) for MFU on accelerators.
DEVICE_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "v5e": 197e12, "v4": 275e12,
                "v5p": 459e12, "v6e": 918e12, "L4": 121e12, "4090": 165e12}


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def matmul_ceiling(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
  """Measured FLOP/s of one large jnp.dot: the honest 'peak' of a CPU."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times)


def peak_flops() -> tuple[float, str]:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return matmul_ceiling(), "measured f32 matmul ceiling"
  kind = device.device_kind
  for name, flops in DEVICE_PEAKS.items():
    if name.lower() in kind.lower():
      return flops * len(jax.devices()), f"{kind} bf16 peak x{len(jax.devices())}"
  return float("nan"), f"unknown peak for {kind}"


def random_batch(rng, batch: int, seq: int, vocab: int, accum: int = 1) -> dict:
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((batch, seq), np.float32),
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}
  return {k: v.reshape(accum, batch // accum, seq) for k, v in rows.items()}


def bench_ftjax(config, batch: int, seq: int, steps: int, warmup: int) -> tuple[dict, object]:
  from ftjax import step as step_lib
  from ftjax import train as train_lib
  from ftjax.flops import train_flops_per_token
  config.train.batch_size = batch
  config.data.seq_len = seq
  run = train_lib.setup(config, with_data=False)
  state, _ = train_lib.init_or_restore(run, None)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=run.loss_fn, optimizer=run.optimizer,
                                   schedule=run.schedule), donate_argnums=(0,))
  data = random_batch(np.random.default_rng(0), batch, seq, run.model_cfg.vocab_size,
                      config.train.grad_accum)
  t = time.perf_counter()
  compiled = step.lower(state, run.frozen, data).compile()
  compile_s = time.perf_counter() - t
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, metrics = compiled(state, run.frozen, data)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  n_lora = sum(x.size for x in jax.tree.leaves(state["trainable"])) if config.method == "lora" else 0
  flops = batch * seq * train_flops_per_token(run.model_cfg, seq, full=config.method == "full",
                                              lora_params=n_lora)
  peak, peak_source = peak_flops()
  out = {"framework": "ftjax", "device": jax.devices()[0].device_kind, "devices": len(jax.devices()),
         "model": config.model.name_or_path, "method": config.method, "dtype": config.model.dtype,
         "remat": config.model.remat, "scan_unroll": config.model.scan_unroll, "batch": batch, "seq": seq,
         "tokens_per_s": batch * seq / step_s, "step_s": step_s, "step_s_all": times,
         "compile_s": compile_s, "flops_per_step": flops,
         "achieved_flops_per_s": flops / step_s, "peak_flops_per_s": peak, "peak_source": peak_source,
         "mfu": flops / step_s / peak, "loss": float(metrics["loss"])}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  out["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return out, run


def bench_peft_child(model_dir: str, batch: int, seq: int, steps: int, warmup: int, rank: int,
                     alpha: float, dtype: str) -> dict:
  """Runs in a child process: transformers + peft LoRA training on the same weights."""
  import torch
  import transformers
  import peft
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
  model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  return {"framework": "peft", "torch": torch.__version__, "transformers": transformers.__version__,
          "peft": peft.__version__, "threads": torch.get_num_threads(),
          "tokens_per_s": batch * seq / step_s, "step_s": step_s, "step_s_all": times,
          "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--method", choices=["lora", "full"], default=None)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  parser.add_argument("--remat", default=None)
  parser.add_argument("--scan-unroll", type=int, default=None, help="-1 unrolls every layer")
  parser.add_argument("--vs-peft", action="store_true")
  parser.add_argument("--peft-child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.peft_child:  # we are the child: args.peft_child is the JSON of its arguments
    print(json.dumps(bench_peft_child(**json.loads(args.peft_child))))
    return

  config = load_config(args.config)
  if args.method:
    config.method = args.method
  if args.dtype:
    config.model.dtype = args.dtype
  if args.remat:
    config.model.remat = args.remat
  if args.scan_unroll is not None:
    config.model.scan_unroll = args.scan_unroll
  result, run = bench_ftjax(config, args.batch, args.seq, args.steps, args.warmup)
  if args.vs_peft:
    if config.method != "lora":
      raise SystemExit("--vs-peft compares LoRA training; use a LoRA config")
    from ftjax.models.hf import save_hf_config, save_hf_params
    from ftjax import step as step_lib
    with tempfile.TemporaryDirectory() as model_dir:
      base = jax.device_get(step_lib.combine(run.trainable, run.frozen)["base"])
      save_hf_params(base, run.model_cfg, model_dir)
      save_hf_config(run.model_cfg, model_dir)
      del run, base
      child_args = dict(model_dir=model_dir, batch=args.batch, seq=args.seq, steps=args.steps,
                        warmup=args.warmup, rank=config.lora.rank, alpha=config.lora.alpha,
                        dtype=config.model.dtype)
      proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--peft-child",
                             json.dumps(child_args)], capture_output=True, text=True)
      if proc.returncode:
        raise SystemExit(f"peft run failed:\n{proc.stderr[-3000:]}")
      ref = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peft"] = ref
    result["ratio_vs_peft"] = result["tokens_per_s"] / ref["tokens_per_s"]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
