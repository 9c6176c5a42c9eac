"""RL from verifiable rewards: LoRA GRPO on SmolLM2-135M-Instruct over generated arithmetic.

  python -m ftjax.train --config configs/grpo.py
  python -m ftjax.train --config configs/grpo.py:runlocal   # two steps, to check the plumbing

The prompts are "What is 37 + 48? ... <answer>N</answer>" (ftjax/data/arithmetic_task.py, 400
train / 100 eval, generated on the first run) with an `answer` column. Rewards: exact_answer
(1 when the answer in the tag, or the last number, equals `answer`) + 0.5 * answer_format (1 for
exactly one <answer> tag). train.batch_size counts completions: 32 = 4 prompts x 8 generations
per step. Logged: train/reward, train/reward_std, train/rewards/<fn>, train/completion_length,
train/frac_reward_zero_std, train/clip_ratio/*, train/rollout_tokens_per_s (and train/kl with
grpo.beta > 0). At the end the eval prompts are answered greedily by the base and the tuned
model: mean rewards with bootstrap CIs in summary.json ("reward_eval") and report.md, with the
reward curve (rewards.png). Measured: docs/methods.md (GRPO).

Why these values (the first version, G=4 at T=1 with 64 new tokens and lr 1e-4, left the train
reward flat: 7 of 8 groups had all-equal rewards, so all-zero advantages): G=8 at T=0.7 gives
most groups both a right and a wrong answer (frac_reward_zero_std measured 0-0.5 a step), 32
new tokens suffice for a short reply and halve the rollout, and lr 5e-4 (5x) gives the LoRA room to
move in 40 steps.

Why 4 prompts a step (2 before): with 2 the held-out sampled exact answers rose 0.117 -> 0.350
(CIs apart) but the train reward's quarters overlapped, 0.19 [0.08, 0.31] -> 0.27 [0.13, 0.42]:
a step's mean followed which 2 problems were drawn: in 20 of the 40 steps both groups were
all-equal (a problem SmolLM2 always or never solves; 68% of all groups), the step's reward 0 or
0.5 whatever the policy. 4 prompts a step halve that variance (CIs ~1/sqrt(2) as wide) and give
the update twice the groups; each prompt is prefilled once for its 8 completions, so the
rollout grows by the decode rows only. Measured (40 steps, loaded 2-core VM, 15 min): train
reward 0.251 [0.186, 0.312] over the first half of the steps -> 0.425 [0.317, 0.527] over the
second (the quarters, 0.233 -> 0.366, still overlap); held-out sampled exact 0.109 -> 0.359.
"""

from ftjax.config import base_config


def get_config(runlocal: str = ""):
  c = base_config()
  c.model.name_or_path = "smollm2-135m-instruct"
  c.objective = "grpo"
  c.method = "lora"
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.targets = "all-linear"

  c.data.generate = "arithmetic"
  c.data.train = "data/generated/arithmetic/train.jsonl"
  c.data.eval = "data/generated/arithmetic/eval.jsonl"
  c.data.seq_len = 96  # prompts are ~55 tokens with the chat template: 64 left for them

  c.grpo.num_generations = 8
  c.grpo.max_new_tokens = 32
  c.grpo.temperature = 0.7
  c.grpo.loss_type = "dapo"
  c.grpo.beta = 0.0
  c.grpo.reward_funcs = "exact_answer,answer_format"
  c.grpo.reward_weights = "1,0.5"

  c.train.steps = 40
  c.train.batch_size = 32  # completions: 4 prompts x 8 generations
  c.train.lr = 5e-4  # LoRA learns at higher rates than full fine-tuning (TRL docs: 1e-6 .. 2e-5)
  c.train.warmup_steps = 2
  c.train.log_every = 1  # every step's reward: the curve in rewards.png
  c.train.eval_every = 0  # the reward eval runs at the end (base vs tuned)

  c.eval.generate = False  # GRPO's own eval: rewards of greedy answers to the eval prompts
  c.eval.metrics = "loss"  # no generation metric (GRPO has no eval loss either: nothing stops early)
  c.eval.forgetting = False
  c.eval.max_examples = 64  # two eval batches of train.batch_size prompts: one sampler compile

  if runlocal:  # `--config configs/grpo.py:runlocal`: a few steps, to check the plumbing
    c.train.steps = 2
    c.train.warmup_steps = 0
    c.grpo.max_new_tokens = 16
    c.eval.max_examples = 4
  return c
