"""Tokenising chat data: the one-at-a-time path against the batched one, and a cache hit.

  python scripts/bench_tokenize.py --data DIR/gsm8k [--n 10000] [--rounds 3]

Reads gsm8k's train + test questions and answers as input/output examples (cycled to --n), with
the built-in model's tokenizer (SmolLM2's ChatML template), and times, in alternating rounds so
a busy neighbour slows each alike:
  one_at_a_time    what ftjax did when tokenising was first timed: per example, the template
                   rendered for its pieces, each piece encoded by its own `encode` call, plus the
                   whole string to check the cuts;
  batched_offsets  the first batched version: per example two renders for the pieces, then every
                   whole string encoded in one `encode_batch` call with character offsets, each
                   token assigned to its piece by offsets;
  batched          ftjax.data.template.tokenize_many today: one render per conversation shape
                   with the contents pasted in (ftjax/data/skeleton.py), each distinct string
                   encoded once in one `encode_batch_fast` call without offsets, the pieces found
                   from token byte lengths (ftjax/data/bytelevel.py);
  cache_hit        ftjax.data.cache.tokenize on data tokenised before (read from disk).
Checks that all four give identical tokens and masks, then prints one JSON line. Each round
starts with the next path in turn, and no path's output stays alive while the next one runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time

import numpy as np


def one_at_a_time(examples, tok):
  from ftjax.data import template
  backend = template._rust_backend(tok)
  out = []
  for ex in examples:
    pieces = template._template_pieces(ex, tok)
    ids = [p if isinstance(p, list) else list(tok.encode(p, add_special_tokens=False))
           for p, _, _ in pieces]
    full = "".join(p for p, _, _ in pieces)
    whole = tok.encode(full, add_special_tokens=False)
    tokens, mask = template._join_pieces(pieces, ids, tok)
    if tokens != list(whole):  # a BPE merge across a cut: assign the whole string's tokens
      tokens, mask = template._assign_encoding(pieces, backend.encode(full, add_special_tokens=False), tok)
    mask[0] = 0
    out.append((tokens, mask))
  return out


def batched_offsets(examples, tok):
  from ftjax.data import template
  backend = template._rust_backend(tok)
  pieces = [template._template_pieces(ex, tok) for ex in examples]
  encodings = backend.encode_batch(["".join(p for p, _, _ in ps) for ps in pieces],
                                   add_special_tokens=False)
  out = []
  for ps, enc in zip(pieces, encodings):
    tokens, mask = template._assign_encoding(ps, enc, tok)
    mask[0] = 0
    out.append((tokens, mask))
  return out


def _flat(pairs):
  """(all tokens, all masks, lengths): one comparable form for every path's output."""
  return (np.concatenate([np.asarray(t, np.int64) for t, _ in pairs]),
          np.concatenate([np.asarray(m, np.int64) for _, m in pairs]),
          np.array([len(t) for t, _ in pairs]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="a folder with gsm8k's train.jsonl, test.jsonl")
  parser.add_argument("--n", type=int, default=10_000)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--model", default="smollm2-135m-instruct")
  args = parser.parse_args()

  from ftjax.data import cache, formats, sources, template
  from ftjax.models.resolve import tokenizer_for
  records = [r for name in ("train.jsonl", "test.jsonl")
             for r in sources.read_records(os.path.join(args.data, name))]
  base = formats.to_examples(records, fields={"question": "input", "answer": "output"})
  examples = list(itertools.islice(itertools.cycle(base), args.n))
  tok = tokenizer_for(args.model)

  def cache_hit():
    cache._last.clear()  # read from disk, as a new process would
    return cache.tokenize(examples, tok)

  paths = {"one_at_a_time": lambda: one_at_a_time(examples, tok),
           "batched_offsets": lambda: batched_offsets(examples, tok),
           "batched": lambda: template.tokenize_many(examples, tok),
           "cache_hit": cache_hit}
  times = {name: [] for name in paths}
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["FTJAX_TOKEN_CACHE"] = tmp
    reference = cache.tokenize(examples, tok)  # writes the cache file
    want = _flat([(t.tokens, t.loss_mask) for t in reference])
    names = list(paths)
    for r in range(args.rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:  # each path first in turn
        t = time.perf_counter()
        out = paths[name]()
        times[name].append(time.perf_counter() - t)
        got = _flat([(o.tokens, o.loss_mask) if hasattr(o, "tokens") else o for o in out])
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), f"{name} differs"
        del out, got  # nothing of one path stays alive while the next runs
  median = {k: statistics.median(v) for k, v in times.items()}
  distinct = len({json.dumps(ex.messages) for ex in examples})
  print(json.dumps({"examples": len(examples), "distinct": distinct, "tokens": int(len(want[0])),
                    "seconds": times, "median_s": median,
                    "speedup_batched_offsets": median["one_at_a_time"] / median["batched_offsets"],
                    "speedup_batched": median["one_at_a_time"] / median["batched"],
                    "speedup_cache_hit": median["one_at_a_time"] / median["cache_hit"],
                    "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default")}))


if __name__ == "__main__":
  main()
