"""Decode speed of ftjax.generate against transformers' `generate`, same weights, side by side.

  python scripts/bench_decode.py [--model smollm2-135m-instruct] [--batch 1 8] [--new 64]

Loads the model with ftjax (f32), writes it with `save_pretrained` and loads that directory
with transformers (f32, its default attention), so both hold the same weights.
Every batch size runs the same chat prompts (unequal lengths, left-padded by both) for exactly
--new greedy tokens (no stop token: both do the same work), in --rounds alternating rounds of
ftjax then transformers, after one untimed warm-up of each (ftjax's compiles happen there).
Prints one JSON line per batch size: tokens/s of each (new tokens x batch / wall time of the
whole `generate` call, prefill included), the per-round ratios and their median (> 1: ftjax is
faster), and whether the greedy tokens agree. --torch-threads (default: all cores) sets
torch's intra-op threads; on a crowded machine run 1 as well, since torch's OpenMP pool slows
down far more than XLA's when the cores are oversubscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one paragraph why the sky is blue, for a ten-year-old who asked at dinner.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
    "Give me a short motivational quote about learning new things every single day.",
    "What is 12 times 7?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2-135m-instruct")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--new", type=int, default=64, help="new tokens per row")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
  args = parser.parse_args()

  import numpy as np
  import torch
  import transformers

  from ftjax import models
  from ftjax.generate import encode_prompts, generate_ids

  torch.set_num_threads(args.torch_threads)
  model, tok = models.load(args.model)
  with tempfile.TemporaryDirectory() as tmp:
    models.save_pretrained(model, tmp, tok)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
  pad = tok.pad_token_id

  for batch in args.batch:
    ids = encode_prompts(tok, (PROMPTS * batch)[:batch], chat=True)
    width = max(map(len, ids))
    t_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    t_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])

    def run_ftjax():
      return generate_ids(model, ids, args.new, eos_ids=(), pad_id=pad)

    def run_torch():
      with torch.no_grad():
        out = ref.generate(t_ids, attention_mask=t_mask, do_sample=False, max_new_tokens=args.new,
                           min_new_tokens=args.new, pad_token_id=pad)
      return out[:, width:].tolist()

    def timed(fn):
      start = time.perf_counter()
      out = fn()
      return out, time.perf_counter() - start

    ours, compile_s = timed(run_ftjax)
    theirs, _ = timed(run_torch)
    ftjax_s, torch_s = [], []
    for _ in range(args.rounds):
      ftjax_s.append(timed(run_ftjax)[1])
      torch_s.append(timed(run_torch)[1])
    tokens = batch * args.new
    # min_new_tokens masks EOS in transformers' run only: compare each row up to its first EOS.
    eos = set(np.atleast_1d(model.config.eos_token_id).tolist()) | {tok.eos_token_id}
    n = [next((i for i, t in enumerate(row) if t in eos), len(row)) for row in ours]
    same = all(a[:k] == b[:k] for a, b, k in zip(ours, theirs, n))
    ratios = [t / f for f, t in zip(ftjax_s, torch_s)]
    print(json.dumps({
        "model": args.model, "batch": batch, "new_tokens": args.new, "prompt_width": width,
        "ftjax_tokens_per_s": round(tokens / statistics.median(ftjax_s), 1),
        "transformers_tokens_per_s": round(tokens / statistics.median(torch_s), 1),
        "ratio_per_round": [round(r, 2) for r in ratios],
        "ratio": round(statistics.median(ratios), 2),
        "first_call_s": round(compile_s, 2),
        "same_greedy_tokens": same,
    }), flush=True)


if __name__ == "__main__":
  main()
