"""Preference objectives: `dpo` (+ IPO / hinge / robust, RPO), `orpo`, `simpo`, `kto`.

Each reads its config block (TRL's names and defaults), reads TRL's preference formats
(ftjax/data/preference.py) in the data check, builds rows of one pair each ([2, seq] per key:
chosen, rejected; for KTO the example and its mismatched KL sequence), and returns the losses of
ftjax/objectives/logps.py. DPO and KTO need a reference model: under PEFT the same model with
its adapters disabled inside the step; under full fine-tuning (or `*.precompute_ref_logps`)
log-probs computed once by `before_training` and stored in the workdir (ref_logps.npz), so a
resumed run reads them instead of scoring the already-trained model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types

import numpy as np

from ftjax.data import dataset as dataset_lib
from ftjax.data import formats, template
from ftjax.data import preference as pref_data
from ftjax.data import sources
from ftjax.data.selection import Split
from ftjax.errors import FtjaxError
from ftjax.losses import vocab_chunk
from ftjax.models import ops
from ftjax.objectives import logps as logps_lib
from ftjax.objectives import preference
from ftjax.objectives.base import Objective
from ftjax.step import merge_model

log = logging.getLogger(__name__)

REF_LOGPS_FILE = "ref_logps.npz"


class _Preference(Objective):
  """What the four share: pair rows, the data check of TRL's formats, the decoder options."""
  unpaired = False  # KTO: {"prompt", "completion", "label"} records

  @property
  def block(self):
    return self.config[self.config_block]

  def _check(self, ok, key, expected):
    if not ok:
      value = self.block[key]
      raise FtjaxError(f"config: {self.config_block}.{key}={value!r}; expected {expected}")

  def validate(self):
    if "beta" in self.block:
      self._check(self.block.beta > 0, "beta", "> 0")

  def needs_reference(self) -> bool:
    return False

  def precomputes_reference(self) -> bool:
    """Reference log-probs stored in the rows: asked for, or full fine-tuning (no adapters to
    disable: the reference would be the trained model itself)."""
    return self.needs_reference() and (bool(self.block.get("precompute_ref_logps"))
                                       or self.config.method == "full")

  def row_spec(self):
    seq = (2, self.config.data.seq_len)
    spec = {k: (seq, np.float32 if k in ("loss_mask", "target_mask") else np.int32)
            for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions", "target_mask")}
    if self.precomputes_reference():
      spec["ref_logps"] = ((2,), np.float32)
    return spec

  def forward(self, model_cfg, mesh) -> logps_lib.Forward:
    m = self.config.model
    ops.check_attention(m.attention)
    # vocab_chunk sizes chunks for batch_size rows; a pair row is two sequences: as for 2x rows.
    t = self.config.train
    doubled = types.SimpleNamespace(data=self.config.data, train=types.SimpleNamespace(
        vocab_chunk=t.vocab_chunk, batch_size=2 * t.batch_size, grad_accum=t.grad_accum))
    return logps_lib.Forward(remat=m.remat, unroll=True if m.scan_unroll == -1 else m.scan_unroll,
                             vocab_chunk=vocab_chunk(doubled, model_cfg, mesh), attention=m.attention)

  # --- data ---

  def check_split(self, path, tokenizer, *, seq_len, length_policy="truncate", system_prompt=None,
                  fields=None, **_):
    """The data check's Split: TRL's formats read (data.fields renaming first), problems at
    file:line (ftjax.data.preference), token lengths of the longer sequence of each pair."""
    items, problems, origin = [], [], []
    for p in dataset_lib.expand(path):
      records, bad = sources.read_all(p)
      records = [formats.rename(r, fields) for r in records] if fields else records
      found, invalid = pref_data.read_pairs(records, system_prompt=system_prompt,
                                            unpaired=self.unpaired)
      items += found
      origin += [p] * len(found)
      problems += bad + invalid
    if not self.unpaired:
      problems += pref_data.duplicates(items)
    template.require_chat_template(tokenizer, items, path)
    kept, _, over = pref_data.tokenize_items(items, tokenizer, max_len=seq_len + 1,
                                             length_policy="truncate")
    lengths = {id(item): max(len(t.tokens) for t in texs) for item, texs in kept}
    action = {"truncate": "truncated", "drop": "dropped", "error": "error"}[length_policy]
    problems += [dataclasses.replace(p, message=f"{p.message} ({action})") for p in over]
    problems.sort(key=lambda q: (q.where.rsplit(":", 1)[0], _line(q.where)))
    return Split(items, problems, lengths, origin)

  def token_stats(self, examples, lengths, tokenizer, *, pack):
    if not examples:
      return {"examples": 0}
    return self.dataset_token_stats(examples, lengths, tokenizer)[0]

  def dataset(self, examples, tokenizer, *, train, name, length_policy=None):
    d = self.config.data
    kept, counts, _ = pref_data.tokenize_items(examples, tokenizer, max_len=d.seq_len + 1,
                                               length_policy=length_policy or d.length_policy)
    if not kept:
      raise FtjaxError(f"{name}: no pair left after data.length_policy={d.length_policy!r} "
                       f"(counts: {counts})", code="empty_split")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = (pref_data.kto_rows(kept, tokenizer, d.seq_len, pad) if self.unpaired
            else pref_data.pair_rows(kept, d.seq_len, pad))
    n = rows["inputs"].shape[0]
    summary = dict(counts, kept=n, files=[], max_len=d.seq_len + 1, seq_len=d.seq_len, packed=False,
                   rows=n, tokens=int((rows["segment_ids"] > 0).sum()),
                   trained_tokens=int(rows["loss_mask"].sum()), no_user_turn=0,
                   first_over_length=None,
                   fill=float((rows["segment_ids"] > 0).sum() / max(1, rows["segment_ids"].size)))
    return dataset_lib.Dataset([item for item, _ in kept], rows, summary, d.seq_len)

  def read_examples(self, path):
    d = self.config.data
    items = []
    for p in dataset_lib.expand(path):
      records, _ = sources.read_all(p)
      items += pref_data.read_pairs(records, system_prompt=d.system_prompt or None,
                                    unpaired=self.unpaired)[0]
    return items

  def report_loss(self, eval_means):
    row = dict(eval_means)
    if self.needs_reference():
      row["note"] = (f"The base model is {self.name}'s reference: its rewards and margins are 0 by "
                     "construction, and its reward accuracy (chosen strictly above rejected, as "
                     "TRL counts) 0%; a coin flip would score 50%.")
    return row

  # --- reference log-probs ---

  def before_training(self, run, workdir):
    """Reference log-probs into the rows when this run precomputes them: read from the workdir
    when it holds them for these rows, else computed from the model as set up (before any
    checkpoint is restored: the starting model) and written there."""
    if not self.precomputes_reference():
      return
    datasets = {"train": run.train_ds, "eval": run.eval_ds}
    for name, ds in datasets.items():
      for part in getattr(ds, "datasets", {0: ds}).values() if ds is not None else ():
        part.rows["ref_logps"] = self._ref_logps(run, workdir, f"{name}", part.rows)

  def _ref_logps(self, run, workdir, name, rows):
    path = os.path.join(workdir, REF_LOGPS_FILE)
    stored = dict(np.load(path)) if os.path.exists(path) else {}
    if name in stored and stored[name].shape == (rows["inputs"].shape[0], 2):
      log.info("reference log-probs (%s) read from %s", name, path)
      return stored[name]
    model = merge_model(run.graphdef, run.trainable, run.frozen, run.mutable)
    forward = self.forward(run.model_cfg, run.mesh)
    seqs = {k: v for k, v in rows.items() if k != "ref_logps"}
    micro = self.config.train.batch_size // self.config.train.grad_accum
    ref = logps_lib.precompute_ref_logps(model, seqs, forward, batch_size=micro)
    stored[name] = ref
    tmp = path + ".tmp.npz"
    np.savez(tmp, **stored)
    os.replace(tmp, path)  # never a half-written file under the final name
    log.info("reference log-probs (%s, %d rows) computed and stored in %s", name, len(ref), path)
    return ref


def _line(where):
  tail = where.rsplit(":", 1)[-1]
  return int(tail) if tail.isdigit() else 0


class DPO(_Preference):
  name = "dpo"
  config_block = "dpo"

  def validate(self):
    super().validate()
    b = self.block
    self._check(b.loss_type in preference.DPO_LOSS_TYPES, "loss_type",
                f"one of {preference.DPO_LOSS_TYPES}")
    self._check(0.0 <= b.label_smoothing < 0.5, "label_smoothing", "a value in [0, 0.5)")
    # TRL 1.x reads label_smoothing only in the robust loss; elsewhere it would do nothing.
    self._check(b.label_smoothing == 0 or b.loss_type == "robust", "label_smoothing",
                "0 unless dpo.loss_type='robust' (the only loss that reads it)")
    self._check(b.rpo_alpha >= 0, "rpo_alpha", ">= 0")

  def needs_reference(self):
    return True

  def loss_fn(self, model_cfg, mesh):
    b = self.block
    return logps_lib.DPOLoss(beta=float(b.beta), loss_type=b.loss_type,
                             label_smoothing=float(b.label_smoothing),
                             rpo_alpha=float(b.rpo_alpha) if b.rpo_alpha else None,
                             forward=self.forward(model_cfg, mesh))


class ORPO(_Preference):
  name = "orpo"
  config_block = "orpo"

  def loss_fn(self, model_cfg, mesh):
    return logps_lib.ORPOLoss(beta=float(self.block.beta), forward=self.forward(model_cfg, mesh))


class SimPO(_Preference):
  name = "simpo"
  config_block = "simpo"

  def validate(self):
    super().validate()
    self._check(0.0 <= self.block.label_smoothing < 0.5, "label_smoothing", "a value in [0, 0.5)")
    self._check(self.block.cpo_alpha >= 0, "cpo_alpha", ">= 0")

  def loss_fn(self, model_cfg, mesh):
    b = self.block
    return logps_lib.SimPOLoss(beta=float(b.beta), gamma=float(b.gamma),
                               label_smoothing=float(b.label_smoothing),
                               cpo_alpha=float(b.cpo_alpha), forward=self.forward(model_cfg, mesh))


class KTO(_Preference):
  name = "kto"
  config_block = "kto"
  unpaired = True

  def validate(self):
    super().validate()
    for key in ("desirable_weight", "undesirable_weight"):
      self._check(self.block[key] > 0, key, "> 0")

  def needs_reference(self):
    return True

  def row_spec(self):
    return dict(super().row_spec(), label=((), np.float32))

  def loss_fn(self, model_cfg, mesh):
    b = self.block
    return logps_lib.KTOLoss(beta=float(b.beta), desirable_weight=float(b.desirable_weight),
                             undesirable_weight=float(b.undesirable_weight),
                             forward=self.forward(model_cfg, mesh))
