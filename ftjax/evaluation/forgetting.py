"""Catastrophic forgetting: what the base model could do that fine-tuning may have lost.

Two probes, before and after: perplexity on a general held-out text (eval.forgetting_text; the
default is `general_text.txt` here, a few KB of public-domain prose -- the Gettysburg Address,
the opening of the US Declaration of Independence -- and plain everyday sentences written for
ftjax and dedicated to the public domain), and the answers to a handful of general prompts. The
relative perplexity increase is flagged above eval.forgetting_threshold.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.evaluation import generation
from ftjax.losses import CausalLMLoss

BUILTIN_TEXT = os.path.join(os.path.dirname(__file__), "general_text.txt")
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 12 times 7?",
    "Write one sentence about the ocean.",
    "Translate 'good morning' into Spanish.",
)


def read_text(path: str = "") -> str:
  """The general text: `path` ("" = built-in), a .txt file (or a folder holding input.txt)."""
  path = path or BUILTIN_TEXT
  if os.path.isdir(path):
    path = os.path.join(path, "input.txt")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise FtjaxError(f"eval.forgetting_text: cannot read {path}: {e.strerror}") from None
  if not text.strip():
    raise FtjaxError(f"eval.forgetting_text: {path} is empty")
  return text


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sums(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  model.eval()
  return CausalLMLoss()(model, batch)


def perplexity(model, tokenizer, text: str, seq_len: int = 256, max_tokens: int = 4096,
               batch_size: int = 8) -> float:
  """exp(mean next-token NLL) over the first `max_tokens` tokens of `text`, in windows of
  `seq_len` (each window starts fresh: no context carried across windows)."""
  ids = np.asarray(tokenizer.encode(text, add_special_tokens=False)[: max_tokens + 1], np.int32)
  n = (len(ids) - 1) // seq_len
  if n == 0:
    raise FtjaxError(f"forgetting text: {len(ids)} tokens, fewer than one window of {seq_len + 1}")
  windows = np.stack([ids[i * seq_len: (i + 1) * seq_len + 1] for i in range(n)])
  graphdef, state = nnx.split(model)
  total, count = 0.0, 0.0
  for start in range(0, n, batch_size):
    rows = windows[start:start + batch_size]
    b = len(rows)
    ones = np.ones((b, seq_len), np.int32)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": ones.astype(np.float32),
             "segment_ids": ones, "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                               (b, seq_len)).copy()}
    out = _sums(graphdef, state, jax.tree.map(jnp.asarray, batch))
    total += float(out["loss_sum"])
    count += float(out["count"])
  return float(np.exp(total / count))


def probe(model, tokenizer, eval_cfg, seq_len: int, desc: str) -> dict:
  """{"perplexity", "tokens", "answers"} of one model."""
  text = read_text(eval_cfg.forgetting_text)
  ppl = perplexity(model, tokenizer, text, seq_len=seq_len, max_tokens=eval_cfg.forgetting_tokens)
  ids = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                        add_generation_prompt=True),
                          add_special_tokens=False) for p in GENERAL_PROMPTS]
  answers = generation.answer_ids(model, tokenizer, ids, eval_cfg.max_new_tokens, len(ids), desc)
  return {"perplexity": ppl, "answers": answers}


def compare(before: dict, after: dict, threshold: float) -> dict:
  """The relative perplexity change, whether it crosses `threshold`, and answers that changed."""
  change = after["perplexity"] / before["perplexity"] - 1.0
  changed = sum(a.strip() != b.strip() for a, b in zip(before["answers"], after["answers"]))
  return {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
          "relative_change": change, "threshold": threshold, "flagged": change > threshold,
          "prompts": list(GENERAL_PROMPTS), "answers_before": before["answers"],
          "answers_after": after["answers"], "answers_changed": changed}
