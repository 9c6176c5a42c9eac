"""What a training objective is, as the run sees it.

The run (ftjax.run), the step builder, the plan (ftjax.plan), the cost probe and the loop ask the
run's objective; none of them branches on its name. An objective says:

  row_spec()        the arrays of one training row: {key: (per-row shape, dtype)}. A batch holds
                    them as [accum, micro_batch, *shape]; the batch axis is sharded over the mesh.
  dataset(...)      how checked examples become those rows (a Dataset: `.rows`, `.batches()`).
  loss_fn(...)      `loss_fn(model, batch, rng) -> {"loss_sum", "count", other sums}` for
                    ftjax.step: sums, which the step divides by the window's total count; every
                    key but loss_sum and count is logged as train/<key> (eval/<key> in evals).
                    A key `x` returned with `x__count` is divided by that sum instead (a mean
                    per completion, say, where the loss counts tokens).
  synthetic_batch   one batch of row_spec's shapes, for the cost probe's timing.
  next_rows(...)    the next step's rows from the data's (SFT: as they are), given the state.
  hooks(run)        its own periodic actions in the loop (ftjax.hooks.Hook; SFT: none).
  validate()        checks across config keys that the schema cannot make alone.

Supervised fine-tuning (ftjax.objectives.sft) is the worked example; docs/design.md, "Adding an
objective", walks through it. A capability an objective needs that the base lacks (a model head,
a pre-training pass, batches built from the current params) is added here as a method whose
default keeps what every other objective does, and called from the run or the loop.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np

from ftjax import evaluation
from ftjax.data import load_examples, read_options, selection
from ftjax.errors import FtjaxError
from ftjax.models import save_pretrained


class Objective:
  """A training objective; subclasses set `name` and implement the methods that raise."""

  name: ClassVar[str] = ""
  # The config block of this objective's own keys ("dpo" for dpo.*), or None. A run refuses a
  # changed key in another objective's block: it would silently do nothing.
  config_block: ClassVar[str | None] = None

  # The eval split's rows have a loss (evaluate_loss); GRPO's eval prompts have none: it scores
  # them with its rewards in `end_eval` instead.
  eval_loss: ClassVar[bool] = True

  def __init__(self, config):
    self.config = config

  def validate(self) -> None:
    """Checks beyond the schema's, raising FtjaxError naming the key."""

  def row_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    raise NotImplementedError

  def tokens_per_row(self) -> int:
    """Token positions one row runs through the model (a preference pair's two replies: 2 x
    seq_len): what train/tokens_per_s and the step's FLOPs count."""
    return int(np.prod(self.row_spec()["inputs"][0]))

  def dataset(self, examples: list, tokenizer, *, train: bool, name: str):
    """A Dataset of `examples` (checked by ftjax.data.selection) with `row_spec`'s rows."""
    raise NotImplementedError

  def check_split(self, path, tokenizer, **options):
    """The data check's reading of one split (a ftjax.data.selection.Split): records validated in
    this objective's data formats, problems at file:line with codes, token lengths."""
    return selection.check_split(path, tokenizer, **options)

  def token_stats(self, examples, lengths, tokenizer, *, pack) -> dict:
    """The data check's token statistics of the rows `dataset` would build."""
    return selection.token_stats(examples, lengths, tokenizer, self.config.data, pack=pack)

  def dataset_token_stats(self, examples, lengths, tokenizer) -> tuple[dict, np.ndarray]:
    """(token statistics of the rows `dataset` builds, with length percentiles of each example's
    `lengths` entry; those lengths as an array): for objectives whose rows are not SFT's packed
    documents (preference pairs, GRPO prompts). Over-length examples are dropped here, not
    raised: the check reports them as problems."""
    policy = "drop" if self.config.data.length_policy == "error" else None
    ds = self.dataset(examples, tokenizer, train=False, name="data", length_policy=policy)
    n = np.array([lengths[id(ex)] for ex in examples if id(ex) in lengths] or [0])
    stats = dict(ds.summary, length={f"p{q}": float(np.percentile(n, q)) for q in (50, 90, 99)})
    stats["length"]["max"] = int(n.max())
    return stats, n

  def report_loss(self, eval_means: dict) -> dict:
    """The report's eval-loss row of a model from its eval means (train.evaluate_loss)."""
    if "accuracy" not in eval_means:  # not a next-token loss: its own means as they are
      return dict(eval_means)
    return evaluation.loss_metrics(eval_means["loss"], eval_means["accuracy"])

  def read_examples(self, path: str) -> list:
    """A split's valid examples, as the report's leakage section compares them."""
    return load_examples(path, **read_options(self.config.data))

  def eval_plan(self) -> evaluation.EvalPlan:
    """The generation eval's plan (eval.generate): eval split, references and few-shot pool,
    checked (FtjaxError) before anything compiles. Classification answers its own way."""
    cfg = self.config
    return evaluation.EvalPlan.build(cfg.data.eval, cfg.eval,
                                     pool_path=cfg.eval.few_shot_pool or cfg.data.train,
                                     data_cfg=cfg.data, near_dup=cfg.data.check.near_dup,
                                     read=self.read_examples)

  def before_training(self, run, workdir: str) -> None:
    """A pass before the first step, with the run set up and no checkpoint restored yet (the
    preference objectives' reference log-probs); nothing by default."""

  def end_eval(self, run, trainable) -> dict:
    """Entries for summary.json measured on the trained params at the end of the run (GRPO:
    the eval prompts' rewards, base vs tuned); nothing by default."""
    return {}

  def report_section(self, summary: dict) -> str:
    """Markdown appended to report.md from the summary (GRPO: its reward eval); none by default."""
    return ""

  def loss_fn(self, model_cfg, mesh) -> Callable:
    """The step's loss function; hashable (it is a static argument of the jitted step)."""
    raise NotImplementedError

  # --- capabilities beyond SFT's: each default is what SFT does -----------------------------

  def check_data(self, tokenizer) -> tuple[dict, dict]:
    """(data check report, {"train", "eval"} checked examples for `dataset`), the report in
    ftjax.data.selection's shape (the run's data report, the cost plan and "auto" values read it)."""
    return selection.check(self.config, tokenizer, self)

  def build_model(self, model):
    """The model this objective trains, built on the loaded causal LM (before adapters attach;
    also under nnx.eval_shape in ftjax.plan). SFT trains the causal LM itself."""
    return model

  def peft_options(self, modules_to_save) -> dict:
    """task_type and modules_to_save of the run's PEFT configs (`modules_to_save`: the config's
    names or None)."""
    return {"task_type": "CAUSAL_LM", "modules_to_save": modules_to_save}

  def run_state(self) -> dict:
    """What a checkpoint depends on beyond the config (JSON), written to WORKDIR/objective.json;
    a resumed run whose value differs is refused (ftjax.train.check_resume_objective). SFT: {}."""
    return {}

  def eval_metrics(self, model, dataset, batch_size: int, max_rows: int = 0) -> dict:
    """Metrics computed on the host from `model`'s outputs on the eval Dataset (its first
    `max_rows` rows; 0: all), beside the loss function's sums: float values are logged as
    eval/<name>, the whole dict is written to WORKDIR/eval_metrics.json at the end. SFT: none."""
    return {}

  def save_merged(self, model, tokenizer, out_dir: str, *, max_shard_size="5GB",
                  overwrite: bool = False) -> None:
    """Writes the trained model, adapters folded in, as a HF directory (export.merged)."""
    save_pretrained(model, out_dir, tokenizer, max_shard_size=max_shard_size, overwrite=overwrite)

  def next_rows(self, run, state, take_rows: Callable[[int], dict]) -> dict:
    """The rows of the next train step, [train.batch_size, ...] each. `take_rows(n)` reads the
    next n rows of the train data (the checkpointed position advances by them; padding rows
    past an epochs budget). `state` is the train state this step updates (its params current:
    an objective that samples from the policy does so here)."""
    return take_rows(self.config.train.batch_size)

  def hooks(self, run) -> list:
    """Its own `ftjax.hooks.Hook`s, run in the loop after the non-finite guard and before
    logging (a pass before the first step, a metric every n steps); docs/design.md, "The loop"."""
    return []

  def synthetic_batch(self, vocab_size: int, seed: int = 0) -> dict:
    """A batch [accum, micro, *shape] of random rows: dense compute does not depend on the
    values, so the cost probe times the step on it without reading data."""
    cfg = self.config.train
    rng = np.random.default_rng(seed)
    out = {}
    for key, (shape, dtype) in self.row_spec().items():
      full = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum) + tuple(shape)
      out[key] = (rng.integers(0, vocab_size, full, dtype=np.int32).astype(dtype)
                  if np.issubdtype(dtype, np.integer) else np.ones(full, dtype))
    return out


def refuse_other_blocks(config, registry: dict[str, type[Objective]], defaults) -> None:
  """A changed key in the block of an objective the run does not train is refused by name."""
  for name, cls in registry.items():
    block = cls.config_block
    if name == config.objective or block is None or block not in config:
      continue
    changed = [f"{block}.{k}" for k, v in config[block].items() if defaults[block].get(k) != v]
    if changed:
      raise FtjaxError(f"config: {', '.join(changed)} belong(s) to objective {name!r}, but "
                       f"objective={config.objective!r}; remove them or set objective={name!r}")
