"""Convert CLINC150 (github.com/clinc/oos-eval, data/data_full.json) to ftjax's classification
JSONL: one {"text", "label"} a line, train.jsonl (the train split) and eval.jsonl (the test split).

  python scripts/prepare_clinc150.py --src oos-eval/data/data_full.json --out data/clinc150

The 150 in-scope intents only by default (15,000 train / 4,500 test); --with-oos adds the
out-of-scope class "oos" (oos_train / oos_test). configs/classification.py reads the output.
"""

import argparse
import json
import os


def convert(src: str, out_dir: str, with_oos: bool = False) -> list[str]:
  """Writes train.jsonl / eval.jsonl under out_dir; returns their paths."""
  with open(src, encoding="utf-8") as f:
    splits = json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, parts in (("train", ["train"] + ["oos_train"] * with_oos),
                      ("eval", ["test"] + ["oos_test"] * with_oos)):
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path + ".part", "w", encoding="utf-8") as f:
      for part in parts:
        for text, label in splits[part]:
          f.write(json.dumps({"text": text, "label": label}) + "\n")
    os.replace(path + ".part", path)
    written.append(path)
  return written


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="CLINC150's data_full.json (or data_small.json)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--with-oos", action="store_true", help="add the out-of-scope class 'oos'")
  args = parser.parse_args()
  for path in convert(args.src, args.out, args.with_oos):
    print(path)


if __name__ == "__main__":
  main()
