"""Label texts with a sequence classifier, and `python -m ftjax.classify`.

  python -m ftjax.classify --model DIR --data file.jsonl --output preds.jsonl
  python -m ftjax.classify --model DIR --text "my card was declined"      # prints one JSON line

DIR is a HF *ForSequenceClassification directory with its tokenizer (a classification run's
export, or one saved by transformers); `--adapter` adds a PEFT SEQ_CLS adapter on it. Each
output line is the input's {"where", "input", "label" (single_label) or "labels" (multi_label),
"probabilities": {class: p}}: softmax over the classes, or each class's sigmoid. Texts are
batched, each batch padded to a multiple of LENGTH_BUCKET tokens so few shapes compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ftjax import peft
from ftjax.data import dataset as dataset_lib
from ftjax.data import formats, sources
from ftjax.errors import FtjaxError, cli_errors
from ftjax.models.classifier import load_pretrained
from ftjax.objectives import classification as cls_lib
from ftjax.tokenizer import load_tokenizer

LENGTH_BUCKET = 32


def classify(model, tokenizer, texts: list[str], labels: list[str], *,
             problem_type: str = "single_label", template: str = "none", batch_size: int = 32,
             max_length: int = 512) -> list[dict]:
  """[{"label" | "labels", "probabilities"}] for each text, batch by batch."""
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  forward = cls_lib.forward_fn(model)
  out = []
  for start in range(0, len(texts), batch_size):
    ids = [cls_lib.encode(tokenizer, t, template)[:max_length] or [pad]
           for t in texts[start:start + batch_size]]
    width = -(-max(map(len, ids)) // LENGTH_BUCKET) * LENGTH_BUCKET
    tokens = np.full((len(ids), width), pad, np.int32)
    segments = np.zeros((len(ids), width), np.int32)
    for row, row_ids in enumerate(ids):
      tokens[row, :len(row_ids)], segments[row, :len(row_ids)] = row_ids, 1
    logits = cls_lib.logits_of(forward, tokens, segments, batch_size)
    out.extend(_rows(cls_lib.probabilities(logits, problem_type), labels, problem_type))
  return out


def _rows(probs: np.ndarray, labels: list[str], problem_type: str) -> list[dict]:
  rows = []
  for p in probs:
    row = {"probabilities": {name: round(float(v), 6) for name, v in zip(labels, p)}}
    if problem_type == "multi_label":
      row["labels"] = [name for name, v in zip(labels, p) if v > 0.5]
    else:
      row["label"] = labels[int(np.argmax(p))]
    rows.append(row)
  return rows


def load(model_dir: str, adapter: str | None = None):
  """(model, tokenizer, class names, problem type) of a classifier directory (+ adapter)."""
  model, labels, problem = load_pretrained(model_dir)
  if labels is None:
    raise FtjaxError(f"{model_dir}: not a sequence-classification model (its config.json names no "
                     "*ForSequenceClassification architecture)")
  if adapter:
    model = peft.load_adapter(model, adapter)
  return model, load_tokenizer(model_dir), labels, problem


def read_texts(path: str, fields: dict | None = None) -> list[tuple[str, str]]:
  """[(where, text)] of a data file's records ("input" or "text"; a label, if any, ignored)."""
  out = []
  for p in dataset_lib.expand(path):
    for record in sources.read_records(p):
      data = formats.rename(record, fields).data if fields else record.data
      key = next((k for k in cls_lib.TEXT_KEYS if isinstance(data, dict) and k in data), None)
      if key is None or not isinstance(data[key], str):
        raise FtjaxError(f"{record.where}: expected a string under 'input' or 'text'")
      out.append((record.where, data[key]))
  return out


@cli_errors
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ftjax.classify",
                                   description="Label texts with a sequence classifier.")
  parser.add_argument("--model", required=True, help="HF *ForSequenceClassification directory")
  parser.add_argument("--adapter", help="a PEFT SEQ_CLS adapter folder to load on --model")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--data", help="JSONL / CSV / Parquet with 'input' or 'text'")
  source.add_argument("--text", action="append", help="a text to label; repeatable")
  parser.add_argument("--output", help="JSONL to write (default: stdout)")
  parser.add_argument("--template", choices=cls_lib.TEMPLATES, default="none",
                      help="as the model was trained (classification.template)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--max-length", type=int, default=512, help="tokens kept per text")
  args = parser.parse_args(argv)
  model, tokenizer, labels, problem = load(args.model, args.adapter)
  items = read_texts(args.data) if args.data else [(f"--text {i + 1}", t)
                                                   for i, t in enumerate(args.text)]
  results = classify(model, tokenizer, [t for _, t in items], labels, problem_type=problem,
                     template=args.template, batch_size=args.batch_size, max_length=args.max_length)
  lines = [json.dumps({"where": w, "input": t, **r}, ensure_ascii=False) + "\n"
           for (w, t), r in zip(items, results)]
  if args.output:  # whole or not at all: a partial predictions file would look finished
    tmp = f"{args.output}.part"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(tmp, args.output)
  else:
    sys.stdout.writelines(lines)


if __name__ == "__main__":
  main()
