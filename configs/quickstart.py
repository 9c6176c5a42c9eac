"""Quickstart: LoRA on the real SmolLM2-135M-Instruct for a strict-format extraction task.

  python -m ftjax.train --config configs/quickstart.py

Messy expense notes ("paid 1.234,50 eur to acme gmbh on 3rd of march 2024") -> one fixed JSON
schema. The dataset is generated deterministically on the first run (500 train / 100 eval, see
ftjax/data/quickstart_task.py). Metrics fixed here: exact match (primary), JSON validity and
per-field accuracy on the eval split, for the base model zero-shot and 3-shot and for the
fine-tuned model, with bootstrap CIs and the verdict in WORKDIR/report.md (plus forgetting,
curves, leakage). About 10 minutes on a 2-core CPU.
"""

from ftjax.config import base_config


def get_config(runlocal: str = ""):
  c = base_config()
  c.model.name_or_path = "smollm2-135m-instruct"
  c.method = "lora"
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = "all-linear"

  c.data.generate = "quickstart"
  c.data.train = "data/generated/quickstart/train.jsonl"
  c.data.eval = "data/generated/quickstart/eval.jsonl"
  c.data.seq_len = 256
  c.data.system_prompt = "Extract the expense as JSON with keys date, amount, currency, vendor."

  c.train.steps = 20
  c.train.batch_size = 8
  c.train.lr = 2e-3
  c.train.warmup_steps = 2
  c.train.log_every = 4
  c.train.eval_every = 10

  c.eval.generate = True
  c.eval.metrics = "exact_match,json_valid,field_accuracy"
  c.eval.few_shot = 3
  c.eval.max_examples = 100
  c.eval.max_new_tokens = 48

  if runlocal:  # `--config configs/quickstart.py:runlocal`: a few steps, to check the plumbing
    c.train.steps = 2
    c.train.warmup_steps = 0
    c.train.eval_every = 0
    c.eval.max_examples = 4
  return c
