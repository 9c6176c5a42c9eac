"""Write the quickstart data set (expense notes -> JSON) as train.jsonl and eval.jsonl.

  python scripts/make_quickstart_data.py --out data/quickstart [--seed 0] [--train 500] [--eval 100]

A thin CLI over ftjax.data.quickstart_task, which `python -m ftjax.train` also calls to create the
data on first run; the same seed always gives byte-identical files.
"""

import argparse

from ftjax.data import quickstart_task


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--train", type=int, default=500, help="number of training examples")
  parser.add_argument("--eval", type=int, default=100, help="number of evaluation examples")
  args = parser.parse_args()
  for path in quickstart_task.write_splits(args.out, args.train, args.eval, args.seed):
    print(path)


if __name__ == "__main__":
  main()
