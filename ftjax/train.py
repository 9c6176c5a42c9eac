"""`python -m ftjax.train --config configs/<name>.py [--config.a.b=v ...] [--workdir DIR]`.

One run, in labelled phases: config -> model -> plug -> data -> mesh + shardings -> optimizer +
state (restored when the workdir has a checkpoint) -> loop (step, log, eval, checkpoint) -> end
(final eval, exports, generation eval vs the base model, summary). `train(config, workdir)` is
the library function behind the command; a notebook calls the same.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax import config as config_lib
from ftjax import evaluate, export
from ftjax import step as step_lib
from ftjax.checkpoint import Checkpointer
from ftjax.data import build_dataset
from ftjax.errors import FtjaxError, cli_errors
from ftjax.flops import train_flops_per_token
from ftjax.metrics import MetricWriter
from ftjax.models.params import logical_axes
from ftjax.models.resolve import resolve_model
from ftjax.optim import make_optimizer
from ftjax.parallel import sharding
from ftjax.peft.lora import LoRA
from ftjax.peft.plug import NO_PLUG, Plug

log = logging.getLogger("ftjax.train")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Run:
  """Everything `setup` builds; train() and export share it."""
  config: ml_collections.ConfigDict
  model_cfg: Any
  tokenizer: Any
  plug: Plug
  trainable: dict
  frozen: dict
  train_ds: Any
  eval_ds: Any
  mesh: Any
  optimizer: Any
  schedule: Any
  loss_fn: step_lib.LossFn


def make_plug(config) -> Plug:
  if config.method == "lora":
    c = config.lora
    return LoRA(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=config_lib.lora_targets(config),
                rslora=c.rslora, init_a=c.init_a)
  return NO_PLUG


def shrink_layers(params: dict, model_cfg, num_layers: int):
  """Keep the first `num_layers` layers (tests and `runlocal` configs)."""
  if not num_layers or num_layers >= model_cfg.num_layers:
    return params, model_cfg
  params = dict(params, layers=jax.tree.map(lambda x: x[:num_layers], params["layers"]))
  return params, model_cfg.replace(num_layers=num_layers)


def _prepare_data(config):
  if config.data.generate == "quickstart" and not os.path.exists(config.data.train):
    from ftjax.data import quickstart_task
    out_dir = os.path.dirname(config.data.train) or "."
    quickstart_task.write_splits(out_dir)
    log.info("wrote the quickstart dataset to %s", out_dir)


def setup(config: ml_collections.ConfigDict, with_data: bool = True) -> Run:
  config_lib.validate(config)

  # --- model ---
  param_dtype = np.float32 if config.model.param_dtype == "float32" else jnp.bfloat16
  model_cfg, params, tokenizer = resolve_model(config.model.name_or_path, dtype=param_dtype)
  params, model_cfg = shrink_layers(params, model_cfg, config.model.num_layers)

  # --- plug: adapter tree + which leaves train ---
  plug = make_plug(config)
  adapters = plug.init(jax.random.key(config.train.seed + 1), params, model_cfg)
  patterns = ["adapters/.*"] if config.method == "lora" else ["base/.*"]
  patterns += [p for p in config.extra_trainable.split(",") if p]
  tree = {"base": params, "adapters": adapters}
  trainable, frozen = step_lib.partition(tree, patterns)
  if not trainable:
    raise FtjaxError(f"config: nothing to train: no parameter path matches {patterns}")

  # --- data (validated before anything compiles) ---
  train_ds = eval_ds = None
  if with_data:
    _prepare_data(config)
    common = dict(seq_len=config.data.seq_len, format=config.data.format,
                  length_policy=config.data.length_policy,
                  system_prompt=config.data.system_prompt or None)
    train_ds = build_dataset(config.data.train, tokenizer, pack=config.data.pack, **common)
    log.info("train data: %s", train_ds.describe())
    if config.data.eval:
      eval_ds = build_dataset(config.data.eval, tokenizer, pack=False, **common)
      log.info("eval data: %s", eval_ds.describe())

  # --- mesh + shardings: params placed by their logical axes ---
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.batch_size // config.train.grad_accum
  if micro % batch_shards:
    raise FtjaxError(f"config: micro-batch {micro} (train.batch_size / train.grad_accum) is not "
                     f"divisible by the {batch_shards} data-parallel devices of the mesh")
  axes = {"base": logical_axes(model_cfg), "adapters": plug.axes(adapters, model_cfg)}
  train_axes, frozen_axes = step_lib.partition(axes, patterns)
  trainable = jax.device_put(trainable, sharding.tree_shardings(trainable, train_axes, mesh))
  frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, frozen_axes, mesh))

  optimizer, schedule = make_optimizer(
      trainable, lr=config.train.lr, steps=config.train.steps, warmup_steps=config.train.warmup_steps,
      schedule=config.train.schedule, weight_decay=config.train.weight_decay, b1=config.train.b1,
      b2=config.train.b2, eps=config.train.eps, max_grad_norm=config.train.max_grad_norm,
      lora_plus_ratio=config.lora.lr_ratio)
  unroll = True if config.model.scan_unroll == -1 else config.model.scan_unroll
  loss_fn = step_lib.LossFn(model_cfg, plug, dtype=DTYPES[config.model.dtype],
                            remat=config.model.remat, unroll=unroll,
                            vocab_chunk=config.train.vocab_chunk)
  return Run(config, model_cfg, tokenizer, plug, trainable, frozen, train_ds, eval_ds,
             mesh, optimizer, schedule, loss_fn)


def init_or_restore(run: Run, checkpointer: Checkpointer | None):
  """The sharded train state (restored from the latest checkpoint when there is one)."""
  state = jax.jit(functools.partial(step_lib.init_state, optimizer=run.optimizer,
                                    seed=run.config.train.seed))(run.trainable)
  data_state = None
  latest = checkpointer.latest_step() if checkpointer else None
  if latest is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, data_state = checkpointer.restore(latest, abstract)
    log.info("restored checkpoint at step %d", latest)
  return state, data_state


def evaluate_loss(run: Run, eval_fn, trainable, max_batches: int = 0) -> dict:
  if run.eval_ds is None:
    return {}
  loader = run.eval_ds.batches(run.config.train.batch_size // run.config.train.grad_accum,
                               shuffle=False, repeat=False)
  sums = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  for i, batch in enumerate(loader):
    if max_batches and i >= max_batches:
      break
    out = eval_fn(trainable, run.frozen, batch)
    sums = {k: sums[k] + float(out[k]) for k in sums}
  tokens = max(sums["tokens"], 1.0)
  return {"loss": sums["loss_sum"] / tokens, "accuracy": sums["correct"] / tokens}


def _write_json_atomic(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training; returns the summary that is also written to summary.json."""
  run = setup(config)
  cfg = run.config
  os.makedirs(workdir, exist_ok=True)
  _write_json_atomic(os.path.join(workdir, "config.json"), cfg.to_dict())
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):  # a finished run being re-run: the old summary is stale now
    os.remove(summary_path)
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  writer = MetricWriter(workdir)

  # --- baseline before training: the base model with a few-shot prompt ---
  baseline = None
  baseline_path = os.path.join(workdir, "baseline.json")
  if cfg.eval.generate:
    if checkpointer.latest_step() is not None and os.path.exists(baseline_path):
      with open(baseline_path) as f:  # resuming: the base model has not changed
        baseline = json.load(f)
    else:
      baseline = evaluate.generation_eval(run, adapters=None, few_shot=cfg.eval.few_shot)
      _write_json_atomic(baseline_path, baseline)
    log.info("baseline (base model, %d-shot): %s", cfg.eval.few_shot, evaluate.fmt(baseline))

  # --- state + compiled step ---
  state, data_state = init_or_restore(run, checkpointer)
  accum, micro = cfg.train.grad_accum, cfg.train.batch_size // cfg.train.grad_accum
  loader = run.train_ds.batches(cfg.train.batch_size, seed=cfg.train.seed, state=data_state)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, run.frozen)
  batch_sharding = NamedSharding(run.mesh, P(None, ("data", "fsdp"), None))
  metrics_sharding = sharding.replicated(run.mesh)
  train_step = jax.jit(
      functools.partial(step_lib.train_step, loss_fn=run.loss_fn, optimizer=run.optimizer,
                        schedule=run.schedule),
      in_shardings=(state_shardings, frozen_shardings, batch_sharding),
      out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, loss_fn=run.loss_fn))

  def next_batch():
    rows = loader.next_batch(cfg.train.batch_size)
    return {k: rows[k].reshape(accum, micro, -1) for k in step_lib.BATCH_KEYS}

  seq = cfg.data.seq_len
  n_adapter = sum(x.size for x in jax.tree.leaves(run.trainable)) if cfg.method == "lora" else 0
  flops_per_step = cfg.train.batch_size * seq * train_flops_per_token(
      run.model_cfg, seq, full=cfg.method == "full", lora_params=n_adapter)
  start_step = int(state["step"])
  # `position`: where the first batch not yet trained on starts; that is what a checkpoint saves
  # (the loader itself runs one batch ahead, fetching while the device computes).
  position = loader.get_state()
  batch = next_batch()
  t0 = time.perf_counter()
  compiled = train_step.lower(state, run.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  log.info("compiled the train step in %.1f s", compile_s)
  n_train = sum(x.size for x in jax.tree.leaves(state["trainable"]))
  log.info("training %s parameters (%s), steps %d..%d", f"{n_train:,}", cfg.method, start_step,
           cfg.train.steps)

  # --- loop ---
  from tqdm import tqdm
  bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", file=sys.stderr,
             dynamic_ncols=True, disable=None)
  window, window_t = [], time.perf_counter()
  for step in range(start_step, cfg.train.steps):
    state, metrics = compiled(state, run.frozen, batch)
    window.append(metrics)
    position = loader.get_state()
    if step + 1 < cfg.train.steps:
      batch = next_batch()  # overlaps with the device computing this step
    done = step + 1
    if done % cfg.train.log_every == 0 or done == cfg.train.steps:
      host = jax.device_get(window)
      elapsed = time.perf_counter() - window_t
      loss = float(np.mean([m["loss"] for m in host]))
      if not math.isfinite(loss):
        raise FtjaxError(f"step {done}: loss is {loss}; stopping (no checkpoint written for "
                         "this step). Lower train.lr or check the data.")
      tok_s = len(host) * cfg.train.batch_size * seq / elapsed
      out = {"loss": loss, "accuracy": float(np.mean([m["accuracy"] for m in host])),
             "grad_norm": float(host[-1]["grad_norm"]), "lr": float(host[-1]["lr"]),
             "tokens_per_s": tok_s, "model_tflops_per_s": flops_per_step * len(host) / elapsed / 1e12}
      writer.write(done, out, "train/")
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
      if bar.disable:  # no terminal (a log file, CI): one line per log interval instead
        eta = (cfg.train.steps - done) * elapsed / len(host)
        log.info("step %d/%d: loss %.4f, %.0f tokens/s, ETA %.0f s", done, cfg.train.steps, loss,
                 tok_s, eta)
      window, window_t = [], time.perf_counter()
    bar.update(1)
    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.steps:
      jax.block_until_ready(state)  # the step's own compute belongs to the train window
      eval_t = time.perf_counter()
      ev = evaluate_loss(run, eval_fn, state["trainable"], cfg.train.eval_batches)
      if ev:
        writer.write(done, ev, "eval/")
        bar.write(f"step {done}: eval loss {ev['loss']:.4f}, token accuracy {ev['accuracy']:.3f}",
                  file=sys.stderr)
      window_t += time.perf_counter() - eval_t  # keep eval time out of the next tokens/s
    if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
      checkpointer.save(done, state, position)
  bar.close()

  # --- end: checkpoint, final eval, exports, generation eval, summary ---
  final_step = int(state["step"])
  if checkpointer.latest_step() != final_step:  # checkpoint_every may have saved it already
    checkpointer.save(final_step, state, position)
  checkpointer.close()
  final_eval = evaluate_loss(run, eval_fn, state["trainable"])
  if final_eval:
    writer.write(final_step, final_eval, "eval/")
  trained_tree = step_lib.combine(state["trainable"], run.frozen)
  if cfg.method == "lora" and cfg.export.adapter:
    export.write_adapter(run.plug, trained_tree["adapters"], run.model_cfg,
                         os.path.join(workdir, "adapter"), cfg.model.name_or_path)
  if cfg.export.merged:
    export.write_merged(run.plug, trained_tree, run.model_cfg, run.tokenizer,
                        os.path.join(workdir, "merged"))
  finetuned = None
  if cfg.eval.generate:
    finetuned = evaluate.generation_eval(run, adapters=trained_tree["adapters"],
                                         base=trained_tree["base"], few_shot=0)
  writer.close()
  summary = {"steps": final_step, "method": cfg.method, "trainable_params": n_train,
             "compile_s": compile_s, "eval": final_eval, "baseline": baseline,
             "finetuned": finetuned, "train_data": run.train_ds.summary}
  _write_json_atomic(summary_path, summary)
  print(evaluate.report(summary), file=sys.stderr)
  return summary


# --- command line -----------------------------------------------------------------------

def main(argv=None) -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "a configs/<name>.py file", lock_config=True)
  flags.DEFINE_string("workdir", None, "output directory (default: workdirs/<config name>)")
  _parse_flags_and_train(sys.argv if argv is None else argv)


@cli_errors
def _parse_flags_and_train(argv) -> None:
  from absl import flags
  try:  # a typo in --config.a.b=v or a bad value: one line, not absl's traceback
    flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    if isinstance(e, KeyError) and e.args:
      key, *hint = str(e.args[0]).split("\n")
      message = f"unknown config key {key.strip(chr(39))!r}. {' '.join(hint)}"
    else:
      message = " ".join(str(e).split())
    raise FtjaxError(f"command line: {message}") from None
  # force: an import may already have configured the root logger (absl does), hiding INFO.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  cfg = flags.FLAGS.config
  if cfg is None:
    raise FtjaxError("--config is required, e.g. --config configs/quickstart.py")
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  train(cfg, flags.FLAGS.workdir or os.path.join("workdirs", name))


if __name__ == "__main__":
  main()
