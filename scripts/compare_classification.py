"""Intent classification three ways, same data and budget: ftjax's classification head
(configs/classification.py), ftjax's generation recipe (SFT on "instruction + query -> intent
name", scored by greedy exact match) and HF peft SEQ_CLS (transformers
AutoModelForSequenceClassification + LoRA, torch AdamW), each LoRA r/alpha/targets, lr, schedule,
batch and steps as configs/classification.py sets them.

  python scripts/compare_classification.py --src oos-eval/data/data_full.json \
      [--steps 200] [--per-class 4] [--only head,generation,peft] [--out workdirs/compare_cls]

Train: CLINC150's train split (15,000 queries, 150 intents), the same for all three. Eval: the
first --per-class test queries of every intent (600 at 4), the same for all three. Prints one
JSON line per recipe (accuracy with a normal-approximation 95% CI, train seconds, predict seconds and
per-query milliseconds) and a Markdown table at the end. Timing is each recipe's own loop on
this machine; run on an idle machine and read the times as a ratio.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

INSTRUCTION = "Name the intent of this assistant query (one snake_case intent name)."


def write_jsonl(path: str, rows: list[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return path


def prepare(src: str, out: str, per_class: int) -> dict:
  """The three recipes' files under `out`: train/eval as {"text", "label"} (head, peft) and as
  {"input", "output"} (generation). Eval: the first `per_class` test queries of each intent."""
  from prepare_clinc150 import convert
  train_path, test_path = convert(src, os.path.join(out, "full"))
  train = [json.loads(line) for line in open(train_path, encoding="utf-8")]
  seen = collections.Counter()
  evals = []
  for row in map(json.loads, open(test_path, encoding="utf-8")):
    if seen[row["label"]] < per_class:
      seen[row["label"]] += 1
      evals.append(row)
  def generation(rows):
    return [{"input": f"{INSTRUCTION}\n{r['text']}", "output": r["label"]} for r in rows]
  return {"train": train_path, "eval": write_jsonl(os.path.join(out, "eval.jsonl"), evals),
          "gen_train": write_jsonl(os.path.join(out, "gen_train.jsonl"), generation(train)),
          "gen_eval": write_jsonl(os.path.join(out, "gen_eval.jsonl"), generation(evals)),
          "labels": sorted({r["label"] for r in train}), "eval_rows": evals, "train_rows": train}


def head_config(files: dict, steps: int):
  from bench_train import load_config
  c = load_config(os.path.join(REPO, "configs", "classification.py"))
  c.data.train, c.data.eval = files["train"], files["eval"]
  c.train.steps = steps
  c.train.warmup_steps = min(c.train.warmup_steps, steps)
  c.train.eval_every = 0
  c.train.eval_batches = 0  # the whole eval file
  c.eval.report = False
  c.export.merged = False
  return c


def generation_config(files: dict, steps: int):
  """The same budget as the head: same rows per step and steps, unpacked (one query a row), and
  the head config's LoRA, lr and schedule; answers decoded greedily and scored by exact match."""
  head = head_config(files, steps)
  from ftjax.config import base_config
  c = base_config()
  c.model.name_or_path = head.model.name_or_path
  c.method = "lora"
  c.lora = head.lora
  c.data.train, c.data.eval = files["gen_train"], files["gen_eval"]
  c.data.seq_len = 64  # chat template + instruction + query + intent: p99 under 60 tokens
  c.data.pack = False
  for key in ("steps", "batch_size", "lr", "warmup_steps", "schedule", "seed"):
    c.train[key] = head.train[key]
  c.train.eval_every = 0
  c.eval.generate = True
  c.eval.metrics = "exact_match"
  c.eval.zero_shot = False
  c.eval.few_shot = 0
  c.eval.forgetting = False
  c.eval.report = False
  c.eval.max_examples = len(files["eval_rows"])
  c.eval.max_new_tokens = 16
  return c


def ci95(accuracy: float, n: int) -> list[float]:
  """Normal-approximation 95% interval of an accuracy over n queries (the same rule for all)."""
  half = 1.96 * np.sqrt(accuracy * (1 - accuracy) / n)
  return [max(0.0, accuracy - half), min(1.0, accuracy + half)]


def run_head(files: dict, steps: int, out: str) -> dict:
  from ftjax.train import train
  workdir = os.path.join(out, "head")
  summary = train(head_config(files, steps), workdir)
  return {"recipe": "ftjax classification head", "accuracy": summary["eval"]["accuracy"],
          "macro_f1": summary["eval"].get("macro_f1"), "train_s": summary["train_s"],
          "predict_s": summary["eval_seconds"]}


def run_generation(files: dict, steps: int, out: str) -> dict:
  from ftjax.train import train
  workdir = os.path.join(out, "generation")
  summary = train(generation_config(files, steps), workdir)
  return {"recipe": "ftjax generation recipe (SFT, greedy exact match)",
          "accuracy": summary["finetuned"]["exact_match"], "train_s": summary["train_s"],
          "predict_s": summary["eval_seconds"]}


def run_peft(files: dict, steps: int, out: str) -> dict:
  """transformers + peft SEQ_CLS on the same base weights (exported by ftjax), the head config's
  LoRA and schedule, torch AdamW, the same rows per step (a seeded shuffle of the train file)."""
  import torch
  import transformers
  import peft as hf_peft
  from ftjax import models
  cfg = head_config(files, steps)
  base_dir = os.path.join(out, "hf_base")
  if not os.path.exists(os.path.join(base_dir, "config.json")):
    model, tokenizer = models.load(cfg.model.name_or_path)
    models.save_pretrained(model, base_dir, tokenizer)
  torch.manual_seed(cfg.train.seed)
  tok = transformers.AutoTokenizer.from_pretrained(base_dir)
  tok.pad_token = tok.pad_token or tok.eos_token
  labels = files["labels"]
  index = {label: i for i, label in enumerate(labels)}
  net = transformers.AutoModelForSequenceClassification.from_pretrained(
      base_dir, num_labels=len(labels), dtype=torch.float32)
  net.config.pad_token_id = tok.pad_token_id
  net = hf_peft.get_peft_model(net, hf_peft.LoraConfig(
      r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
      target_modules="all-linear", task_type="SEQ_CLS"))
  opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.train.lr,
                          betas=(cfg.train.b1, cfg.train.b2), eps=cfg.train.eps, weight_decay=0.0)
  schedule = transformers.get_cosine_schedule_with_warmup(opt, cfg.train.warmup_steps, steps)
  order = np.random.default_rng(cfg.train.seed).permutation(len(files["train_rows"]))
  batch = cfg.train.batch_size

  def encode(rows):
    enc = tok([r["text"] for r in rows], padding=True, truncation=True,
              max_length=cfg.data.seq_len, return_tensors="pt")
    return enc, torch.tensor([index[r["label"]] for r in rows])

  net.train()
  t = time.perf_counter()
  for step in range(steps):
    take = order[(step * batch) % len(order):][:batch]
    enc, y = encode([files["train_rows"][i] for i in take])
    loss = torch.nn.functional.cross_entropy(net(**enc).logits, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.max_grad_norm)
    opt.step()
    schedule.step()
    opt.zero_grad()
  train_s = time.perf_counter() - t
  net.eval()
  t = time.perf_counter()
  correct = []
  with torch.no_grad():
    for i in range(0, len(files["eval_rows"]), 64):
      enc, y = encode(files["eval_rows"][i:i + 64])
      correct += (net(**enc).logits.argmax(-1) == y).tolist()
  correct = np.array(correct, np.float32)
  return {"recipe": "HF peft SEQ_CLS (torch)", "accuracy": float(correct.mean()),
          "train_s": train_s, "predict_s": time.perf_counter() - t, "final_train_loss": float(loss)}


RECIPES = {"head": run_head, "generation": run_generation, "peft": run_peft}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="CLINC150's data_full.json")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--per-class", type=int, default=4, help="eval queries per intent")
  parser.add_argument("--only", default="", help="comma-separated recipes (head, generation, peft)")
  parser.add_argument("--out", default="workdirs/compare_cls")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  files = prepare(args.src, args.out, args.per_class)
  rows = []
  for name in (args.only.split(",") if args.only else RECIPES):
    result = RECIPES[name](files, args.steps, args.out)
    n = len(files["eval_rows"])
    result.update(predict_ms_per_query=1000 * result["predict_s"] / n, ci=ci95(result["accuracy"], n))
    print(json.dumps(result), flush=True)
    rows.append(result)
  print(f"\n{args.steps} steps x {head_config(files, args.steps).train.batch_size} queries; "
        f"{len(files['eval_rows'])} eval queries ({args.per_class} per intent)\n")
  print("| recipe | accuracy | train s | eval s |\n|---|---|---|---|")
  for r in rows:
    ci = f" [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]"
    print(f"| {r['recipe']} | {100 * r['accuracy']:.1f}%{ci} | {r['train_s']:.0f} | {r['predict_s']:.0f} |")


if __name__ == "__main__":
  main()
