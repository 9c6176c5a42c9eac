"""Intent classification with a sequence-classification head: LoRA on SmolLM2-135M-Instruct, 150
intents of CLINC150 (Larson et al. 2019; github.com/clinc/oos-eval, CC BY 3.0).

  python scripts/prepare_clinc150.py --src oos-eval/data/data_full.json --out data/clinc150
  python -m ftjax.train --config configs/classification.py --workdir runs/clinc150

objective="classification": a linear `score` head [576, 150] on the last token's hidden state,
trained whole beside the LoRA adapter (PEFT's modules_to_save, task_type SEQ_CLS); one forward
pass per prediction, no vocabulary projection, no decoding. Eval: accuracy (primary, early
stopping) and macro-F1 on the test split. Exports: WORKDIR/adapter (peft.PeftModel on
AutoModelForSequenceClassification) and WORKDIR/merged (AutoModelForSequenceClassification),
which `python -m ftjax.classify --model WORKDIR/merged --data file.jsonl` uses.
"""

from ftjax.config import base_config


def get_config(runlocal: str = ""):
  c = base_config()
  c.objective = "classification"
  c.model.name_or_path = "smollm2-135m-instruct"
  c.method = "lora"
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = "all-linear"

  c.classification.labels = ""  # the 150 intents of the train split, sorted
  c.classification.problem_type = "single_label"
  c.classification.template = "none"

  c.data.train = "data/clinc150/train.jsonl"
  c.data.eval = "data/clinc150/eval.jsonl"
  c.data.seq_len = 32  # queries are short: p99 under 30 SmolLM2 tokens

  c.train.steps = 500
  c.train.batch_size = 32
  c.train.lr = 1e-3
  c.train.warmup_steps = 20
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 20

  c.eval.metrics = "accuracy,loss"
  c.eval.primary = "accuracy"
  c.export.merged = True

  if runlocal:  # `--config configs/classification.py:runlocal`: a few steps, to check the plumbing
    c.train.steps = 2
    c.train.warmup_steps = 0
    c.train.eval_every = 0
  return c
