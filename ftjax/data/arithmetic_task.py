"""The GRPO example's task: two-number arithmetic with a checkable answer.

  {"prompt": "What is 37 + 48? Think briefly, then give the number as <answer>N</answer>.",
   "answer": "85"}

Chosen because the reward is verifiable (exact_answer compares numbers by value) and a small
instruct model starts weak at it: it often answers without the <answer> tag (answer_format 0)
or miscomputes the products. Pure Python `random.Random`: the same seed gives the same files.
"""

import json
import os
import random

INSTRUCTION = "Think briefly, then give the number as <answer>N</answer>."
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_problems(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 19), rng.randint(2, 9)) if op == "*" else (rng.randint(10, 99),
                                                                       rng.randint(10, 99))
    out.append({"prompt": f"What is {a} {op} {b}? {INSTRUCTION}", "answer": str(_OPS[op](a, b))})
  return out


def write_splits(out_dir: str, n_train: int = 400, n_eval: int = 100, seed: int = 0):
  """train.jsonl and eval.jsonl of {"prompt", "answer"}; returns their paths."""
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
