"""A trained run's GGUF exports against its merged HF export, end to end.

  python -m ftjax.train --config configs/quickstart.py --workdir runs/quickstart
  python scripts/check_gguf_export.py --workdir runs/quickstart [--types f32,f16,bf16,q8_0] \
      [--transformers] [--prompt "What is the capital of France?"]

Exports the run with `python -m ftjax.export` (the merged HF folder, then one GGUF file per type,
into WORKDIR/gguf-check/), re-imports each GGUF file with ftjax's GGUF loader and compares its
logits with the merged HF model's on the chat-templated prompt followed by the merged model's own
greedy answer (relative error: max |difference| / max |logit|), then compares the greedy answers.
`--transformers` also decodes each GGUF file with transformers' own GGUF reader
(`from_pretrained(..., gguf_file=...)`) from the same prompt ids. Prints one JSON line per type
and exits 1 when a type is over its tolerance (TOLERANCE below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Relative max-abs logit error of the re-imported GGUF model against the merged HF model. The
# export rounds each weight once; the error is that rounding carried through the layers.
# Measured on the tiny 2-layer LoRA run of tests/test_gguf_export.py / on the SmolLM2-135M
# quickstart run (30 layers, 20 LoRA steps; docs/deploy.md):
#   f32   nothing is rounded                                                       0      / 0
#   f16   11-bit significand: 2^-11 = 4.9e-4 relative per weight                   7.3e-4 / 1.2e-3
#   bf16  8-bit significand: 2^-8 = 3.9e-3 per weight, 8x f16's                    5.9e-3 / 1.3e-2
#   q8_0  8-bit ints, one f16 scale per 32 weights: up to 1/254 of the block's
#         largest weight, more than bf16 on the small weights of a block           1.7e-2 / 4.4e-2
# Each bound is 2-8x the larger measured error (deeper models carry more rounding); a wrong,
# transposed or unpermuted tensor gives errors of order 1. q4_0 (not part of the check by
# default): ~0.15 on the tiny models of tests/test_gguf_export.py.
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "bf16": 6e-2, "q8_0": 0.1, "q4_0": 0.5}
README_PROMPT = "What is the capital of France?"


def _logits(model, ids: list[int]):
  import jax.numpy as jnp
  import numpy as np
  return np.asarray(model(jnp.asarray([ids]))[0], np.float64)


def _answer(model, stop: set[int], prompt_ids: list[int], max_new_tokens: int) -> list[int]:
  from ftjax.generate import generate_ids
  row = generate_ids(model, [prompt_ids], max_new_tokens, eos_ids=stop, pad_id=0)[0]
  return row[:next((i for i, t in enumerate(row) if t in stop), len(row))]  # as transformers' below


def _transformers_answer(folder: str, gguf_file: str, prompt_ids: list[int], stop: set[int],
                         max_new_tokens: int) -> list[int]:
  import torch
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                         dtype=torch.float32).eval()
  with torch.no_grad():
    # no stop ids: min_new_tokens keeps the file's own EOS from ending the answer early
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=sorted(stop) or None, pad_token_id=min(stop, default=0),
                      min_new_tokens=0 if stop else max_new_tokens)
  row = out[0, len(prompt_ids):].tolist()
  return row[:next((i for i, t in enumerate(row) if t in stop), len(row))]


def _text(tokenizer, ids: list[int]) -> dict:
  return {"text": tokenizer.decode(ids), "ids": ids}


def export(workdir: str, types: list[str]) -> tuple[str, dict[str, str]]:
  """(merged folder, {type: GGUF path}) under WORKDIR/gguf-check, through the export command."""
  from ftjax import export as export_lib
  out = os.path.join(workdir, "gguf-check")
  merged = os.path.join(out, "merged")
  paths = {t: os.path.join(out, f"model-{t}.gguf") for t in types}
  for i, t in enumerate(types):
    args = ["--workdir", workdir, "--no-adapter", "--overwrite", "--gguf", t, "--gguf-out", paths[t]]
    export_lib.main(args + (["--merged", merged] if i == 0 else ["--no-merged"]))
  return merged, paths


def check(workdir: str, types: list[str], prompt: str = README_PROMPT, max_new_tokens: int = 24,
          with_transformers: bool = False, stop_at_eos: bool = True) -> list[dict]:
  """One row per type: the logits' relative error, whether it is within TOLERANCE, and the
  greedy answers (merged HF in ftjax, GGUF in ftjax, GGUF in transformers; text and ids).
  stop_at_eos False: every answer runs to max_new_tokens (a tiny model may stop at once)."""
  import numpy as np
  from ftjax import models
  from ftjax.generate import encode_prompts, stop_ids
  merged_dir, paths = export(workdir, types)
  merged, tokenizer = models.load(merged_dir)
  prompt_ids = encode_prompts(tokenizer, [prompt], chat=True)[0]
  stop = stop_ids(merged.config, tokenizer) if stop_at_eos else set()
  answer = _answer(merged, stop, prompt_ids, max_new_tokens)
  ids = prompt_ids + answer
  reference = _logits(merged, ids)
  rows = []
  for t, path in paths.items():
    model, _ = models.load(path)
    error = float(np.abs(_logits(model, ids) - reference).max() / np.abs(reference).max())
    row = {"type": t, "bytes": os.path.getsize(path), "logits_rel_error": error,
           "tolerance": TOLERANCE[t], "ok": error <= TOLERANCE[t],
           "answer_merged": _text(tokenizer, answer),
           "answer_gguf_ftjax": _text(tokenizer, _answer(model, stop, prompt_ids, max_new_tokens))}
    if with_transformers:
      theirs = _transformers_answer(os.path.dirname(path), os.path.basename(path), prompt_ids,
                                    stop, max_new_tokens)
      row["answer_gguf_transformers"] = _text(tokenizer, theirs)
    rows.append(row)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished training run's workdir")
  parser.add_argument("--types", default="f32,f16,bf16,q8_0")
  parser.add_argument("--prompt", default=README_PROMPT)
  parser.add_argument("--max-new-tokens", type=int, default=24)
  parser.add_argument("--transformers", action="store_true",
                      help="also decode each GGUF file with transformers' GGUF reader")
  args = parser.parse_args(argv)
  rows = check(args.workdir, [t.strip() for t in args.types.split(",") if t.strip()], args.prompt,
               args.max_new_tokens, args.transformers)
  for row in rows:
    print(json.dumps(row, ensure_ascii=False))
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
