"""The quickstart task: messy expense notes -> one fixed JSON schema.

Input:  "paid 1.234,50 eur to acme gmbh on 3rd of March 2024 (office chairs)"
Output: {"date": "2024-03-03", "amount": 1234.50, "currency": "EUR", "vendor": "Acme GmbH"}

Chosen because a small instruct model cannot do it from a few examples (it echoes the input or
drifts from the format) yet LoRA learns it in a few hundred steps: the output is short, the format
is strict (key order, ISO date, two decimals, ISO currency code, canonical vendor spelling), and
exact match is an unambiguous metric. Generation is pure Python `random.Random`, so the same
seed gives the same files on every machine.
"""

import calendar
import datetime
import json
import os
import random

SYSTEM_PROMPT = ("Extract the expense as JSON with keys date (YYYY-MM-DD), amount (2 decimals), "
                 "currency (ISO code) and vendor.")
KEYS = ("date", "amount", "currency", "vendor")

_CURRENCIES = {
  "USD": ["$", "usd", "USD", "US$", "dollars"],
  "EUR": ["€", "eur", "EUR", "euros", "Eur"],
  "GBP": ["£", "gbp", "GBP", "pounds"],
  "CHF": ["CHF", "chf", "swiss francs"],
}
_SYMBOLS = ("$", "€", "£", "US$")
_NAME_A = ("acme", "globex", "initech", "umbrella", "hooli", "vandelay", "wonka", "stark", "wayne",
           "soylent", "tyrell", "cyberdyne", "gringotts", "oceanic", "nakatomi", "monarch", "pied",
           "blue", "north", "silver", "red", "green", "iron", "golden", "bright", "alpine", "harbor",
           "maple", "cedar", "summit", "pioneer", "atlas", "delta", "orion", "falcon", "lumen")
_NAME_B = ("", "", "", "river", "star", "piper", "works", "labs", "systems", "foods", "print",
           "office", "travel", "supply", "logistics", "media", "cafe", "hardware", "studio", "air")
_SUFFIX = {  # canonical -> spellings seen in notes
  "": [""], "GmbH": ["gmbh", "GmbH", "GMBH"], "Ltd": ["ltd", "ltd.", "Ltd", "LTD"],
  "Inc": ["inc", "inc.", "Inc.", "INC"], "LLC": ["llc", "LLC", "l.l.c."], "AG": ["ag", "AG"],
}
_ITEMS = ("office chairs", "printer toner", "team lunch", "taxi to airport", "hotel 2 nights",
          "software license", "conference ticket", "train tickets", "coffee beans", "monitor",
          "client dinner", "parking", "stationery", "cloud hosting", "courier", "books",
          "phone bill", "desk lamp", "flight change fee", "catering")
_TEMPLATES = (
  "paid {amount} to {vendor} on {date} ({item})",
  "{date}: {vendor} - {amount} for {item}",
  "{item} from {vendor}, {amount}, {date}",
  "expense {vendor} {amount} {date} {item}",
  "{vendor} invoice, {item}, total {amount}, dated {date}",
  "bought {item} at {vendor} for {amount} on {date}",
  "reimburse me {amount} - {item} @ {vendor}, {date}",
  "{amount} {vendor} {date}",
  "on {date} i paid {vendor} {amount} ({item})",
  "receipt: {vendor} / {item} / {amount} / {date}",
)


def _ordinal(d):
  suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
  return f"{d}{suffix}"


def _date_text(rng, date):
  d, m, y = date.day, date.month, date.year
  month, mon = calendar.month_name[m], calendar.month_abbr[m]
  forms = [
    f"{y}-{m:02d}-{d:02d}", f"{y}-{m}-{d}", f"{month} {d}, {y}", f"{d} {month} {y}",
    f"{_ordinal(d)} of {month} {y}", f"{d} {mon} {y % 100:02d}", f"{mon} {d} {y}",
    f"{d:02d}.{m:02d}.{y}", f"{d:02d}/{m:02d}/{y} (day first)", f"{m}/{d}/{y} (US date)",
    f"{month.lower()} {_ordinal(d)} {y}",
  ]
  return rng.choice(forms)


def _amount_number(rng, cents, european):
  units, frac = divmod(cents, 100)
  if european:
    grouped = f"{units:,}".replace(",", ".") if units >= 1000 and rng.random() < .6 \
      else str(units)
    return f"{grouped},{frac:02d}"
  grouped = f"{units:,}" if units >= 1000 and rng.random() < .5 else str(units)
  if frac == 0 and rng.random() < .5:
    return grouped  # "1,234" or "250": whole amounts are often written without cents
  return f"{grouped}.{frac:02d}"


def _amount_text(rng, cents, currency):
  spelling = rng.choice(_CURRENCIES[currency])
  european = currency in ("EUR", "CHF") and rng.random() < .6
  number = _amount_number(rng, cents, european)
  if spelling in _SYMBOLS:
    return f"{number} {spelling}" if european and rng.random() < .5 else f"{spelling}{number}"
  return f"{spelling} {number}" if rng.random() < .3 and spelling.isupper() else f"{number} {spelling}"


def _vendor(rng):
  a, b = rng.choice(_NAME_A), rng.choice(_NAME_B)
  suffix = rng.choice(list(_SUFFIX))
  words = [a] + ([b] if b else [])
  canonical = " ".join([w.capitalize() for w in words] + ([suffix] if suffix else []))
  case = rng.choice([str.lower, str.lower, str.upper, str.title, lambda s: s])
  noisy = " ".join([case(w) for w in words] + ([rng.choice(_SUFFIX[suffix])] if suffix else []))
  return canonical, noisy


def format_output(date, cents, currency, vendor):
  """The canonical target: fixed key order, ", "/": " separators, amount with 2 decimals."""
  return (f'{{"date": "{date.isoformat()}", "amount": {cents // 100}.{cents % 100:02d}, '
          f'"currency": {json.dumps(currency)}, "vendor": {json.dumps(vendor)}}}')


def _one(rng):
  date = datetime.date(2019, 1, 1) + datetime.timedelta(days=rng.randrange(6 * 365))
  cents = rng.choice([rng.randrange(100, 10000), rng.randrange(100, 100000),
                      rng.randrange(1, 2000) * 100, rng.randrange(100000, 2500000)])
  currency = rng.choice(list(_CURRENCIES))
  canonical, noisy = _vendor(rng)
  note = rng.choice(_TEMPLATES).format(
    amount=_amount_text(rng, cents, currency), vendor=noisy, date=_date_text(rng, date),
    item=rng.choice(_ITEMS))
  return {"input": note, "output": format_output(date, cents, currency, canonical)}


def make_examples(n, seed=0):
  """n examples with distinct inputs, a pure function of (n, seed)."""
  rng = random.Random(seed)
  seen, out = set(), []
  while len(out) < n:
    ex = _one(rng)
    if ex["input"] not in seen:
      seen.add(ex["input"])
      out.append(ex)
  return out


def make_splits(n_train, n_eval, seed=0):
  """(train, eval): one stream of distinct inputs, so no eval input appears in train."""
  examples = make_examples(n_train + n_eval, seed)
  return examples[:n_train], examples[n_train:]


def write_splits(out_dir, n_train=500, n_eval=100, seed=0):
  """Write train.jsonl and eval.jsonl; returns their paths."""
  train, evals = make_splits(n_train, n_eval, seed)
  assert not {e["input"] for e in train} & {e["input"] for e in evals}
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, rows in (("train", train), ("eval", evals)):
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths.append(path)
  return tuple(paths)


def parse(text):
  """The JSON object in a prediction (surrounding whitespace allowed), or None."""
  try:
    value = json.loads(text.strip())
  except (json.JSONDecodeError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def score(prediction, reference):
  """{"exact_match", "json_valid", "field_accuracy"} for one prediction, each in [0, 1].

  exact_match: identical to the reference after stripping whitespace (format included).
  json_valid: a JSON object with exactly the four keys. field_accuracy: share of the four fields
  whose value equals the reference's (amount compared as a number).
  """
  pred, ref = parse(prediction), json.loads(reference)
  valid = pred is not None and sorted(pred) == sorted(KEYS)
  fields = 0.0
  if pred is not None:
    fields = sum(pred.get(k) == ref[k] for k in KEYS) / len(KEYS)
  return {"exact_match": float(prediction.strip() == reference.strip()),
          "json_valid": float(valid), "field_accuracy": float(fields)}
