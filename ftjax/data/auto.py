"""`train.epochs`, and "auto" epochs / batch size / learning rate from the data and the method.

`resolve(config, rows=, examples=, shards=)` runs once the data is checked (the train split's
packed rows and examples are known) and before anything compiles; it writes concrete values
into the config (so config.json and a resumed run see them) and returns one line per choice,
saying why. The rule, anchored on what hosted fine-tuning services do:

  epochs   "auto": 3; a small set gets enough epochs for 100 example passes (ceil(100 / n), at
           most 25), a large one at most 25,000 passes (25000 // n, at least 1). This is the rule
           OpenAI's fine-tuning data-preparation cookbook gives for its `n_epochs: "auto"`.
  batch    "auto": ~0.2% of the train rows, at most 256 (OpenAI's documented `batch_size: "auto"`),
           at least 8 (a CPU step's fixed costs dominate below that), rounded up to a multiple of
           the data-parallel devices x train.grad_accum so the step can split it.
  lr       "auto", by the (first) method: LoRA / QLoRA 2e-4 (the QLoRA paper's value for 7B-13B
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

from ftjax.parallel.sharding import make_mesh

log = logging.getLogger("ftjax.data.auto")

TARGET_EPOCHS, MIN_EPOCHS, MAX_EPOCHS = 3, 1, 25
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


def resolve(config, *, rows: int, examples: int, shards: int = 1) -> list[str]:
  """Fills train.epochs / batch_size / lr when "auto" and train.steps when epochs are set, in
  place; returns the reasons (empty when nothing was chosen)."""
  t = config.train
  reasons = []
  if t.batch_size == "auto":
    t.batch_size, why = auto_batch_size(rows, shards * t.grad_accum)
    reasons.append(f"train.batch_size={t.batch_size}: {why}")
  if t.lr == "auto":
    method = config.method.split("+")[0].strip()  # the first of ftjax.config.methods (above data)
    t.lr = LEARNING_RATES[method]
    reasons.append(f"train.lr={t.lr:g}: the usual rate for {method} (ftjax/data/auto.py cites it)")
  if t.epochs == "auto":
    t.epochs, why = auto_epochs(examples)
    reasons.append(f"train.epochs={t.epochs}: {why}")
  if t.epochs:
    t.steps = math.ceil(round(t.epochs * rows) / t.batch_size)
    reasons.append(f"train.steps={t.steps}: {t.epochs} epochs x {rows} rows / batch {t.batch_size}")
    if t.warmup_steps > t.steps:
      t.warmup_steps = t.steps // 10
      reasons.append(f"train.warmup_steps={t.warmup_steps}: a tenth of the steps (the configured "
                     "warmup was longer than the run)")
  return reasons


def data_parallel(config) -> int:
  """Devices a batch is split over: the data x fsdp axes of the run's mesh."""
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  return mesh.shape["data"] * mesh.shape["fsdp"]


def resolve_from_report(config, report) -> list[str]:
  """`resolve` with the train split of a data check's report; logs each choice."""
  train = report["splits"]["train"]
  reasons = resolve(config, rows=train.get("rows", 0), examples=train.get("kept", 0),
                    shards=data_parallel(config)) if train.get("rows") else []
  for line in reasons:
    log.info("chose %s", line)
  report["auto"] = reasons
  return reasons


def row_budget(config, num_rows: int) -> int | None:
  """Rows the run trains on in all when train.epochs is set (None: train.steps full batches)."""
  return round(config.train.epochs * num_rows) if config.train.epochs else None
