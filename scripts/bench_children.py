"""The PyTorch sides of scripts/bench_train.py's comparisons, each a persistent child process.

Each child loads the weights ftjax saved (save_pretrained of its base model), builds the same
LoRA with peft (rank, alpha, all-linear targets, no dropout), AdamW with gradient clipping at
1.0 (as transformers' Trainer does), and serves the parent's rounds (`serve`): after loading it
prints {"ready": true, ...}; then for each stdin line N it runs N steps on its fixed batch and
prints their times (and the step's parts, where it has some) and its peak RSS; "quit" ends it.

Peak memory is the host peak RSS of the process (getrusage ru_maxrss: loading, the first steps
and every round included), the same measure the parent reports for ftjax.
"""

from __future__ import annotations

import collections
import contextlib
import json
import resource
import sys
import time
import types


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def serve(step, info: dict) -> None:
  """The child's side of the rounds protocol; `step()` runs one step and returns its timed parts
  ({name: seconds}, may be empty)."""
  print(json.dumps(dict(info, ready=True)), flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      break
    times, parts = [], collections.defaultdict(list)
    for _ in range(int(line)):
      t = time.perf_counter()
      for name, seconds in (step() or {}).items():
        parts[name].append(seconds)
      times.append(time.perf_counter() - t)
    print(json.dumps({"step_s_all": times, "parts": parts, "host_peak_rss_gib": peak_rss_gib()}),
          flush=True)


def _versions() -> dict:
  import peft
  import torch
  import transformers
  out = {"torch": torch.__version__, "transformers": transformers.__version__,
         "peft": peft.__version__, "threads": torch.get_num_threads()}
  with contextlib.suppress(ImportError):
    import trl
    out["trl"] = trl.__version__
  return out


def _lora(model, rank: int, alpha: float, task_type: str):
  import peft
  return peft.get_peft_model(model, peft.LoraConfig(
      r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0, task_type=task_type))


def _adamw_step(model, loss) -> None:
  import torch
  loss.backward()
  params = [p for p in model.parameters() if p.requires_grad]
  torch.nn.utils.clip_grad_norm_(params, 1.0)
  model._bench_opt.step()
  model._bench_opt.zero_grad(set_to_none=True)


def _with_adamw(model):
  import torch
  model._bench_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  return model


class _Accelerator:
  """What trl's loss methods ask of `self.accelerator` on one CPU process."""
  device = "cpu"
  is_main_process = True
  num_processes = 1
  process_index = 0
  gather = gather_for_metrics = staticmethod(lambda x: x)
  autocast = staticmethod(contextlib.nullcontext)

  @staticmethod
  def unwrap_model(m):
    return m

  @staticmethod
  def reduce(x, reduction="sum"):
    return x


def _trainer_namespace(model, **attrs):
  """The attributes of `self` that trl's _compute_loss methods read: their own code runs on it
  without building a trainer (which would need a dataset, a tokenizer and its train loop)."""
  return types.SimpleNamespace(
      model=model, accelerator=_Accelerator(), aux_loss_enabled=False, _tp_size=1,
      _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
      _total_train_tokens=0, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
      **attrs)


def trl_dpo_child(model_dir: str, pairs: int, seq: int, rank: int, alpha: float, dtype: str,
                  beta: float) -> None:
  """TRL's DPO step on peft LoRA: DPOTrainer._compute_loss (trl's own code, on a namespace with
  the attributes it reads, not a built trainer) over one concatenated batch of 2 x `pairs` rows
  of `seq` tokens (chosen rows first), its fused log-prob head added as DPOTrainer adds it, the
  reference = the same model with the adapter disabled (trl's `use_adapter(model, None)`, as
  DPOTrainer does for a new adapter), sigmoid loss with `beta`; then backward and AdamW."""
  import torch
  import transformers
  from trl.trainer.dpo_trainer import DPOTrainer
  from trl.trainer.utils import add_fused_lm_head
  torch.manual_seed(0)
  base = transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
  add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
  model = _with_adamw(_lora(base, rank, alpha, "CAUSAL_LM"))
  model.train()
  trainer = _trainer_namespace(model, ref_model=None, beta=beta, loss_types=["sigmoid"],
                               loss_weights=[1.0], label_smoothing=0.0, ld_alpha=None,
                               precompute_ref_logps=False, f_divergence_type="reverse_kl",
                               use_weighting=False)
  ids = torch.randint(0, model.config.vocab_size, (2 * pairs, seq))
  completion = torch.ones_like(ids)
  completion[:, 0] = 0  # the first token is the prompt: every other one is scored, as ftjax's rows
  inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}

  def step():
    _adamw_step(model, DPOTrainer._compute_loss(trainer, model, inputs, False))

  serve(step, _versions())


def seqcls_child(model_dir: str, batch: int, seq: int, rank: int, alpha: float, dtype: str,
                 num_labels: int) -> None:
  """transformers AutoModelForSequenceClassification + peft LoRA (task_type SEQ_CLS: the `score`
  head trained whole as modules_to_save), cross-entropy over `num_labels` on the last token."""
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      model_dir, num_labels=num_labels, dtype=getattr(torch, dtype), attn_implementation="sdpa")
  vocab = model.config.vocab_size
  model.config.pad_token_id = vocab - 1  # never drawn below: every row pools its last token
  model = _with_adamw(_lora(model, rank, alpha, "SEQ_CLS"))
  model.train()
  ids = torch.randint(0, vocab - 1, (batch, seq))
  labels = torch.randint(0, num_labels, (batch,))
  trainable = [n for n, p in model.named_parameters() if p.requires_grad]
  if not any("score" in n for n in trainable):
    raise SystemExit(f"peft SEQ_CLS did not train the score head: {trainable[-3:]}")

  def step():
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    _adamw_step(model, loss)

  serve(step, _versions())


def trl_grpo_child(model_dir: str, batch: int, seq: int, rank: int, alpha: float, dtype: str,
                   num_generations: int, max_new_tokens: int, temperature: float, top_p: float,
                   top_k: int, loss_type: str, epsilon: float, epsilon_high: float) -> None:
  """TRL's GRPO step, its pieces as GRPOTrainer calls them (transformers generation, no vLLM):
  `model.generate` with GRPOTrainer's generation config (do_sample, temperature, top_p, top_k,
  max_new_tokens; min_new_tokens = max_new_tokens so that every completion has the length
  ftjax's side samples), batch / G prompts of seq - max_new_tokens random tokens repeated G
  times, then GRPOTrainer._compute_loss (trl's code: its chunked fused log-prob forward over
  prompt + completion, the clipped loss, beta 0) on those rows with random advantages, backward,
  AdamW. Rewards are not computed on either side. A built GRPOTrainer is not driven: its loop
  generates from a dataset through its own sampler and accelerate, which would not take a
  fixed batch of given lengths."""
  import torch
  import transformers
  from trl.trainer.grpo_trainer import GRPOTrainer
  from trl.trainer.utils import add_fused_lm_head
  torch.manual_seed(0)
  base = transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
  add_fused_lm_head(base, temperature=temperature, outputs=("log_probs", "entropy"))
  model = _with_adamw(_lora(base, rank, alpha, "CAUSAL_LM"))
  vocab = model.config.vocab_size
  generation = transformers.GenerationConfig(
      max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=True,
      pad_token_id=vocab - 1, eos_token_id=None, temperature=temperature, top_p=top_p,
      top_k=top_k or None, disable_compile=True)
  trainer = _trainer_namespace(
      model, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      importance_sampling_level="token", beta=0.0, loss_type=loss_type, epsilon_low=epsilon,
      epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
      current_gradient_accumulation_steps=1, max_completion_length=max_new_tokens,
      _entropy_bonus_enabled=False)
  trainer.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                       steps_per_generation=1, gradient_checkpointing_kwargs=None)
  trainer._get_per_token_logps_and_entropies = types.MethodType(
      GRPOTrainer._get_per_token_logps_and_entropies, trainer)
  prompts = batch // num_generations
  rounds = [0]

  def step():
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(rounds[0])
    rounds[0] += 1
    prompt_ids = torch.randint(0, vocab - 1, (prompts, seq - max_new_tokens), generator=gen)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    prompt_mask = torch.ones_like(prompt_ids)
    model.eval()
    with torch.no_grad():
      out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                           generation_config=generation)
    completion_ids = out[:, prompt_ids.size(1):]
    rollout = time.perf_counter() - t
    model.train()
    mask = torch.ones_like(completion_ids)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
              "completion_ids": completion_ids, "completion_mask": mask,
              "advantages": torch.randn(batch, generator=gen), "num_items_in_batch": mask.sum()}
    _adamw_step(model, GRPOTrainer._compute_loss(trainer, model, inputs))
    return {"rollout_s": rollout, "update_s": time.perf_counter() - t - rollout,
            "completion_tokens": float(completion_ids.numel())}

  serve(step, _versions())
