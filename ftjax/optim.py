"""AdamW with warmup + decay, global-norm clipping, a weight-decay mask and LoRA+.

The optimizer only ever sees the trainable partition of the params (see ftjax/step.py), so
frozen weights carry no optimizer state at all; within it, optax masks decide which leaves decay
(matrices do, norms and biases don't) and which learning rate each leaf gets (LoRA+).
"""

from __future__ import annotations

import jax
import optax

from ftjax.models.params import Params


def make_schedule(lr: float, steps: int, warmup_steps: int, kind: str = "cosine",
                  end_factor: float = 0.0) -> optax.Schedule:
  decay_steps = max(steps - warmup_steps, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, lr * end_factor, decay_steps)
  else:  # "constant"
    decay = optax.constant_schedule(lr)
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def _last_key(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def decay_mask(trainable: Params) -> Params:
  """Weight decay on matrices only: no decay on norm scales and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _last_key(path) not in ("scale", "bias"), trainable)


def make_optimizer(trainable: Params, *, lr: float, steps: int, warmup_steps: int = 0,
                   schedule: str = "cosine", weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   lora_plus_ratio: float = 1.0):
  """Returns (optimizer, learning-rate schedule of the base group)."""
  sched = make_schedule(lr, steps, warmup_steps, schedule)

  def adamw(s):
    return optax.adamw(s, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

  if lora_plus_ratio != 1.0:  # LoRA+: B learns ratio x faster than A (Hayou et al. 2024)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "b" if _last_key(path) == "lora_b" else "rest", trainable)
    fast = make_schedule(lr * lora_plus_ratio, steps, warmup_steps, schedule)
    update = optax.multi_transform({"rest": adamw(sched), "b": adamw(fast)}, labels)
  else:
    update = adamw(sched)
  chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  return optax.chain(*chain, update), sched
