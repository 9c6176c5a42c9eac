"""Supervised fine-tuning: next-token loss on the completion tokens, examples packed into rows.

The first objective, and the worked example of docs/design.md "Adding an objective". Its rows
are ftjax.data.packing's: inputs / targets / loss_mask / segment_ids / positions, [seq] each.
"""

from __future__ import annotations

import numpy as np

from ftjax.data import packing
from ftjax.data.dataset import dataset_from_examples
from ftjax.losses import CausalLMLoss, vocab_chunk
from ftjax.models import ops
from ftjax.objectives.base import Objective


class SFT(Objective):
  name = "sft"

  def row_spec(self):
    seq = (self.config.data.seq_len,)
    return {k: (seq, np.float32 if k == "loss_mask" else np.int32) for k in packing.FIELDS}

  def dataset(self, examples, tokenizer, *, train, name):
    d = self.config.data
    # Eval rows are never packed: an eval batch then holds whole examples.
    return dataset_from_examples(examples, tokenizer, seq_len=d.seq_len, pack=d.pack and train,
                                 length_policy=d.length_policy, name=name)

  def loss_fn(self, model_cfg, mesh):
    m = self.config.model
    ops.check_attention(m.attention)
    return CausalLMLoss(remat=m.remat, unroll=True if m.scan_unroll == -1 else m.scan_unroll,
                        vocab_chunk=vocab_chunk(self.config, model_cfg, mesh),
                        attention=m.attention)

  def synthetic_batch(self, vocab_size, seed=0):
    # Every position trained, one document per row, as a fully packed batch is.
    batch = super().synthetic_batch(vocab_size, seed)
    shape = batch["inputs"].shape
    batch["segment_ids"] = np.ones(shape, np.int32)
    batch["positions"] = np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape).copy()
    return batch
