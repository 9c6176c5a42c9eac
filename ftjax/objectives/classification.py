"""Sequence classification: a `score` head on the last real token (ftjax.models.classifier),
trained with softmax cross-entropy (single_label) or sigmoid binary cross-entropy (multi_label),
as transformers' *ForSequenceClassification and PEFT's task_type="SEQ_CLS".

Data: records {"input" or "text": str, "label": str} (multi_label: "label" a list of str, or one
comma-separated str) in JSONL, CSV, Parquet or a `datasets` folder, keys renamed by data.fields.
Class names: classification.labels ("" = the sorted distinct labels of the train split, stored
with the run so ids stay stable; "a,b,c"; or a file, one name a line). A text is tokenised as it
is (template "none") or as one user turn with the generation prompt (template "chat"), without
an EOS: pooling picks the last token, and a trailing pad-id token would move transformers' pick.

Data problems, each at file:line with a stable code (`check_records`): unknown_label (a label
outside the class names: in eval always, in train when the names are given), empty_label,
label_list (a list under single_label), missing_field / wrong_type (no text); and signals over
the split (`label_signals`): rare_class (classes under RARE_CLASS examples), imbalance (the
largest class over IMBALANCE times the smallest), conflicting_labels (one normalised text with
different labels).

With eval.generate (`ClassificationPlan`), the report compares the tuned classifier with
prompting: the base causal LM, on the classifier's decoder, answers each eval text zero-shot and
k-shot after an instruction listing the class names; its answers are mapped onto the names
(`map_answers`: exact, then normalised; unmapped ones counted wrong and reported), and the
classifier's argmax names are the fine-tuned system's answers, scored by label_accuracy.

Loss sums for ftjax.step (`ClassificationLoss`): single_label: loss_sum = sum w[y] * CE, count =
sum w[y] (torch's CrossEntropyLoss(weight=w) mean: w = 1 without class weights), accuracy = sum
w[y] * hit; multi_label: loss_sum = sum over rows and classes of w[c] * BCE, count = rows x classes
(torch's BCEWithLogitsLoss(weight=w) mean), accuracy = hits per (row, class). Evaluation adds,
on the host, macro-F1, per-class precision / recall / F1 and the top confusions (`report`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import string

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import config as config_lib
from ftjax.data import dataset as dataset_lib
from ftjax.data.dataset import Dataset
from ftjax.data.formats import Example
from ftjax.errors import FtjaxError
from ftjax.evaluation import metrics as metrics_lib
from ftjax.evaluation.generation import EvalPlan
from ftjax import models
from ftjax.models import classifier, ops
from ftjax.models.classifier import SequenceClassifier, segment_last_index
from ftjax.models.llama import CausalLM
from ftjax.objectives.base import Objective
# The records part lives in classification_data (the data check uses it too); its names are
# this module's as well (classification.read_split, ...), as ftjax.classify and the tests use them.
from ftjax.objectives.classification_data import (  # noqa: F401
    IMBALANCE, LABEL_KEY, PROBLEM_TYPES, RARE_CLASS, TEMPLATES, TEXT_KEYS, LabeledText, Problem,
    check_records, encode, label_signals, parse_record, read_split, resolve_labels)
from ftjax.objectives import classification_check

TOP_CONFUSIONS = 10


# --- tokenised rows ---------------------------------------------------------------------------------

def label_targets(examples: list[LabeledText], names: list[str], problem_type: str) -> np.ndarray:
  """[n] int32 class ids (single_label) or [n, L] float32 0/1 (multi_label)."""
  index = {n: i for i, n in enumerate(names)}
  if problem_type == "single_label":
    return np.asarray([index[ex.labels[0]] for ex in examples], np.int32)
  out = np.zeros((len(examples), len(names)), np.float32)
  for row, ex in enumerate(examples):
    out[row, [index[n] for n in ex.labels]] = 1.0
  return out


def build_rows(examples, names, tokenizer, *, seq_len: int, problem_type: str, template: str,
               pad_id: int) -> tuple[dict, int]:
  """({inputs, segment_ids, positions: [n, seq_len] int32, labels, row_mask [n]}, truncated):
  one right-padded row per text, its first seq_len tokens kept."""
  n = len(examples)
  inputs = np.full((n, seq_len), pad_id, np.int32)
  segment_ids = np.zeros((n, seq_len), np.int32)
  truncated = 0
  for row, ex in enumerate(examples):
    ids = encode(tokenizer, ex.text, template)
    if not ids:
      raise FtjaxError(f"{ex.where}: the text tokenises to no tokens")
    truncated += len(ids) > seq_len
    ids = ids[:seq_len]
    inputs[row, :len(ids)] = ids
    segment_ids[row, :len(ids)] = 1
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
  return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions,
          "labels": label_targets(examples, names, problem_type),
          "row_mask": np.ones((n,), np.float32)}, truncated


# --- loss ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClassificationLoss:
  """Sums for ftjax.step (see the module docstring). Hashable: a static argument of the step.
  class_weights: one weight per class, () for none."""
  problem_type: str = "single_label"
  class_weights: tuple[float, ...] = ()
  remat: str = "none"
  unroll: int | bool = 1
  attention: str = "xla"

  def __call__(self, model, batch: dict, rng=None) -> dict:
    hidden = model.hidden_states(batch["inputs"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"], remat=self.remat,
                                 unroll=self.unroll, rng=rng, **(
                                     {"attention": self.attention} if self.attention != "xla" else {}))
    logits = model.pooled_logits(hidden, segment_last_index(batch["segment_ids"]))
    return self.sums(logits, batch["labels"], batch["row_mask"])

  def sums(self, logits, labels, row_mask) -> dict:
    weights = jnp.asarray(self.class_weights or (1.0,) * logits.shape[-1], jnp.float32)
    mask = row_mask.astype(jnp.float32)
    if self.problem_type == "multi_label":
      return multi_label_sums(logits, labels, mask, weights)
    return single_label_sums(logits, labels, mask, weights)


def single_label_sums(logits_bl, labels_b, mask_b, weights_l) -> dict:
  """Softmax cross-entropy: sum of w[y] * NLL, sum of w[y] * top-1 hits, sum of w[y]."""
  labels_b = labels_b.astype(jnp.int32)
  logz = jax.nn.logsumexp(logits_bl, axis=-1)
  target = jnp.take_along_axis(logits_bl, labels_b[:, None], axis=-1)[:, 0]
  hit = (jnp.argmax(logits_bl, axis=-1) == labels_b).astype(jnp.float32)
  w = weights_l[labels_b] * mask_b
  return {"loss_sum": jnp.sum(w * (logz - target)), "accuracy": jnp.sum(w * hit), "count": jnp.sum(w)}


def multi_label_sums(logits_bl, targets_bl, mask_b, weights_l) -> dict:
  """Sigmoid binary cross-entropy per (row, class), weighted per class; hits per (row, class)."""
  targets_bl = targets_bl.astype(jnp.float32)
  # stable BCE with logits: max(x, 0) - x * y + log(1 + exp(-|x|)), as torch computes it
  bce = jnp.maximum(logits_bl, 0) - logits_bl * targets_bl + jnp.log1p(jnp.exp(-jnp.abs(logits_bl)))
  hit = ((logits_bl > 0).astype(jnp.float32) == targets_bl).astype(jnp.float32)
  cells = mask_b[:, None] * jnp.ones_like(logits_bl)
  return {"loss_sum": jnp.sum(cells * weights_l * bce), "accuracy": jnp.sum(cells * hit),
          "count": jnp.sum(cells)}


# --- metrics on the host ------------------------------------------------------------------------

def forward_fn(model):
  """(tokens [b, t], segment_ids [b, t]) -> f32 logits [b, L] as numpy, one jitted function
  (compiled once per shape) with the model's state an argument, not a constant folded in."""
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, segment_ids):
    m = nnx.merge(graphdef, state)
    return m.pooled_logits(m.hidden_states(tokens, segment_ids=segment_ids),
                           segment_last_index(segment_ids))

  return lambda tokens, segment_ids: np.asarray(
      forward(state, jnp.asarray(tokens), jnp.asarray(segment_ids)))


def logits_of(forward, tokens: np.ndarray, segment_ids: np.ndarray, batch_size: int) -> np.ndarray:
  """Logits [n, L] of right-padded rows, `batch_size` rows per call of `forward` (forward_fn);
  the last batch is padded with empty rows so every call has one shape."""
  out = []
  for start in range(0, len(tokens), batch_size):
    t, s = tokens[start:start + batch_size], segment_ids[start:start + batch_size]
    pad = batch_size - len(t)
    out.append(forward(np.pad(t, [(0, pad), (0, 0)]), np.pad(s, [(0, pad), (0, 0)]))[:len(t)])
  return np.concatenate(out)


def predictions(logits: np.ndarray, problem_type: str) -> np.ndarray:
  """[n] class ids (single_label) or [n, L] 0/1 (multi_label, sigmoid > 0.5)."""
  logits = np.asarray(logits)
  return np.argmax(logits, -1) if problem_type == "single_label" else (logits > 0).astype(np.int32)


def probabilities(logits: np.ndarray, problem_type: str) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  if problem_type == "multi_label":
    return 1.0 / (1.0 + np.exp(-logits))
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def report(targets: np.ndarray, predicted: np.ndarray, names: list[str],
           top: int = TOP_CONFUSIONS) -> dict:
  """accuracy, macro_f1, per-class precision / recall / F1 / support and, for single_label, the
  `top` most frequent (true, predicted) confusions by name. Multi-label: accuracy is exact-set
  match, per-class scores count each (row, class) decision."""
  targets, predicted = np.asarray(targets), np.asarray(predicted)
  num = len(names)
  if targets.ndim == 1:
    t1, p1 = np.eye(num, dtype=bool)[targets], np.eye(num, dtype=bool)[predicted]
    accuracy = float(np.mean(targets == predicted)) if len(targets) else 0.0
  else:
    t1, p1 = targets.astype(bool), predicted.astype(bool)
    accuracy = float(np.mean(np.all(t1 == p1, axis=1))) if len(targets) else 0.0
  tp = (t1 & p1).sum(0)
  precision = np.divide(tp, p1.sum(0), out=np.zeros(num), where=p1.sum(0) > 0)
  recall = np.divide(tp, t1.sum(0), out=np.zeros(num), where=t1.sum(0) > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num),
                 where=(precision + recall) > 0)
  # macro over the classes present in the targets or the predictions (sklearn's default labels)
  seen = (t1.sum(0) + p1.sum(0)) > 0
  out = {"accuracy": accuracy, "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
         "per_class": {n: {"precision": float(precision[i]), "recall": float(recall[i]),
                           "f1": float(f1[i]), "support": int(t1[:, i].sum())}
                       for i, n in enumerate(names)}}
  if targets.ndim == 1:
    pairs = collections.Counter((int(a), int(b)) for a, b in zip(targets, predicted) if a != b)
    out["confusions"] = [{"true": names[a], "predicted": names[b], "count": c}
                         for (a, b), c in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
  return out


# --- prompting baselines against the tuned classifier (eval.generate) ----------------------------

def instruction(names: list[str]) -> str:
  """The system turn that asks the base causal LM for one of the class names."""
  return ("Classify the user's text into exactly one of these labels: " + ", ".join(names)
          + ". Answer with the label only.")


def _label_key(text: str) -> str:
  """The normalised form of an answer or a class name: case, inner whitespace and the
  punctuation at its edges ignored (as eval.metrics' label_accuracy compares labels)."""
  return metrics_lib.normalise(text, ("lower", "whitespace", "strip")).strip(string.punctuation).strip()


def map_answer(answer: str, names: list[str]) -> str | None:
  """The class name a generated answer names: the name it equals exactly, else the one it equals
  after normalising (`_label_key`); None when it names none (counted wrong, and reported)."""
  if answer in names:
    return answer
  by_key = {}
  for name in names:
    by_key.setdefault(_label_key(name), name)
  return by_key.get(_label_key(answer))


def map_answers(answers: list[str], names: list[str]) -> tuple[list[str], int]:
  """(class name per answer, "" where unmapped, which no reference equals; unmapped count)."""
  mapped = [map_answer(a, names) for a in answers]
  return [m if m is not None else "" for m in mapped], sum(m is None for m in mapped)


def spread_over_classes(examples: list[LabeledText]) -> list[LabeledText]:
  """The examples reordered round-robin over their labels (each label's first, in order of first
  appearance, then each one's second, ...): the k-shot baseline's first k shots show k classes,
  not k examples of the class a sorted file starts with."""
  by_label: dict = {}
  for ex in examples:
    by_label.setdefault(ex.labels[0], []).append(ex)
  columns = list(by_label.values())
  return [col[i] for i in range(max(map(len, columns), default=0)) for col in columns if i < len(col)]


def prompt_example(ex: LabeledText, names: list[str]) -> Example:
  """A labelled text as a chat example: the instruction (system), the text (user), the label
  (the reference answer). The data check's leakage reads the user turn only: the text itself."""
  return Example(ex.where, [{"role": "system", "content": instruction(names), "weight": 0.0},
                            {"role": "user", "content": ex.text, "weight": 0.0},
                            {"role": "assistant", "content": ex.labels[0], "weight": 1.0}])


def causal_lm_on(model: SequenceClassifier, vocab_head=None) -> CausalLM:
  """The base causal LM the prompting baselines generate with, on `model`'s decoder (shared, so
  `peft.disable_adapters` on the classifier holds for it too). Its vocab head is the tied
  embedding, which the classifier keeps, or `vocab_head` (`base_vocab_head`) for an untied one,
  which the classifier drops."""
  untied = not model.config.tie_word_embeddings
  if untied and vocab_head is None:
    raise FtjaxError(f"{model.config.model_type!r} has an untied vocab head, which the classifier "
                     "does not keep: give the base model's (base_vocab_head) to generate with it")
  from flax import nnx  # local: flax loads with the models, not at import of the objectives
  lm = nnx.eval_shape(lambda: CausalLM(model.config, dtype=model.dtype, rngs=nnx.Rngs(0)))
  lm.model = model.model  # the abstract decoder replaced by the real one: no weight is copied
  if untied:
    lm.lm_head = vocab_head
  return lm


def base_vocab_head(name_or_path: str, model: SequenceClassifier):
  """The untied vocab head (nnx.Linear) of the base causal LM at `name_or_path`, in `model`'s
  dtypes; read with the first decoder layer only (the rest is dropped as it loads)."""
  param_dtype = model.model.embed_tokens.embedding[...].dtype
  lm, _ = models.load(name_or_path, param_dtype, compute_dtype=model.dtype, num_layers=1)
  return lm.lm_head


@dataclasses.dataclass
class ClassificationPlan(EvalPlan):
  """EvalPlan of a classification run: the prompting baselines are the base causal LM's greedy
  answers mapped onto the class names (`map_answers`); the fine-tuned system is the classifier's
  argmax on the same eval examples, as class names, so report.compare's paired bootstrap CIs and
  verdict compare them on label_accuracy."""
  names: list[str] = dataclasses.field(default_factory=list)
  texts: list = dataclasses.field(default_factory=list)  # LabeledText of each eval example
  seq_len: int = 0
  template: str = "none"
  model_path: str = ""  # the base model's reference (model.name_or_path): an untied vocab head
  vocab_head: object = dataclasses.field(default=None, repr=False, compare=False)  # read once

  def base_lm(self, model: SequenceClassifier) -> CausalLM:
    if not model.config.tie_word_embeddings and self.vocab_head is None:
      self.vocab_head = base_vocab_head(self.model_path, model)
    return causal_lm_on(model, self.vocab_head)

  def run(self, model, tokenizer, name: str, build=lambda p: p, limit: int | None = None) -> dict:
    if name not in self.systems():  # the fine-tuned classifier
      return super().run(model, tokenizer, name, build, limit)
    lm = self.base_lm(model) if isinstance(model, SequenceClassifier) else model
    answers = super().answer(lm, tokenizer, build, desc=name, limit=limit)
    labels, unmapped = map_answers(answers, self.names)
    return {"name": name, "examples": len(labels), "scores": self.score(labels),
            "predictions": labels, "answers": answers, "unmapped": unmapped}

  def answer(self, model, tokenizer, build=lambda p: p, desc: str = "generate",
             limit: int | None = None) -> list[str]:
    """Class names: the classifier's argmax, or a causal LM's answers mapped onto them."""
    if not isinstance(model, SequenceClassifier):
      return map_answers(super().answer(model, tokenizer, build, desc, limit), self.names)[0]
    texts = self.texts[:limit]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, _ = build_rows(texts, self.names, tokenizer, seq_len=self.seq_len,
                         problem_type="single_label", template=self.template, pad_id=pad)
    size = min(len(texts), self.eval_cfg.batch_size or 64)
    logits = logits_of(forward_fn(model), rows["inputs"], rows["segment_ids"], max(size, 1))
    return [self.names[i] for i in predictions(logits, "single_label")]


# --- the objective ----------------------------------------------------------------------------------

# methods that train the score head: with an adapter it is PEFT's modules_to_save (prompt / prefix
# tuning have no such slot in ftjax)
HEAD_METHODS = ("lora", "qlora", "ia3", "adapter", "full")
_LABEL_CACHE: dict = {}


class Classification(Objective):
  """objective="classification": the `score` head on the decoder (see the module docstring)."""

  name = "classification"
  config_block = "classification"
  best_metric = "accuracy"
  greater_is_better = True

  @property
  def block(self):
    return self.config.classification

  def validate(self) -> None:
    c, config = self.block, self.config
    if c.problem_type not in PROBLEM_TYPES:
      raise FtjaxError(f"config: classification.problem_type={c.problem_type!r}; expected one of "
                       f"{PROBLEM_TYPES}")
    if c.template not in TEMPLATES:
      raise FtjaxError(f"config: classification.template={c.template!r}; expected one of {TEMPLATES}")
    other = [m for m in config_lib.methods(config) if m not in HEAD_METHODS]
    if other:
      raise FtjaxError(f"config: method {config.method!r} under objective='classification': "
                       f"{other[0]} has no place for the trained score head; use one of {HEAD_METHODS}")
    if config.eval.generate and c.problem_type != "single_label":
      raise FtjaxError("config: eval.generate=True under classification.problem_type="
                       f"{c.problem_type!r}: the prompting baselines answer one label per text "
                       "(single_label only)")
    if config.eval.generate and config.eval.forgetting:
      raise FtjaxError("config: eval.forgetting=True with eval.generate under "
                       "objective='classification': the forgetting probe needs the fine-tuned "
                       "model's vocab head, which the classifier drops; set eval.forgetting=False")
    self.class_weights()  # parsed and checked now, before anything loads

  def class_weights(self) -> tuple[float, ...]:
    """classification.class_weights: "" (none) or one positive number per class, in id order."""
    text = self.block.class_weights.strip()
    if not text:
      return ()
    try:
      weights = tuple(float(w) for w in text.split(","))
    except ValueError:
      raise FtjaxError(f"config: classification.class_weights={text!r}: expected comma-separated "
                       "numbers, one per class") from None
    if any(not w > 0 for w in weights):
      raise FtjaxError(f"config: classification.class_weights={text!r}: weights must be > 0")
    return weights

  def labels(self) -> list[str]:
    """The class names in id order (read from the train data when classification.labels is "")."""
    spec, train = self.block.labels, self.config.data.train
    key = (spec, train, self.block.problem_type, self.config.data.fields, _mtimes(train))
    if key not in _LABEL_CACHE:
      examples = None
      if not spec.strip():
        examples, problems = read_split(train, self.block.problem_type, self._fields())
        if not examples and problems:
          raise FtjaxError(f"classification.labels is empty and no record of data.train has a "
                           f"usable label to take the class names from; the first: "
                           f"{problems[0].message}", code=problems[0].code)
      _LABEL_CACHE[key] = resolve_labels(spec, examples)
    names = _LABEL_CACHE[key]
    weights = self.class_weights()
    if weights and len(weights) != len(names):
      raise FtjaxError(f"config: classification.class_weights has {len(weights)} weights for "
                       f"{len(names)} classes")
    return names

  def _fields(self):
    return config_lib.fields(self.config.data.fields)

  def row_spec(self):
    seq = (self.config.data.seq_len,)
    labels = (((), np.int32) if self.block.problem_type == "single_label"
              else ((len(self.labels()),), np.float32))
    return {"inputs": (seq, np.int32), "segment_ids": (seq, np.int32), "positions": (seq, np.int32),
            "labels": labels, "row_mask": ((), np.float32)}

  def synthetic_batch(self, vocab_size, seed=0):
    batch = super().synthetic_batch(vocab_size, seed)
    shape = batch["inputs"].shape
    batch["segment_ids"] = np.ones(shape, np.int32)
    batch["positions"] = np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape).copy()
    batch["labels"] = (np.zeros_like(batch["labels"]) if self.block.problem_type == "single_label"
                       else batch["labels"])
    return batch

  def check_data(self, tokenizer):
    return classification_check.check(self, tokenizer)

  def dataset(self, examples, tokenizer, *, train, name):
    d = self.config.data
    if not examples:
      raise FtjaxError(f"{name}: no examples", code="empty_split")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, truncated = build_rows(examples, self.labels(), tokenizer, seq_len=d.seq_len,
                                 problem_type=self.block.problem_type,
                                 template=self.block.template, pad_id=pad)
    tokens = int(rows["segment_ids"].sum())
    summary = dict(examples=len(examples), kept=len(examples), rows=len(examples), seq_len=d.seq_len,
                   max_len=d.seq_len, packed=False, tokens=tokens, trained_tokens=tokens,
                   fill=tokens / max(1, rows["segment_ids"].size), over_length=truncated,
                   truncated=truncated, dropped=0, no_trained_tokens=0, no_user_turn=0,
                   first_over_length=None, classes=len(self.labels()), files=[name])
    return Dataset(examples, rows, summary, d.seq_len)

  def loss_fn(self, model_cfg, mesh):
    m = self.config.model
    ops.check_attention(m.attention)
    return ClassificationLoss(self.block.problem_type, self.class_weights(), remat=m.remat,
                              unroll=True if m.scan_unroll == -1 else m.scan_unroll,
                              attention=m.attention)

  def build_model(self, model):
    return SequenceClassifier.from_causal_lm(model, len(self.labels()), seed=self.config.train.seed)

  def peft_options(self, modules_to_save):
    return {"task_type": "SEQ_CLS", "modules_to_save": tuple(dict.fromkeys(
        (*(modules_to_save or ()), "score")))}

  def run_state(self):
    return {"labels": self.labels(), "problem_type": self.block.problem_type}

  def eval_metrics(self, model, dataset, batch_size, max_rows=0):
    """accuracy, macro_f1, per_class and confusions on the eval rows (report)."""
    rows = dataset.rows
    n = len(rows["inputs"]) if not max_rows else min(max_rows, len(rows["inputs"]))
    logits = logits_of(forward_fn(model), rows["inputs"][:n], rows["segment_ids"][:n], batch_size)
    return report(rows["labels"][:n], predictions(logits, self.block.problem_type), self.labels())

  def eval_plan(self) -> ClassificationPlan:
    """eval.generate: the base model prompted with the instruction (zero-shot, k-shot from the
    train split) against the tuned classifier, on the same eval examples (ClassificationPlan)."""
    cfg, names = self.config, self.labels()
    texts = {}

    def read(path):  # the split's labelled texts as chat examples with the label as reference
      # records with problems are left out: the data check has already refused them in eval
      examples = read_split(path, "single_label", self._fields())[0]
      texts[path] = examples = examples if path == cfg.data.eval else spread_over_classes(examples)
      return [prompt_example(ex, names) for ex in examples]

    plan = ClassificationPlan.build(cfg.data.eval, cfg.eval,
                                    pool_path=cfg.eval.few_shot_pool or cfg.data.train,
                                    data_cfg=cfg.data, near_dup=cfg.data.check.near_dup, read=read)
    return dataclasses.replace(plan, names=names, texts=texts[cfg.data.eval][:len(plan.examples)],
                               seq_len=cfg.data.seq_len, template=self.block.template,
                               model_path=cfg.model.name_or_path)

  def save_merged(self, model, tokenizer, out_dir, *, max_shard_size="5GB", overwrite=False):
    classifier.save_pretrained(model, out_dir, self.labels(), tokenizer,
                               problem_type=self.block.problem_type, overwrite=overwrite,
                               max_shard_size=max_shard_size)


def _mtimes(path: str) -> tuple:
  try:
    return tuple(os.path.getmtime(p) for p in dataset_lib.expand(path))
  except (OSError, FtjaxError):
    return ()
