"""Preference tuning: LoRA DPO on SmolLM2-135M-Instruct over generated preference pairs.

  python -m ftjax.train --config configs/preference.py
  python -m ftjax.train --config configs/preference.py --config.objective=orpo   # or simpo
  # (kto reads {"prompt", "completion", "label"} records instead)

The pairs are the quickstart's expense notes (ftjax/data/preference_task.py): the chosen reply is
the canonical JSON, the rejected one the same JSON with one format slip (prose around it, a date
with slashes, no decimals, a currency symbol, ...). Generated on the first run: 400 train / 100
eval pairs. The reference model is the base with the LoRA adapter disabled, inside the step.

Logged: train/loss, train/rewards/{chosen,rejected,accuracies,margins}, train/logps/{chosen,
rejected} and the same under eval/ on the held-out pairs. The first step's DPO loss is ln 2
(0.693) and its margins 0: the fresh adapter computes as the reference. eval/rewards/accuracies
is the held-out preference accuracy (50% or less before training, by construction: ties count
as wrong, as in TRL).
"""

from ftjax.config import base_config


def get_config(runlocal: str = ""):
  c = base_config()
  c.model.name_or_path = "smollm2-135m-instruct"
  c.objective = "dpo"
  c.dpo.beta = 0.1
  c.method = "lora"
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = "all-linear"

  c.data.generate = "preference"
  c.data.train = "data/generated/preference/train.jsonl"
  c.data.eval = "data/generated/preference/eval.jsonl"
  c.data.seq_len = 128
  c.data.system_prompt = "Extract the expense as JSON with keys date, amount, currency, vendor."

  c.train.steps = 40
  c.train.batch_size = 8
  c.train.lr = 5e-4
  c.train.warmup_steps = 4
  c.train.log_every = 4
  c.train.eval_every = 20
  c.train.eval_batches = 4

  # Greedy answers to the held-out prompts, scored against the chosen reply with the
  # quickstart's metrics: exact_match is the preferred format exactly, json_valid a bare JSON
  # object. The base model zero-shot vs the tuned model, with bootstrap CIs, in report.md.
  c.eval.generate = True
  c.eval.metrics = "exact_match,json_valid,field_accuracy"
  c.eval.periodic_examples = 16  # answers generated at each periodic eval (exact_match decides)
  c.eval.few_shot = 0
  c.eval.max_examples = 50
  c.eval.max_new_tokens = 48
  c.eval.forgetting = False

  if runlocal:  # `--config configs/preference.py:runlocal`: a few steps, to check the plumbing
    c.train.steps = 2
    c.train.warmup_steps = 0
    c.train.eval_every = 0
    c.eval.max_examples = 4
  return c
