"""The cost plan: what a run will take, before it starts.

  probe(config, steps)  loads the model, compiles the real train step (ftjax.run's `setup`,
                        `init_or_restore`, `jit_train_step`) and times `steps` steps after a
                        warm-up step: the measured seconds per step on this machine, XLA's memory
                        accounting of the compiled step, the model's FLOPs per token.
  ftjax.cost_plan.plan(config, train, probed) turns a probe (or a Run, when training itself
                        is the probe) and the data check's counts into the plan: tokens, wall
                        time, FLOPs, dollars, peak memory. It is arithmetic only, so the data
                        check's report (ftjax.data.report) prices a run without the training
                        stack this module needs.

Why measured: a CPU's or an accelerator's speed on one model depends on the compiler, the
remat policy and the batch shape far more than on its peak FLOP/s, so the wall time here is
steps x the median probed step (the compile is reported apart). The accelerator lines are the
other way round, peak x MFU, because there is nothing here to measure them on.

Memory: on a CPU the device *is* the host, so the peak resident memory of a run is what is
resident once the step is compiled (interpreter, jax, data, weights, train state, the
executable: measured in the probe, before the first step) plus what one step allocates on top
(XLA's `memory_analysis`: temporaries, and outputs not written over donated inputs), or the
load's peak if that is higher. XLA's arguments + outputs + temporaries alone missed ~0.4 GiB
for SmolLM2 (the executable, allocator slack of the load). On an accelerator the step's bytes
(arguments + outputs + temporaries - donated) are what must fit in its memory
(`memory_stats()["bytes_limit"]`).

Hosted APIs bill every token of the training file once per epoch (OpenAI's `trained_tokens`),
not only the completion tokens a loss mask trains; both counts are in the plan.
"""

from __future__ import annotations

import logging
import os
import resource
import statistics
import time

from ftjax import run as run_lib
from ftjax.flops import run_flops_per_token

log = logging.getLogger("ftjax.cost")


def rss_bytes() -> int:
  """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def step_memory(compiled) -> dict:
  """XLA's accounting of a compiled step, in bytes."""
  mem = compiled.memory_analysis()
  return {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
          "temporaries": int(mem.temp_size_in_bytes), "donated": int(mem.alias_size_in_bytes),
          "step": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes)}


def model_facts(run, state) -> dict:
  """FLOPs per token and the sizes the plan needs, from a Run and its train state."""
  import jax
  n_train = sum(x.size for x in jax.tree.leaves(state["trainable"]))
  n_frozen = sum(x.size for x in jax.tree.leaves(run.frozen))
  weight_bytes = sum(x.size * x.dtype.itemsize
                     for x in jax.tree.leaves((state["trainable"], run.frozen)))
  return {"trainable_params": int(n_train), "params": int(n_train + n_frozen),
          "weight_bytes": int(weight_bytes),
          "flops_per_token": run_flops_per_token(run, state["trainable"])}


def probe(config, steps: int = 3) -> dict:
  """The real train step of `config`, compiled and timed here; see the module docstring."""
  import jax
  base_rss = rss_bytes()
  t = time.perf_counter()
  run = run_lib.setup(config, with_data=False)
  state, _ = run_lib.init_or_restore(run, None)
  load_s = time.perf_counter() - t
  load_peak = peak_rss_bytes()
  facts = model_facts(run, state)
  batch = run.objective.synthetic_batch(run.model_cfg.vocab_size)
  t = time.perf_counter()
  compiled = run_lib.jit_train_step(run, state).lower(state, run.frozen, batch).compile()
  compile_s = time.perf_counter() - t
  resident = rss_bytes()  # the runtime, data, weights, train state and the executable
  state, metrics = compiled(state, run.frozen, batch)  # warm-up: first-call allocations
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, run.frozen, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  device = jax.devices()[0]
  out = dict(facts, steps=steps, step_s=statistics.median(times), step_s_all=times,
             load_s=load_s, compile_s=compile_s, base_rss_bytes=base_rss,
             load_peak_rss_bytes=load_peak, compiled_rss_bytes=resident,
             probe_peak_rss_bytes=peak_rss_bytes(),
             memory=step_memory(compiled), platform=device.platform,
             device=device.device_kind, devices=len(jax.devices()),
             device_bytes_limit=(device.memory_stats() or {}).get("bytes_limit"))
  del state, compiled
  return out
