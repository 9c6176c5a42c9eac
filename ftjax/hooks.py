"""The train loop's periodic actions: small objects the loop calls around every step.

The loop itself (`ftjax.train.run_loop`) only runs the compiled step, fetches the next batch and
calls its hooks. Everything else a step may trigger is a `Hook` here, called every `every` steps
as levanter's `every=n` hooks and tunix's training hooks are: the non-finite guard, logging, the
progress bar, periodic eval, early stopping with the best checkpoint, and checkpoints with the
collective preemption vote. The end of the run (final checkpoint, best state, final eval,
exports, summary) is a phase of its own in `ftjax.train`, not a hook.

A new objective adds what it needs (rollouts before a step, reference log-probs before the
first) as one more hook (`default_hooks(..., extra=...)`), without editing the loop; the order
of the list is the order the hooks run in (docs/design.md, "The loop").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from ftjax import evaluation
from ftjax.checkpoint import Checkpointer
from ftjax.errors import FtjaxError
from ftjax.evaluation import curves as curves_lib
from ftjax.files import write_json
from ftjax.parallel import distributed

log = logging.getLogger("ftjax.train")


@dataclasses.dataclass
class Loop:
  """What the hooks see, and may change, while the loop runs."""
  run: Any  # ftjax.run.Run
  workdir: str
  state: dict  # the train state (ftjax/step.py); replaced by each step
  batch: dict  # the batch the next step trains on (already placed on the mesh)
  position: dict  # the loader position of the first batch not yet trained on (what a checkpoint saves)
  checkpointer: Any  # ftjax.checkpoint.Checkpointer
  writer: Any  # ftjax.metrics.MetricWriter (or a no-op on processes other than 0)
  bar: Any  # the tqdm progress bar (disabled off a terminal and on processes other than 0)
  plan: Any  # ftjax.evaluate's generation-eval plan, or None
  eval_fn: Any  # the jitted eval step (ftjax.train.evaluate_loss runs it)
  stop: Any  # ftjax.preemption.StopOnSignal
  compiled: Any  # the compiled train step: (state, frozen, batch) -> (state, metrics)
  step: int = 0  # steps done
  metrics: dict | None = None  # the last step's metrics (device arrays)
  finite: bool = True  # whether the last step updated the state (ftjax/step.py's guard)
  n_train: int = 0  # trainable parameters
  flops_per_step: float = 0.0  # model FLOPs of one step (ftjax/flops.py)
  tokens_per_step: int = 0  # token positions of one step's rows (Objective.tokens_per_row)
  compile_s: float = 0.0
  excluded_s: float = 0.0  # time spent in evals, kept out of train_s and tokens/s
  train_s: float = 0.0  # the steps' wall time (set when the loop ends)
  stop_reason: str | None = None  # set by a hook to end the loop after this step
  preempted_by: str | None = None  # the signal that stopped the run (no end phase then)
  skipped: list = dataclasses.field(default_factory=list)  # steps the non-finite guard skipped
  train_curve: list = dataclasses.field(default_factory=list)  # (step, logged train loss)
  eval_curve: list = dataclasses.field(default_factory=list)  # (step, eval loss)
  last_eval: dict | None = None  # the periodic eval of this step ({} or None when none ran)
  # The end-of-run evaluation of the final state, when the periodic eval at the last step ran
  # it (evaluate.final_eval): the end phase reuses it instead of evaluating the same state twice.
  final: dict | None = None

  @property
  def config(self):
    return self.run.config

  @property
  def last_step(self) -> bool:
    return self.step == self.config.train.steps

  @contextlib.contextmanager
  def excluded(self):
    """Time spent inside counts neither as train time nor in the next tokens/s."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self.excluded_s += time.perf_counter() - t


class Hook:
  """One periodic action. Every method does nothing by default; `after_step` runs when `due`,
  which by default is every `every`-th step (0: never)."""
  every: int = 1

  def start(self, loop: Loop) -> None:
    """Once, before the first step of this process's run (the state restored, the step compiled)."""

  def before_step(self, loop: Loop) -> None:
    """Before each step. `loop.batch` may be replaced here (e.g. by rollouts of the current
    policy) with arrays of the same shapes and shardings: the step is compiled for those."""

  def due(self, loop: Loop) -> bool:
    return bool(self.every) and loop.step % self.every == 0

  def after_step(self, loop: Loop) -> None:
    """After a step, when `due`. Setting `loop.stop_reason` ends the loop here: the hooks after
    this one do not run for this step."""

  def close(self, loop: Loop) -> None:
    """When the loop has ended (finished, stopped early or preempted), before the end phase."""


class NonFiniteGuard(Hook):
  """A step whose loss or gradient is not finite left the state unchanged (ftjax/step.py):
  train.nonfinite="stop" stops the run naming the step, "skip" logs it and goes on."""

  def after_step(self, loop: Loop) -> None:
    if loop.finite:
      return
    loss = float(loop.metrics["loss"])
    if loop.config.train.nonfinite == "stop":
      raise FtjaxError(
          f"step {loop.step}: the loss ({loss}) or its gradient is not finite; stopping. The step "
          f"did not update the state and no checkpoint holds it (latest: "
          f"{loop.checkpointer.latest_step()}). Lower train.lr, check the data, or set "
          "train.nonfinite=skip.")
    log.warning("step %d: non-finite loss (%s) or gradient; update skipped", loop.step, loss)
    loop.skipped.append(loop.step)


class TrainLog(Hook):
  """train/loss, accuracy, grad_norm, lr, tokens/s and model TFLOP/s averaged over the steps
  since the last log line, every train.log_every steps and at the last step."""

  def __init__(self, every: int):
    self.every = every
    self.window: list = []  # the finite steps' metrics since the last line (device arrays)

  def start(self, loop: Loop) -> None:
    self._restart(loop)

  def _restart(self, loop: Loop) -> None:
    self.window, self.t, self.excluded_at = [], time.perf_counter(), loop.excluded_s

  def due(self, loop: Loop) -> bool:
    if loop.finite:  # collected every step, written when due
      self.window.append(loop.metrics)
    return bool(self.window) and (loop.last_step or super().due(loop))

  def after_step(self, loop: Loop) -> None:
    cfg = loop.config
    host = jax.device_get(self.window)
    elapsed = time.perf_counter() - self.t - (loop.excluded_s - self.excluded_at)
    loss = float(np.mean([m["loss"] for m in host]))
    tok_s = len(host) * loop.tokens_per_step / elapsed
    # Every metric the objective's loss returns, as a mean over the window's steps.
    out = {k: float(np.mean([m[k] for m in host])) for k in host[-1]
           if k not in ("count", "finite", "grad_norm", "lr")}
    out.update(grad_norm=float(host[-1]["grad_norm"]), lr=float(host[-1]["lr"]),
               tokens_per_s=tok_s,
               model_tflops_per_s=loop.flops_per_step * len(host) / elapsed / 1e12)
    loop.writer.write(loop.step, out, "train/")
    loop.train_curve.append((loop.step, loss))
    loop.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
    if loop.bar.disable:  # no terminal (a log file, CI): one line per log interval instead
      eta = (cfg.train.steps - loop.step) * elapsed / len(host)
      log.info("step %d/%d: loss %.4f, %.0f tokens/s, ETA %.0f s", loop.step, cfg.train.steps,
               loss, tok_s, eta)
    self._restart(loop)


class Progress(Hook):
  """Advances the progress bar by each step; closes it when the loop ends."""

  def after_step(self, loop: Loop) -> None:
    loop.bar.update(1)

  def close(self, loop: Loop) -> None:
    loop.bar.close()


class PeriodicEval(Hook):
  """Every train.eval_every steps: eval loss, perplexity, token accuracy and the primary metric
  (ftjax.train.periodic_eval), written as eval/*, with overfitting warnings from the curves.
  The last step is evaluated too when an earlier eval exists to compare it with (best step)."""

  def __init__(self, every: int, evaluate):
    self.every, self.evaluate, self.warned = every, evaluate, 0
    self.primary = None

  def start(self, loop: Loop) -> None:
    self.primary = evaluation.metrics.primary(loop.config.eval)

  def due(self, loop: Loop) -> bool:
    loop.last_eval = None
    return super().due(loop) or bool(self.every and loop.last_step and loop.eval_curve)

  def after_step(self, loop: Loop) -> None:
    jax.block_until_ready(loop.state)  # the step's own compute belongs to the train window
    with loop.excluded():
      ev = loop.last_eval = self.evaluate(loop, self.primary)
      if ev:
        self._report(loop, ev)

  def _report(self, loop: Loop, ev: dict) -> None:
    primary = self.primary
    loop.writer.write(loop.step, ev, "eval/")
    loop.bar.write(f"step {loop.step}: eval loss {ev['loss']:.4f}"
                   + (f", token accuracy {ev['accuracy']:.3f}" if "accuracy" in ev else "")
                   + (f", {primary} {ev[primary]:.4g}" if primary not in ("loss", "token_accuracy")
                      else ""), file=sys.stderr)
    loop.eval_curve.append((loop.step, ev["loss"]))
    warnings = curves_lib.overfitting_warnings(loop.train_curve, loop.eval_curve)
    for w in warnings[self.warned:]:
      log.warning("%s", w)
    self.warned = len(warnings)


class EarlyStopping(Hook):
  """After each periodic eval: tracks the best value of the primary metric, saves the best
  state (train.keep_best, WORKDIR/best and best.json) and stops the loop after train.patience
  evals without improvement. A resumed run continues the interrupted run's best."""

  def __init__(self, run, workdir: str):
    cfg = run.config
    self.workdir, self.primary = workdir, evaluation.metrics.primary(cfg.eval)
    self.best_ckpt = (Checkpointer(workdir, keep=1, folder="best")
                      if cfg.train.keep_best and cfg.train.eval_every and run.eval_ds is not None
                      else None)
    best = best_step = None
    best_path = os.path.join(workdir, "best.json")
    if (self.best_ckpt is not None and self.best_ckpt.latest_step() is not None
        and os.path.exists(best_path)):
      with open(best_path) as f:
        saved = json.load(f)
      best, best_step = saved.get(self.primary), saved["step"]
    self.stopper = curves_lib.EarlyStopping(evaluation.metrics.higher_is_better(self.primary),
                                            cfg.train.patience, best=best, best_step=best_step)
    self.stopped_at: int | None = None

  def due(self, loop: Loop) -> bool:
    return loop.last_eval is not None  # a periodic eval ran at this step

  def after_step(self, loop: Loop) -> None:
    ev, done = loop.last_eval, loop.step
    with loop.excluded():  # the best state's save belongs to the eval's time
      if ev and self.stopper.update(done, ev[self.primary]) and self.best_ckpt is not None:
        self.best_ckpt.save(done, loop.state, loop.position)
        if distributed.is_main():
          write_json(os.path.join(self.workdir, "best.json"), {"step": done, self.primary: ev[self.primary]})
    stopper = self.stopper
    if stopper.should_stop and not loop.last_step:
      loop.bar.write(f"step {done}: early stopping, {self.primary} has not improved for "
                     f"{stopper.patience} evals (best {stopper.best:.4g} at step "
                     f"{stopper.best_step})", file=sys.stderr)
      self.stopped_at = done
      loop.stop_reason = "early stopping"

  def best_trainable(self, loop: Loop, trainable: dict) -> tuple[dict, dict]:
    """(the trainable params the end phase uses, the summary's "training" block): the best
    step's params when a best checkpoint holds a step other than the last."""
    stopper, final_step = self.stopper, int(loop.state["step"])
    if stopper.best_step is None:
      return trainable, {}
    training = {"metric": self.primary, "best_step": stopper.best_step, "best_value": stopper.best,
                "patience": loop.config.train.patience, "stopped_early": self.stopped_at is not None,
                "stopped_at": self.stopped_at, "restored_best": False}
    if self.best_ckpt is not None and stopper.best_step != final_step:
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              loop.state)
      best_state, _ = self.best_ckpt.restore(stopper.best_step, abstract)
      trainable, training["restored_best"] = best_state["trainable"], True
      log.info("restored the best checkpoint (step %d, %s %.4g)", stopper.best_step, self.primary,
               stopper.best)
    return trainable, training

  def close(self, loop: Loop) -> None:
    if self.best_ckpt is not None:
      self.best_ckpt.close()


class Checkpoints(Hook):
  """Saves every train.checkpoint_every steps and every train.checkpoint_every_minutes, and
  after a SIGTERM / SIGINT (then ends the loop: the run stops, preempted). The signal and the
  minutes are one collective vote per step (`distributed.any_process`): a save or a stop is
  collective, so every process must take it at the same step; one vote, not two, because each is
  a host round trip between all processes."""

  def __init__(self, every: int, minutes: float):
    self.every, self.minutes = every, minutes
    self.saved_t = time.monotonic()  # train.checkpoint_every_minutes counts from the last save

  def due(self, loop: Loop) -> bool:
    return True  # the vote runs every step

  def after_step(self, loop: Loop) -> None:
    loop.checkpointer.check_for_errors()  # a failed background save stops the run now, naming it
    stopping, minutes_due = distributed.any_process(
        loop.stop.signal is not None,
        self.minutes > 0 and time.monotonic() - self.saved_t >= 60 * self.minutes)
    if stopping or minutes_due or super().due(loop):
      loop.checkpointer.save(loop.step, loop.state, loop.position)
      self.saved_t = time.monotonic()
    if stopping:
      loop.preempted_by = loop.stop.signal or "a signal to another process"
      loop.stop_reason = "preempted"


def default_hooks(run, workdir: str, evaluate, extra=()) -> list[Hook]:
  """The hooks of a run, in the order they run after a step: `extra` (an objective's own) come
  after the guard and before logging, so a hook that changes the batch or adds metrics sees a
  checked step and its output is logged with it."""
  t = run.config.train
  early = EarlyStopping(run, workdir)
  return [NonFiniteGuard(), *extra, TrainLog(t.log_every), Progress(),
          PeriodicEval(t.eval_every, evaluate), early,
          Checkpoints(t.checkpoint_every, t.checkpoint_every_minutes)]
