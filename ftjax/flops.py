"""Model FLOPs per trained token, for MFU.

Dense training ≈ 6·N FLOPs per token with weight gradients (full fine-tuning), ≈ 4·N with a
frozen base (forward 2·N + input gradients 2·N), plus the adapter matrices' own cost (6 per
parameter: they get weight gradients) and attention (QK^T and AV: 4·t·d_q FLOPs per token per
layer forward, halved for causal masks, x3 with backward).

What is counted as an adapter's per-token matmul weight (`adapter_matmul_params`): LoRA's A and
B and the bottleneck adapter's down/up matrices. Not prompt-tuning or prefix tables (looked up,
and the prefix MLP runs once per step over the virtual tokens, not per token), nor vectors (IA3
scales, DoRA magnitudes, biases, norms: elementwise, a few FLOPs per token each).

Approximations, stated where MFU and TFLOP/s are reported (ftjax.cost_plan's plan line):
- attention is counted over the full `seq_len` row (t = seq_len, causal). Packed rows of short
  documents attend only within each document (the segment mask), so the useful attention work
  is lower: for documents of length L it is ~L/seq_len of the count here. The xla kernel
  computes the whole masked row anyway, so this is what the device does, not what a
  document-aware kernel needs.
- the weight gradients of base modules trained whole beside an adapter (modules_to_save) are
  not counted (2 FLOPs per parameter per token).
"""

from __future__ import annotations

import jax

from ftjax.models.config import ModelConfig
from ftjax.peft.prompt import PrefixTuningConfig, PromptTuningConfig

# Leaf names of adapter matrices that multiply every token (ftjax.peft.lora, .bottleneck).
ADAPTER_MATMUL_LEAVES = ("lora_a", "lora_b", "adapter_down", "adapter_up")


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls per token (the embedding lookup is free; the head isn't)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  # MoE: a token runs through its top-k experts only (the computation, not the stored params),
  # plus the router.
  mlp = 3 * d * f * cfg.num_experts_per_tok + d * cfg.num_experts if cfg.num_experts else 3 * d * f
  per_layer = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + mlp
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def adapter_matmul_params(trainable) -> int:
  """The trained parameters that are per-token matmul weights (see the module docstring)."""
  return sum(int(leaf.size) for path, leaf in jax.tree_util.tree_leaves_with_path(trainable)
             if str(getattr(path[-1], "key", path[-1])) in ADAPTER_MATMUL_LEAVES)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, full: bool, lora_params: int = 0,
                          prompt_tokens: int = 0, prefix_tokens: int = 0) -> float:
  """`lora_params`: adapter_matmul_params of the trained partition (0 for full fine-tuning).
  `prompt_tokens`: virtual tokens prepended to every row (prompt tuning): the layers, their
  adapters and causal attention run over seq_len + prompt_tokens positions, the head over the
  row's own. `prefix_tokens`: keys and values every position attends beyond its row (prefix
  tuning)."""
  head = cfg.hidden_size * cfg.vocab_size
  positions = (seq_len + prompt_tokens) / seq_len  # layer positions per trained position
  dense = (6 if full else 4) * ((matmul_params(cfg) - head) * positions + head)
  dense += 6 * lora_params * positions
  keys = (seq_len + prompt_tokens) * positions / 2 + prefix_tokens  # attended per position, causal
  attention = 3 * cfg.num_layers * 4 * keys * cfg.q_size
  return float(dense + attention)


def run_flops_per_token(run, trainable) -> float:
  """train_flops_per_token of an ftjax.run.Run whose trained partition is `trainable`."""
  virtual = lambda kind: sum(c.num_virtual_tokens for c in run.peft_configs.values()
                             if isinstance(c, kind))
  return train_flops_per_token(
      run.model_cfg, run.config.data.seq_len, full=run.config.method == "full",
      lora_params=adapter_matmul_params(trainable), prompt_tokens=virtual(PromptTuningConfig),
      prefix_tokens=virtual(PrefixTuningConfig))
