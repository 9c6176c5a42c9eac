"""Tokenized examples -> fixed-size rows for next-token prediction.

A row holds seq_len + 1 tokens; inputs = row[:-1], targets = row[1:]. With packing several
documents share a row (first-fit decreasing by length); each gets its own segment id (1, 2, ...;
0 = padding) and positions restarting at 0, so a model that masks attention by segment sees
exactly what it would see unpacked. The target after a document's last token is the next
document's first token: that position is masked out, so the trained targets (and the loss sum)
are the same with and without packing.
"""

import numpy as np

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def assign_rows(lengths, capacity, pack=True):
  """Lists of example indices per row. Deterministic: depends only on the lengths."""
  if not pack:
    return [[i] for i in range(len(lengths))]
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  free = np.empty(len(lengths), np.int64)  # free space per row, rows opened so far
  rows = []
  for i in order:
    fits = np.flatnonzero(free[:len(rows)] >= lengths[i])
    if fits.size:
      r = int(fits[0])
    else:
      r = len(rows)
      rows.append([])
      free[r] = capacity
    rows[r].append(i)
    free[r] -= lengths[i]
  return rows


def pack(examples, seq_len, *, pack=True, pad_id=0):
  """Rows as a dict of arrays [n_rows, seq_len]: int32 except loss_mask (float32).

  Every example must be at most seq_len + 1 tokens (the length policy runs before this).
  """
  capacity = seq_len + 1
  lengths = [len(ex.tokens) for ex in examples]
  too_long = [ex.where for ex, n in zip(examples, lengths) if n > capacity]
  if too_long:
    raise ValueError(f"{len(too_long)} examples exceed seq_len + 1 = {capacity} tokens "
                     f"(first: {too_long[0]}); apply the length policy before packing")
  layout = assign_rows(lengths, capacity, pack)
  n = len(layout)
  tokens = np.full((n, capacity), pad_id, np.int32)
  mask = np.zeros((n, capacity), np.float32)
  segs = np.zeros((n, capacity), np.int32)
  pos = np.zeros((n, capacity), np.int32)
  for r, members in enumerate(layout):
    at = 0
    for seg, i in enumerate(members, start=1):
      ex = examples[i]
      k = len(ex.tokens)
      tokens[r, at:at + k] = ex.tokens
      mask[r, at:at + k] = ex.loss_mask
      segs[r, at:at + k] = seg
      pos[r, at:at + k] = np.arange(k)
      at += k
  # A target is trained only if it belongs to the same document as the input predicting it.
  same_doc = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] > 0)
  return {
    "inputs": tokens[:, :-1].copy(),
    "targets": tokens[:, 1:].copy(),
    "loss_mask": mask[:, 1:] * same_doc,
    "segment_ids": segs[:, :-1].copy(),
    "positions": pos[:, :-1].copy(),
  }
