"""`train.lr = "auto"`: the learning rate chosen by measurement (the learning-rate probe).

Before the first step, each candidate rate trains `steps_each` steps FROM THE SAME START (the
same initial state, the same batches, in the same order) and is scored by the loss on a slice
of the train split held out from those steps (never the eval split: choosing on it would leak
the eval into the run). One compiled train step serves every candidate: the rate is an
`optax.inject_hyperparams` hyper-parameter, an array in the optimizer state, so changing it is
a new argument value, not a new program (tests/test_lr_probe.py checks one compile).

  candidates  five rates, log-spaced over two orders of magnitude, by method (CANDIDATES; the
              published practice behind each range is in docs/methods.md, "Learning rate").
  budget      the probe's steps (candidates x steps_each) at most BUDGET_FRACTION (20%) of the
              run's train.steps: steps_each = min(MAX_STEPS_EACH, 20% x steps // 5); under
              MIN_STEPS_EACH a candidate's loss says too little and the probe is skipped (with a
              message), the rate falling back to ftjax/data/auto.py's table. So a run needs
              >= 100 steps to afford it. Skipped too for objectives without a loss on fixed rows
              (GRPO samples its rows from the policy) and for sharded train data.
  choice      a candidate is out when a step was not finite, its held-out loss is not finite, or
              its held-out loss is above the untrained start's (it made the model worse: the
              start of divergence). Among the rest the largest rate whose held-out loss is within
              TIE (1%) of the lowest: a few steps favour small, safe rates over ones that win
              later (the short-horizon bias of Wu et al. 2018), and the run's cosine decay
              lowers the rate it trains at anyway. All out: the table's rate.

The probe's rates, held-out losses and the choice go to the log, WORKDIR/auto.json (every
"auto" value and how it was chosen) and the report. A resumed run reads the choice back from
auto.json instead of probing again (its checkpoint was trained at that rate).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time

import jax
import numpy as np
import optax

from ftjax import step as step_lib
from ftjax.data.lr_plan import choose, table_text
from ftjax.files import write_json
from ftjax.optim import make_optimizer
from ftjax.parallel import distributed
from ftjax.run import jit_init_state, jit_train_step, step_parts

log = logging.getLogger("ftjax.lr_probe")

AUTO_JSON = "auto.json"


# --- the probe ------------------------------------------------------------------------------

def resolve_lr(run, report: dict, workdir: str, resuming: bool):
  """Runs the probe when the data check planned one (report["lr_probe"], train.lr "auto"), sets
  train.lr and the run's optimizer to its choice, writes WORKDIR/auto.json -> the run."""
  planned = report.get("lr_probe")
  path = os.path.join(workdir, AUTO_JSON)
  if planned is None:  # train.lr was a number (other keys may still be "auto")
    _write_auto(path, report, None)
    return run
  if "skipped" not in planned and not hasattr(run.train_ds, "rows"):  # ftjax.data.loader.Shards
    planned = {"skipped": "the train data is sharded over processes: the probe needs every row"}
  saved = _read(path) if resuming else None
  if saved and saved.get("lr_probe", {}).get("chosen") is not None:
    result = saved["lr_probe"]
    log.info("train.lr=%g: the probe's choice when this run started (%s)", result["chosen"], path)
  elif "skipped" in planned:
    result = {"chosen": None, "skipped": planned["skipped"], "table_lr": run.config.train.lr}
    log.info("lr probe skipped: %s; train.lr=%g from the fixed table", planned["skipped"],
             run.config.train.lr)
  else:
    result = probe(run, planned)
    log.info("lr probe:\n%s", table_text(result))
  _write_auto(path, report, result)
  if result.get("chosen") is None:
    return run
  return with_lr(run, result["chosen"])


def with_lr(run, lr: float):
  """`run` training at `lr`: train.lr set and the optimizer (and its schedule) rebuilt."""
  run.config.train.lr = float(lr)
  optimizer, schedule, _ = step_parts(run.config, run.trainable, run.model_cfg, run.mesh)
  return dataclasses.replace(run, optimizer=optimizer, schedule=schedule)


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_auto(path: str, report: dict, probe_result: dict | None) -> None:
  """WORKDIR/auto.json: each "auto" value, how it was chosen, and the probe's table."""
  values = dict(report.get("auto_values") or {})
  if not values or not distributed.is_main():
    return
  how = {k: "the fixed rule (ftjax/data/auto.py)" for k in values}
  if probe_result is not None and probe_result.get("chosen") is not None:
    values["train.lr"], how["train.lr"] = probe_result["chosen"], "measured by the lr probe"
  out = {"resolved": values, "how": how, "reasons": report.get("auto") or []}
  if probe_result is not None:
    out["lr_probe"] = probe_result
  write_json(path, out)


def probe(run, planned: dict) -> dict:
  """Trains each candidate rate `planned["steps_each"]` steps from the same start on the same
  batches with one compiled step; scores each by the held-out loss -> the result (see choose)."""
  t0 = time.perf_counter()
  held, train_rows = _split_rows(run, planned["held_out_rows"])
  probe_run, init = _probe_run(run, planned["steps_each"])
  state = init()
  batches = [run.place_batch(_take(train_rows, i, run.config.train.batch_size))
             for i in range(planned["steps_each"])]
  compiled = _compile(probe_run, state, batches[0])
  held_out_loss = _held_out_loss_fn(run, held)
  start_loss = held_out_loss(state["trainable"])
  rows = []
  for lr in planned["candidates"]:
    state = _with_rate(init(), lr)
    losses, finite = [], True
    for batch in batches:
      state, metrics = compiled(state, run.frozen, batch)
      losses.append(float(metrics["loss"]))
      finite = finite and bool(metrics["finite"])
    rows.append({"lr": lr, "held_out_loss": held_out_loss(state["trainable"]),
                 "train_losses": losses, "finite": finite})
    log.info("lr probe: lr %g -> held-out loss %.4f", lr, rows[-1]["held_out_loss"])
  result = choose(rows, start_loss)
  for r in rows:  # JSON has no NaN: a non-finite loss is written as null
    r["held_out_loss"] = _finite_or_none(r["held_out_loss"])
    r["train_losses"] = [_finite_or_none(x) for x in r["train_losses"]]
  result.update(steps_each=planned["steps_each"], held_out_rows=planned["held_out_rows"],
                seconds=round(time.perf_counter() - t0, 2))
  return result


def _finite_or_none(x: float) -> float | None:
  return x if math.isfinite(x) else None


# --- its pieces ---------------------------------------------------------------------------

def _split_rows(run, held_out: int) -> tuple[dict, dict]:
  """(held-out rows, the rest) of the packed train rows, after a fixed shuffle by train.seed."""
  rows = run.train_ds.rows
  n = next(iter(rows.values())).shape[0]
  order = np.random.default_rng(run.config.train.seed).permutation(n)
  held, rest = order[:held_out], order[held_out:]
  return {k: v[held] for k, v in rows.items()}, {k: v[rest] for k, v in rows.items()}


def _take(rows: dict, step: int, size: int) -> dict:
  """The rows of probe step `step`: the next `size` rows, wrapping around."""
  n = next(iter(rows.values())).shape[0]
  idx = (np.arange(size) + step * size) % n
  return {k: v[idx] for k, v in rows.items()}


def _probe_run(run, steps: int):
  """(the run with the probe's optimizer, a function giving the same initial state each call).
  The optimizer is the run's at rate 1 (constant, after the run's warmup cut to half the probe)
  times an injected `learning_rate`: AdamW's update is -lr x (its direction + decay), so this is
  exactly AdamW at that rate, LoRA+'s ratio included."""
  t = run.config.train
  base, _ = make_optimizer(
      run.trainable, lr=1.0, steps=steps, warmup_steps=min(t.warmup_steps, steps // 2),
      schedule="constant", weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps,
      max_grad_norm=t.max_grad_norm, lora_plus_ratio=run.config.lora.loraplus_lr_ratio)
  optimizer = optax.inject_hyperparams(
      lambda learning_rate: optax.chain(base, optax.scale(learning_rate)))(learning_rate=1.0)
  probe_run = dataclasses.replace(run, optimizer=optimizer, schedule=None)
  init = jit_init_state(probe_run)
  return probe_run, lambda: init(probe_run.trainable, probe_run.mutable)


def _with_rate(state: dict, lr: float) -> dict:
  """`state` with the injected rate set to `lr` (on the old value's device and sharding)."""
  opt = state["opt_state"]
  old = opt.hyperparams["learning_rate"]
  value = jax.device_put(np.asarray(lr, old.dtype), old.sharding)
  return dict(state, opt_state=opt._replace(hyperparams={**opt.hyperparams, "learning_rate": value}))


def _compile(probe_run, state, batch):
  """The probe's train step, compiled once for every candidate."""
  return jit_train_step(probe_run, state).lower(state, probe_run.frozen, batch).compile()


def _held_out_loss_fn(run, held: dict):
  """trainable -> the mean loss per target over the held-out rows (eval mode, micro-batches)."""
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=run.graphdef, loss_fn=run.loss_fn))
  micro = run.config.train.batch_size // run.config.train.grad_accum
  n = next(iter(held.values())).shape[0]
  batches = [run.place_eval_batch({k: v[i:i + micro] for k, v in held.items()})
             for i in range(0, n, micro)]

  def loss(trainable) -> float:
    total = count = 0.0
    for batch in batches:
      out = eval_fn(trainable, run.frozen, run.mutable, batch)
      total, count = total + float(out["loss_sum"]), count + float(out["count"])
    return total / max(count, 1.0)
  return loss
