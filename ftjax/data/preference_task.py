"""The preference task: the quickstart's expense notes, with a preferred and a rejected reply.

  {"prompt": "paid 1.234,50 eur to acme gmbh on 3rd of March 2024 (office chairs)",
   "chosen":   '{"date": "2024-03-03", "amount": 1234.50, "currency": "EUR", "vendor": "Acme GmbH"}',
   "rejected": 'Here is the expense: {"date": "3rd of March 2024", ...}'}

The chosen reply is the canonical JSON of ftjax/data/quickstart_task.py; the rejected one is the
same JSON with one slip of the kind a small instruct model makes on this task: prose around the
JSON, a date with slashes, an amount without its two decimals, a currency symbol for the ISO
code, the vendor lower-cased, the keys in another order.
So the preferred behaviour is measurable in greedy answers with the quickstart's own metrics
(exact_match, json_valid, field_accuracy), and the base model visibly lacks it.

Eval prompts come from the same stream as train ones but never repeat them (no leakage in the data check).
Pure `random.Random`: the same seed gives the same files on every machine.
"""

import json
import os
import random

from ftjax.data import quickstart_task

SYSTEM_PROMPT = quickstart_task.SYSTEM_PROMPT
SLIPS = ("prose", "date_slashes", "amount_no_decimals", "currency_symbol", "vendor_lower",
         "key_order")
_SYMBOL = {"USD": "$", "EUR": "€", "GBP": "£", "CHF": "Fr."}
_PROSE = ("Here is the expense: {}", "Sure! {}", "{}\nLet me know if you need anything else.",
          "The extracted JSON is:\n{}")


def _slip(rng, chosen: str, slip: str) -> str:
  """`chosen` with one slip; the result always differs from `chosen`."""
  value = json.loads(chosen)
  if slip == "prose":
    return rng.choice(_PROSE).format(chosen)
  if slip == "date_slashes":
    value["date"] = value["date"].replace("-", "/")
  elif slip == "amount_no_decimals":
    return chosen.replace(f'"amount": {value["amount"]:.2f}', f'"amount": {int(value["amount"])}')
  elif slip == "currency_symbol":
    value["currency"] = _SYMBOL[value["currency"]]
  elif slip == "vendor_lower":
    value["vendor"] = value["vendor"].lower() + " "
  elif slip == "key_order":
    value = dict(reversed(list(value.items())))
  return json.dumps(value, ensure_ascii=False).replace('"amount": ' + json.dumps(value["amount"]),
                                                        f'"amount": {value["amount"]:.2f}')


def make_pairs(n: int, seed: int = 0) -> list:
  """n {"prompt", "chosen", "rejected"} records with distinct prompts, a pure function of (n, seed)."""
  rng = random.Random(seed + 1)
  out = []
  for ex in quickstart_task.make_examples(n, seed):
    rejected = _slip(rng, ex["output"], rng.choice(SLIPS))
    if rejected == ex["output"]:  # e.g. an amount with no cents: no decimals slip to make
      rejected = _slip(rng, ex["output"], "prose")
    out.append({"prompt": ex["input"], "chosen": ex["output"], "rejected": rejected})
  return out


def write_splits(out_dir: str, n_train: int = 400, n_eval: int = 100, seed: int = 0):
  """train.jsonl and eval.jsonl (preference pairs) plus eval_sft.jsonl (the eval prompts with
  their chosen reply as {"input", "output"}: what generation metrics score); returns the paths."""
  pairs = make_pairs(n_train + n_eval, seed)
  train, evals = pairs[:n_train], pairs[n_train:]
  os.makedirs(out_dir, exist_ok=True)
  files = {"train.jsonl": train, "eval.jsonl": evals,
           "eval_sft.jsonl": [{"input": p["prompt"], "output": p["chosen"]} for p in evals]}
  paths = []
  for name, rows in files.items():
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths.append(path)
  return tuple(paths)
