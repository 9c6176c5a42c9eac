"""The GRPO example's task: two-number arithmetic with a checkable answer.

  {"prompt": "What is 37 + 48? Reply with the number only, as <answer>N</answer>.",
   "answer": "85"}

Chosen because the reward is verifiable (exact_answer compares numbers by value) and a small
instruct model starts weak at it: it often answers without the <answer> tag (answer_format 0)
or miscomputes the products. Pure Python `random.Random`: the same seed gives the same files.
"""

import json
import os
import random

# "Think briefly" (the first version) drew rambling completions, a fifth of SmolLM2's samples at
# T=1 cut at 64 tokens (13 of 64), whose last number is seldom the answer; a short reply keeps
# the rollouts short, and the tag's format is what answer_format rewards.
INSTRUCTION = "Reply with the number only, as <answer>N</answer>."
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_problems(n: int, seed: int = 0) -> list[dict]:
  """`n` distinct problems (a problem drawn again is skipped: the eval split must not repeat a
  train prompt, and the first version's 500 draws held 25 train/eval repeats)."""
  rng = random.Random(seed)
  out, seen = [], set()
  while len(out) < n:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 19), rng.randint(2, 9)) if op == "*" else (rng.randint(10, 99),
                                                                       rng.randint(10, 99))
    prompt = f"What is {a} {op} {b}? {INSTRUCTION}"
    if prompt not in seen:
      seen.add(prompt)
      out.append({"prompt": prompt, "answer": str(_OPS[op](a, b))})
  return out


def write_splits(out_dir: str, n_train: int = 400, n_eval: int = 100, seed: int = 0):
  """train.jsonl and eval.jsonl of {"prompt", "answer"}, no prompt in both; returns their paths."""
  problems = make_problems(n_train + n_eval, seed)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, rows in (("train.jsonl", problems[:n_train]), ("eval.jsonl", problems[n_train:])):
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    paths.append(path)
  return tuple(paths)
