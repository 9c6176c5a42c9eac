"""AdamW with warmup + decay, global-norm clipping, a weight-decay mask and LoRA+.

The optimizer only ever sees the trainable partition of the params (see ftjax/step.py), so
frozen weights carry no optimizer state at all; within it, optax masks decide which leaves decay
and which learning rate each leaf gets (LoRA+).

Weight decay (`decay_mask`): matrices decay; vectors don't. That is HF Trainer's rule (no decay
for biases and norm weights: names containing "bias" or a norm, see
transformers.Trainer.get_decay_parameter_names) widened to every per-feature vector, because
the trained vectors of the PEFT methods are not weights that should shrink toward 0: IA3's
`ia3_l` starts at 1 (decay toward 0 switches the scaled activations off) and DoRA's
`lora_magnitude` starts at the base weight's column norms (decay toward 0 shrinks the layer).
HF Trainer decays both (neither name has "bias" or "norm" in it); nanoGPT/timm's "ndim < 2"
rule, which we follow for them, does not. Bottleneck `adapter_*_bias` are biases: no decay.
Prompt/prefix tables and every LoRA/bottleneck matrix decay.

LoRA+ (`loraplus_labels`): PEFT's create_loraplus_optimizer (peft/optimizers/loraplus.py) puts
`lora_B` and every 1-D trained parameter (DoRA magnitudes, biases, norm scales, IA3 vectors)
in the fast group (lr x ratio), everything else at lr. So do we. PEFT's one other group, LoRA
on embeddings at a fixed `loraplus_lr_embedding` (1e-6), has no counterpart here: ftjax wraps
no embedding layers with LoRA. PEFT's loraplus decays the DoRA magnitude (its own decay rule
is the older "bias"/LayerNorm one); we don't, as above.

"Vector" means one value per feature of one layer: in stacked layers the leaf carries a
leading layer axis, so it is recognised by name (the names below) as well as by ndim <= 1.
"""

from __future__ import annotations

import re

import jax
import optax

from ftjax.config import SCHEDULES
from ftjax.errors import FtjaxError
from ftjax.tree import Params

# Leaf names of per-feature vectors, stacked or not: norm scales, biases, IA3 scales, DoRA
# magnitudes (ftjax.models.llama, ftjax.peft).
VECTOR_NAMES = ("scale", "bias", "ia3_l", "lora_magnitude")
# HF Trainer's forbidden_name_patterns (transformers 5 Trainer.get_decay_parameter_names).
_NO_DECAY_PATTERN = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def make_schedule(lr: float, steps: int, warmup_steps: int, kind: str = "cosine",
                  end_factor: float = 0.0) -> optax.Schedule:
  if kind not in SCHEDULES:
    raise FtjaxError(f"schedule kind={kind!r}; expected one of {SCHEDULES}")
  decay_steps = max(steps - warmup_steps, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, lr * end_factor, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def _keys(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_vector(path, leaf) -> bool:
  """A per-feature vector (bias, norm scale, IA3 scale, DoRA magnitude), stacked or not."""
  name = _keys(path)[-1]
  return len(getattr(leaf, "shape", ())) <= 1 or name in VECTOR_NAMES or name.endswith("_bias")


def decays(path, leaf) -> bool:
  """Whether AdamW's weight decay reaches this leaf: matrices yes, vectors and norms no."""
  dotted = ".".join(_keys(path)).lower()
  return not (is_vector(path, leaf) or _NO_DECAY_PATTERN.search(dotted))


def decay_mask(trainable: Params) -> Params:
  return jax.tree_util.tree_map_with_path(decays, trainable)


def loraplus_labels(trainable: Params) -> Params:
  """"b" (lr x ratio) for LoRA's B and every vector, as PEFT's loraplus; "rest" otherwise.
  ("b": the group's name in checkpoints written before vectors joined it.)"""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: "b" if _keys(path)[-1] == "lora_b" or is_vector(path, leaf)
      else "rest", trainable)


def applied_updates(opt_state, default=None):
  """How many updates the optimizer has applied: the count its learning-rate schedule reads.

  A skipped (non-finite) step leaves it where it was, as HF Trainer skips lr_scheduler.step()
  when the optimizer step was skipped; so the schedule follows applied updates, not steps.
  The count of a schedule (optax.ScaleByScheduleState) if there is one, else of any optax state
  that counts (Adam's); `default` for an optimizer that counts nothing.
  """
  counted = [s for s in jax.tree.leaves(opt_state, is_leaf=_counts) if _counts(s)]
  scheduled = [s for s in counted if isinstance(s, optax.ScaleByScheduleState)]
  return (scheduled or counted)[0].count if counted else default


def _counts(x) -> bool:
  return isinstance(x, tuple) and "count" in getattr(x, "_fields", ())  # an optax NamedTuple


def make_optimizer(trainable: Params, *, lr: float, steps: int, warmup_steps: int = 0,
                   schedule: str = "cosine", weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   lora_plus_ratio: float = 1.0):
  """Returns (optimizer, learning-rate schedule of the base group); the schedule's argument is
  `applied_updates(opt_state)`."""
  sched = make_schedule(lr, steps, warmup_steps, schedule)

  def adamw(s):
    return optax.adamw(s, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

  if lora_plus_ratio != 1.0:  # LoRA+: B learns ratio x faster than A (Hayou et al. 2024)
    fast = make_schedule(lr * lora_plus_ratio, steps, warmup_steps, schedule)
    update = optax.multi_transform({"rest": adamw(sched), "b": adamw(fast)},
                                   loraplus_labels(trainable))
  else:
    update = adamw(sched)
  chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  return optax.chain(*chain, update), sched
