"""Near-duplicate similarity of texts, for the data check (duplicates within a split, train/eval
leakage).

The measure: Jaccard similarity of the sets of character 5-gram shingles of each text
(casefolded, every run of non-word characters read as one space), counting only the shingles that
are not boilerplate. Characters rather than words so that it holds on a one-line message as on a
long problem (a changed word costs ~its length + 4 shingles of ~all characters, not 5 of ~all
words), and on scripts written without spaces.

Boilerplate: a shingle found in more than COMMON_SHARE of a split's texts (and in more than
COMMON_MIN of them) does not count, neither in the intersection nor in the union. A shared
instruction line, a fixed "Message:" prefix or a template is in every text of its split, so it
makes no pair similar; so are stock fragments ("how m", "what ") that raise the background of
unrelated texts. Texts that are nothing but boilerplate (no shingle left) have no near duplicates;
the exact-duplicate check still sees them. The price: near copies of one text that make up more
than COMMON_SHARE of a split look like boilerplate of each other and are not reported (their
exact copies still are).

Exact, not MinHash: the pairs that share a counted shingle are found by a sparse product of
text x shingle matrices (scipy, which jax already depends on), whose cost is bounded because
counted shingles are in at most COMMON_SHARE of the texts. docs/benchmarks.md has the
calibration (scripts/calibrate_near_dup.py) and the time on a 7.5k-example split.
"""

from __future__ import annotations

import re

import numpy as np

GRAM = 5  # characters per shingle
COMMON_SHARE = 0.01  # a shingle in more than this share of a split's texts is boilerplate ...
COMMON_MIN = 10  # ... when it is also in more than this many of them (small splits)
ROWS_PER_BLOCK = 2048  # texts per block of the sparse product: bounds its memory

_WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the rolling hash below is a bijection per step


def normalise(text: str) -> str:
  """Casefolded words joined by single spaces: punctuation, case and spacing do not count."""
  return " ".join(_WORD.findall(text.casefold()))


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(text index, shingle hash) of every distinct character GRAM-gram of each normalised text,
  sorted by text then hash. A text shorter than GRAM is one shingle (itself); an empty one none.
  64-bit polynomial hashes: two different shingles colliding (odds ~1e-8 for a million distinct
  ones) would only count them as one."""
  norm = [normalise(t) for t in texts]
  norm = [s + "\0" * (GRAM - len(s)) if 0 < len(s) < GRAM else s for s in norm]
  lengths = np.array([len(s) for s in norm], dtype=np.int64)
  codes = np.frombuffer("".join(norm).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
  starts = np.cumsum(lengths) - lengths
  count = np.maximum(lengths - GRAM + 1, 0)  # shingles per text
  doc = np.repeat(np.arange(len(texts), dtype=np.int64), count)
  pos = np.repeat(starts - np.cumsum(count) + count, count) + np.arange(count.sum())
  hashes = np.zeros(len(pos), dtype=np.uint64)
  for k in range(GRAM):  # wraps modulo 2**64 on purpose
    hashes = hashes * _MULTIPLIER + codes[pos + k] + np.uint64(1)
  order = np.lexsort((hashes, doc))
  doc, hashes = doc[order], hashes[order]
  first = np.ones(len(doc), dtype=bool)
  first[1:] = (doc[1:] != doc[:-1]) | (hashes[1:] != hashes[:-1])
  return doc[first], hashes[first]


def _matrix(doc, token, n_docs, n_tokens):
  import scipy.sparse
  data = np.ones(len(doc), dtype=np.int32)
  return scipy.sparse.csr_matrix((data, (doc, token)), shape=(n_docs, n_tokens))


def _counted(token, n_docs, n_tokens):
  """A mask of the token ids that are not boilerplate in this split."""
  df = np.bincount(token, minlength=n_tokens)
  return df <= max(COMMON_SHARE * n_docs, COMMON_MIN)


def similar_pairs(left: list[str], right: list[str] | None, threshold: float) -> list[tuple]:
  """[(i, j, similarity)] of texts left[i], right[j] at or above `threshold`, most similar first;
  right=None compares left with itself (i < j). Boilerplate is judged in each split on its own,
  and a shingle that is boilerplate in either does not count for the pair."""
  same = right is None
  sides = [left] if same else [left, right]
  shingles = [shingle_hashes(texts) for texts in sides]
  vocabulary, token = np.unique(np.concatenate([h for _, h in shingles]), return_inverse=True)
  token = np.split(token, np.cumsum([len(h) for _, h in shingles])[:-1])
  counted = np.ones(len(vocabulary), dtype=bool)
  for texts, tok in zip(sides, token):
    counted &= _counted(tok, len(texts), len(vocabulary))
  matrices = []
  for texts, (doc, _), tok in zip(sides, shingles, token):
    keep = counted[tok]
    matrices.append(_matrix(doc[keep], tok[keep], len(texts), len(vocabulary)))
  a = matrices[0]
  b = a if same else matrices[1]
  size_a, size_b = np.diff(a.indptr), np.diff(b.indptr)
  bt = b.T.tocsr()
  pairs = []
  for lo in range(0, a.shape[0], ROWS_PER_BLOCK):
    shared = (a[lo:lo + ROWS_PER_BLOCK] @ bt).tocoo()
    i, j, k = shared.row + lo, shared.col, shared.data
    keep = i < j if same else np.ones(len(i), dtype=bool)
    i, j, k = i[keep], j[keep], k[keep]
    score = k / (size_a[i] + size_b[j] - k)
    hit = score >= threshold
    pairs += zip(i[hit].tolist(), j[hit].tolist(), np.round(score[hit], 4).tolist())
  return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))
