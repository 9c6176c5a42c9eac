"""Every fine-tuning method on the same task and budget: the quickstart config (SmolLM2-135M-
Instruct, expense notes -> JSON, 20 steps of 8 x 256 packed tokens), one run per method.

  python scripts/compare_methods.py [--steps 20] [--only lora,ia3] [--out workdirs/compare]

Prints one JSON line per method (trainable params, adapter file size, train tokens/s, final eval
loss, the generation metrics of the fine-tuned model) and a Markdown table at the end. Each
method keeps the quickstart's schedule; the learning rate is the method's own (METHODS below:
virtual tokens and scaling vectors need far larger steps than LoRA's factors, full fine-tuning a
smaller one). Timing here is the training loop's own; compare speed with scripts/bench_train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# method name -> config overrides (on top of configs/quickstart.py)
METHODS = {
    "full": {"method": "full", "train.lr": 5e-5},
    "lora": {"method": "lora"},
    "qlora": {"method": "qlora"},  # LoRA on the NF4 + double-quant base
    "dora": {"method": "lora", "lora.use_dora": True},
    "ia3": {"method": "ia3", "train.lr": 1e-2},
    "prompt": {"method": "prompt", "prompt.num_virtual_tokens": 20, "train.lr": 3e-1},
    "prefix": {"method": "prefix", "prefix.num_virtual_tokens": 20, "train.lr": 3e-2},
    "adapter": {"method": "adapter", "adapter.architecture": "houlsby"},
}


def set_key(config, key: str, value) -> None:
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def dir_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--only", default="", help="comma-separated methods (default: all)")
  parser.add_argument("--out", default="workdirs/compare")
  parser.add_argument("--seed", type=int, default=0, help="train.seed (adapter init, data order)")
  args = parser.parse_args()

  from configs.quickstart import get_config
  from ftjax import train
  rows = []
  for name in [m for m in (args.only.split(",") if args.only else METHODS) if m]:
    config = get_config()
    config.train.steps = args.steps
    config.train.seed = args.seed
    config.export.adapter = True
    for key, value in METHODS[name].items():
      set_key(config, key, value)
    workdir = os.path.join(args.out, name)
    summary = train.train(config, workdir)
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    tok_s = [m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m]
    adapter = os.path.join(workdir, "adapter")
    row = {"method": name, "seed": args.seed, "trainable_params": summary["trainable_params"],
           "adapter_bytes": dir_size(adapter) if os.path.isdir(adapter) else None,
           "train_tokens_per_s": sorted(tok_s)[len(tok_s) // 2], "lr": config.train.lr,
           "eval_loss": summary["eval"]["loss"],
           **{k: v for k, v in (summary["finetuned"] or {}).items() if isinstance(v, float)}}
    print(json.dumps(row), flush=True)
    rows.append(row)
  baseline = summary["baseline"] or {}
  print("\n| method | lr | trainable params | adapter file | train tok/s | eval loss | exact match | JSON valid | fields right |")
  print("|---|---|---|---|---|---|---|---|---|")
  print(f"| base model, 3-shot prompt | | | | | | {baseline.get('exact_match', 0):.0%} | "
        f"{baseline.get('json_valid', 0):.0%} | {baseline.get('field_accuracy', 0):.0%} |")
  for r in rows:
    size = f"{r['adapter_bytes'] / 2**20:.2f} MiB" if r["adapter_bytes"] else "(whole model)"
    print(f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | {size} | "
          f"{r['train_tokens_per_s']:.0f} | {r['eval_loss']:.3f} | {r.get('exact_match', 0):.0%} | "
          f"{r.get('json_valid', 0):.0%} | {r.get('field_accuracy', 0):.0%} |")


if __name__ == "__main__":
  main()
