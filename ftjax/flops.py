"""Model FLOPs per trained token, for MFU.

Dense training ≈ 6·N FLOPs per token with weight gradients (full fine-tuning), ≈ 4·N with a
frozen base (forward 2·N + input gradients 2·N), plus the LoRA factors' own cost and attention
(QK^T and AV: 4·t·d_q FLOPs per token per layer forward, halved for causal masks, x3 with backward).
"""

from __future__ import annotations

from ftjax.models.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls per token (the embedding lookup is free; the head isn't)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  per_layer = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * f
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int, full: bool, lora_params: int = 0) -> float:
  n = matmul_params(cfg)
  dense = (6 if full else 4) * n + 6 * lora_params
  attention = 3 * cfg.num_layers * 4 * seq_len * cfg.q_size / 2
  return float(dense + attention)
