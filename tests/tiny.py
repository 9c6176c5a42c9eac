"""A tiny ftjax-native model and random batches for train-step tests."""

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models.config import ModelConfig
from ftjax.models.params import init_params

TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)


def tiny_params(seed=0, cfg=TINY):
  return init_params(cfg, jax.random.key(seed), std=0.1)


def random_batch(rng: np.random.RandomState, batch: int, seq: int, vocab: int = 64):
  tokens = rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32)
  mask = (rng.rand(batch, seq) > 0.3).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}
