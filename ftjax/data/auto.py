"""`train.epochs`, and "auto" epochs / batch size / learning rate from the data and the method.

`resolve(config, rows=, examples=, shards=)` runs once the data is checked (the train split's
packed rows and examples are known) and before anything compiles; it writes concrete values
into the config (so config.json and a resumed run see them) and returns one line per choice,
saying why. The rule, anchored on what hosted fine-tuning services do:

  epochs   "auto" without an eval split: 3; a small set gets enough epochs for 100 example
           passes (ceil(100 / n), at most 25), a large one at most 25,000 passes (25000 // n, at
           least 1). This is the rule OpenAI's fine-tuning data-preparation cookbook gives for
           its `n_epochs: "auto"`.
           With an eval split: train until the eval stops improving. The epochs are a ceiling,
           twice that rule (at most 25): early stopping on eval.primary (or the eval loss) ends
           the run sooner, and the best eval's state is what is exported (train.keep_best,
           WORKDIR/best). train.eval_every is lowered to half an epoch's steps (when 0 or
           larger) and train.patience, when 0, is 2 evals (one epoch without improvement).
  batch    "auto": ~0.2% of the train rows, at most 256 (OpenAI's documented `batch_size: "auto"`),
           at least 8 (a CPU step's fixed costs dominate below that), rounded up to a multiple of
           the data-parallel devices x train.grad_accum so the step can split it.
  lr       "auto": measured by the learning-rate probe (ftjax/lr_probe.py) when the run can
           afford it; the rate below is its fallback (and the rate of runs too short for it).
           By the (first) method: LoRA / QLoRA 2e-4 (the QLoRA paper's value for 7B-13B
           models), full 2e-5 (Stanford Alpaca), IA3 3e-3 (T-Few), bottleneck adapters 1e-4
           (AdapterHub's default), prompt / prefix tuning 3e-2 (HF PEFT's prompt-learning
           examples): the method, not the data size, sets the scale.

With train.epochs set (a number or "auto"), train.steps = ceil(epochs x rows / batch) and the
train loop stops after exactly epochs x rows rows: the last step is filled with padding rows that
train nothing, so every row is seen the same number of times. train.warmup_steps larger than
the resolved steps is cut to a tenth of them.
"""

from __future__ import annotations

import logging
import math

from ftjax.data import lr_plan
from ftjax.parallel.sharding import make_mesh

AUTO_KEYS = ("epochs", "batch_size", "lr")  # train.* keys that take "auto" (ftjax.config)

log = logging.getLogger("ftjax.data.auto")

TARGET_EPOCHS, MIN_EPOCHS, MAX_EPOCHS = 3, 1, 25
CEILING_FACTOR = 2  # epochs "auto" with an eval split: the ceiling is this x the fixed rule
AUTO_PATIENCE, EVALS_PER_EPOCH = 2, 2
MIN_PASSES, MAX_PASSES = 100, 25_000
BATCH_FRACTION, MIN_BATCH, MAX_BATCH = 0.002, 8, 256
LEARNING_RATES = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "ia3": 3e-3, "adapter": 1e-4,
                  "prompt": 3e-2, "prefix": 3e-2}


def auto_epochs(examples: int) -> tuple[int, str]:
  if examples * TARGET_EPOCHS < MIN_PASSES:
    n = min(MAX_EPOCHS, math.ceil(MIN_PASSES / examples))
    return n, f"{examples} examples is a small set: {n} epochs give >= {MIN_PASSES} example passes"
  if examples * TARGET_EPOCHS > MAX_PASSES:
    n = max(MIN_EPOCHS, MAX_PASSES // examples)
    return n, f"{examples} examples is a large set: {n} epochs keep it under {MAX_PASSES:,} passes"
  return TARGET_EPOCHS, f"{examples} examples: the default {TARGET_EPOCHS} epochs"


def auto_batch_size(rows: int, multiple: int) -> tuple[int, str]:
  want = min(MAX_BATCH, max(MIN_BATCH, round(BATCH_FRACTION * rows)))
  n = math.ceil(want / multiple) * multiple
  return n, (f"~{BATCH_FRACTION:.1%} of {rows} rows, within [{MIN_BATCH}, {MAX_BATCH}], a "
             f"multiple of {multiple} (data-parallel devices x grad_accum)")


def resolve(config, *, rows: int, examples: int, shards: int = 1, eval_examples: int = 0) -> list[str]:
  """Fills train.epochs / batch_size / lr when "auto" and train.steps when epochs are set, in
  place; returns the reasons (empty when nothing was chosen). `eval_examples`: the eval split's
  size (epochs "auto" stops early on it when there is one)."""
  t = config.train
  reasons = []
  if t.batch_size == "auto":
    t.batch_size, why = auto_batch_size(rows, shards * t.grad_accum)
    reasons.append(f"train.batch_size={t.batch_size}: {why}")
  if t.lr == "auto":
    method = config.method.split("+")[0].strip()  # the first of ftjax.config.methods (above data)
    t.lr = LEARNING_RATES[method]
    reasons.append(f"train.lr={t.lr:g}: the usual rate for {method} (ftjax/data/auto.py cites "
                   "it); the lr probe replaces it when the run affords one")
  if t.epochs == "auto":
    reasons += _auto_epochs(config, rows, examples, eval_examples)
  if t.epochs:
    t.steps = math.ceil(round(t.epochs * rows) / t.batch_size)
    reasons.append(f"train.steps={t.steps}: {t.epochs} epochs x {rows} rows / batch {t.batch_size}")
    if t.warmup_steps > t.steps:
      t.warmup_steps = t.steps // 10
      reasons.append(f"train.warmup_steps={t.warmup_steps}: a tenth of the steps (the configured "
                     "warmup was longer than the run)")
  return reasons


def _auto_epochs(config, rows: int, examples: int, eval_examples: int) -> list[str]:
  """train.epochs "auto": the fixed rule, or with an eval split its ceiling + early stopping."""
  t = config.train
  n, why = auto_epochs(examples)
  if not eval_examples:
    t.epochs = n
    return [f"train.epochs={n}: {why} (no eval split: no early stopping)"]
  t.epochs = min(MAX_EPOCHS, CEILING_FACTOR * n)
  out = [f"train.epochs={t.epochs}: a ceiling, {CEILING_FACTOR} x the fixed rule's {n} ({why}); "
         "early stopping on the eval ends the run sooner, keeping the best state"]
  half = max(1, math.ceil(rows / t.batch_size / EVALS_PER_EPOCH))
  if not t.eval_every or t.eval_every > half:  # the default 50 may be a whole run of steps
    t.eval_every = half
    out.append(f"train.eval_every={t.eval_every}: {EVALS_PER_EPOCH} evals an epoch, for early stopping")
  if not t.patience:
    t.patience = AUTO_PATIENCE
    out.append(f"train.patience={t.patience}: stop after {t.patience} evals without improvement")
  return out


def data_parallel(config) -> int:
  """Devices a batch is split over: the data x fsdp axes of the run's mesh."""
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  return mesh.shape["data"] * mesh.shape["fsdp"]


def resolve_from_report(config, report, *, scorable: bool = True) -> list[str]:
  """`resolve` with the train split of a data check's report; logs each choice. scorable: the
  objective has a loss on fixed rows to score learning rates on (Objective.eval_loss)."""
  train = report["splits"]["train"]
  evals = report["splits"].get("eval") or {}
  chosen = [k for k in AUTO_KEYS if config.train[k] == "auto"]
  lr_auto = "lr" in chosen
  reasons = resolve(config, rows=train.get("rows", 0), examples=train.get("kept", 0),
                    shards=data_parallel(config),
                    eval_examples=evals.get("kept") or evals.get("examples") or 0
                    ) if train.get("rows") else []
  for line in reasons:
    log.info("chose %s", line)
  if lr_auto and train.get("rows"):  # the probe of train.lr "auto", priced by the cost plan
    report["lr_probe"] = lr_plan.plan(config, train["rows"], scorable=scorable)
    reasons.append(lr_plan.plan_line(report["lr_probe"]))
    log.info("%s", reasons[-1])
  report["auto"] = reasons
  report["auto_values"] = {f"train.{k}": config.train[k] for k in chosen
                           if config.train[k] != "auto"}
  return reasons


def row_budget(config, num_rows: int) -> int | None:
  """Rows the run trains on in all when train.epochs is set (None: train.steps full batches)."""
  return round(config.train.epochs * num_rows) if config.train.epochs else None
