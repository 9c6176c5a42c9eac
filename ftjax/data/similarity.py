"""Near-duplicate similarity of texts, for the data check (duplicates within a split, train/eval
leakage).

The measure: Jaccard similarity of the sets of character 5-gram shingles of two texts
(casefolded, every run of non-word characters read as one space), counting only the shingles
that are not boilerplate. Characters rather than words so that it holds on a one-line message
as on a long problem: a changed word costs about its length + 4 of a text's ~character-count
shingles, where word 5-grams lose up to 5 of ~word-count ones (a listing with 2 of 16 words
changed kept 6 of its 12 word 5-grams, 0.33, and scores 0.82 here); and on scripts written
without spaces.

Boilerplate, judged in each split on its own (a shingle that is boilerplate in either split does
not count for a train/eval pair, neither in the intersection nor in the union):
  common     a shingle in more than COMMON_SHARE of the split's texts (and more than COMMON_MIN
             of them): a shared instruction line, a "Message:" prefix, a template, and stock
             fragments ("how m", " the ") that raise the background of unrelated texts.
  its edges  a shingle that shares a character with a run of RUN or more consecutive shingles
             each in more than SPAN_SHARE of the texts (a span most texts repeat verbatim): the
             few that join it to what follows ("age w" in "...message: what"), which would
             otherwise make the messages that start alike similar.
A pair also shares at least MIN_SHARED counted shingles (~12 characters). Texts that are
nothing but boilerplate have no near duplicates (the exact-duplicate check still
sees them). The price: near copies of one text making up more than COMMON_SHARE of a split are
each other's boilerplate and are not reported (exact copies still are), a template shared by
fewer texts than that still counts, and a message's words that the instruction also uses stop
counting (on 1,000 one-line queries under one instruction, of ~100 pairs 5 near 0.4 appeared
and 7 went).

Exact, not MinHash: the pairs that share a counted shingle are found by a sparse product of
text x shingle matrices (scipy, a dependency of jax), whose cost is bounded because a counted
shingle is in at most COMMON_SHARE of the texts. scripts/calibrate_near_dup.py measures false
positives, recall on planted edits and time on a long-text and a short-text set; docs/
benchmarks.md has a run. Why 5% and not less (cheaper): at 1% two of the three gsm8k rewrites
word 5-grams found fall under 0.4 (0.38, 0.35); at 2% recall on planted names-and-numbers
rewrites falls from 94% to 88%.
"""

from __future__ import annotations

import re

import numpy as np

GRAM = 5  # characters per shingle
COMMON_SHARE = 0.05  # a shingle in more than this share of a split's texts is boilerplate ...
COMMON_MIN = 10  # ... when it is also in more than this many of them (small splits)
SPAN_SHARE = 0.5  # a run of RUN consecutive shingles each in more than this share of the
RUN = 8  # texts (12+ characters most texts repeat verbatim) takes its edges along
# a pair shares at least this many counted shingles (~12 characters of text that is not
# boilerplate): without it two short templated texts whose every word is boilerplate but one
# number scored 1.0 on the one shingle left ("send 50 euros to Anna" / "... to Li Wei")
MIN_SHARED = 8
ROWS_PER_BLOCK = 2048  # texts per block of the sparse product: bounds its memory

_WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so each step of the hash is a bijection


def normalise(text: str) -> str:
  """Casefolded words joined by single spaces: punctuation, case and spacing do not count."""
  return " ".join(_WORD.findall(text.casefold()))


def shingle_occurrences(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(text index, shingle hash) of every character GRAM-gram of each normalised text, in text
  then position order. A text shorter than GRAM is one shingle (itself); an empty one none.
  64-bit polynomial hashes: two different shingles colliding (odds ~1e-8 among a million
  distinct ones) would only be counted as one."""
  norm = [normalise(t) for t in texts]
  norm = [s + "\0" * (GRAM - len(s)) if 0 < len(s) < GRAM else s for s in norm]
  lengths = np.array([len(s) for s in norm], dtype=np.int64)
  codes = np.frombuffer("".join(norm).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
  count = np.maximum(lengths - GRAM + 1, 0)  # shingles per text
  doc = np.repeat(np.arange(len(texts), dtype=np.int64), count)
  first_char = np.cumsum(lengths) - lengths
  first_shingle = np.cumsum(count) - count
  pos = np.repeat(first_char - first_shingle, count) + np.arange(count.sum())
  hashes = np.zeros(len(pos), dtype=np.uint64)
  for k in range(GRAM):  # wraps modulo 2**64 on purpose
    hashes = hashes * _MULTIPLIER + codes[pos + k] + np.uint64(1)
  return doc, hashes


def _shares(doc, token, n_texts, n_tokens):
  """Per token: the share of the texts it is in (0 for a token in fewer than COMMON_MIN + 1)."""
  present = _distinct(doc * n_tokens + token)  # (text, token) pairs
  texts_with = np.bincount(present % n_tokens, minlength=n_tokens)
  return np.where(texts_with > COMMON_MIN, texts_with / max(n_texts, 1), 0.0)


def _distinct(values):
  """Sorted distinct values (np.unique's hash path measured 10x slower on 2 M int64)."""
  values = np.sort(values)
  return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


def _edges_of_runs(doc, common):
  """Occurrences that share a character with a run of >= RUN consecutive `common` occurrences
  of the same text (a text's occurrences start at consecutive characters)."""
  n = len(doc)
  if not n:
    return np.zeros(0, dtype=bool)
  starts_run = np.ones(n, dtype=bool)
  starts_run[1:] = (common[1:] != common[:-1]) | (doc[1:] != doc[:-1])
  run = np.cumsum(starts_run) - 1
  in_long_run = common & (np.bincount(run)[run] >= RUN)
  if not in_long_run.any():
    return np.zeros(n, dtype=bool)
  before = np.concatenate([[0], np.cumsum(in_long_run)])  # long-run occurrences before index i
  per_text = np.bincount(doc)
  first = np.repeat(np.cumsum(per_text) - per_text, per_text)  # the text's first occurrence
  last = first + per_text[doc] - 1
  i = np.arange(n)
  lo, hi = np.maximum(i - GRAM + 1, first), np.minimum(i + GRAM - 1, last)
  return before[hi + 1] - before[lo] > 0


def _matrices(sides):
  """One sparse text x token 0/1 matrix per split, of the shingles that count."""
  import scipy.sparse
  occurrences = [shingle_occurrences(texts) for texts in sides]
  vocabulary, token = np.unique(np.concatenate([h for _, h in occurrences]), return_inverse=True)
  token = np.split(token, np.cumsum([len(h) for _, h in occurrences])[:-1])
  share = np.zeros(len(vocabulary))
  for texts, (doc, _), tok in zip(sides, occurrences, token):
    share = np.maximum(share, _shares(doc, tok, len(texts), len(vocabulary)))
  out = []
  for texts, (doc, _), tok in zip(sides, occurrences, token):
    counted = (share[tok] <= COMMON_SHARE) & ~_edges_of_runs(doc, share[tok] > SPAN_SHARE)
    m = scipy.sparse.csr_matrix((np.ones(counted.sum(), dtype=np.int32), (doc[counted], tok[counted])),
                                shape=(len(texts), len(vocabulary)))
    m.sum_duplicates()
    m.data[:] = 1  # a set: a shingle counts once per text
    out.append(m)
  return out


def similar_pairs(left: list[str], right: list[str] | None, threshold: float) -> list[tuple]:
  """[(i, j, similarity)] of texts left[i], right[j] at or above `threshold` (> 0), most similar
  first; right=None compares left with itself (i < j)."""
  same = right is None
  matrices = _matrices([left] if same else [left, right])
  a, b = matrices[0], matrices[-1]
  size_a, size_b = np.diff(a.indptr), np.diff(b.indptr)
  pairs = []
  for lo in range(0, a.shape[0], ROWS_PER_BLOCK):
    first = lo if same else 0  # within a split only the pairs i < j: half the product
    shared = (a[lo:lo + ROWS_PER_BLOCK] @ b[first:].T).tocoo()
    i, j, k = shared.row + lo, shared.col + first, shared.data
    if same:
      i, j, k = i[i < j], j[i < j], k[i < j]
    score = k / (size_a[i] + size_b[j] - k)
    hit = (score >= threshold) & (k >= MIN_SHARED)
    pairs += zip(i[hit].tolist(), j[hit].tolist(), np.round(score[hit], 4).tolist())
  return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))
