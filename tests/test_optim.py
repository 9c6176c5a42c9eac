"""Optimizer pieces: schedules, the weight-decay mask and LoRA+."""

import jax
import jax.numpy as jnp
import pytest

from ftjax.optim import decay_mask, make_optimizer, make_schedule


def test_warmup_then_cosine_to_zero():
  s = make_schedule(1e-3, steps=100, warmup_steps=10, kind="cosine")
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1e-3)
  assert float(s(5)) == pytest.approx(5e-4)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-9)
  assert float(make_schedule(1e-3, 100, 0, "linear")(50)) == pytest.approx(5e-4)
  assert float(make_schedule(1e-3, 100, 0, "constant")(99)) == pytest.approx(1e-3)


def _tree():
  return {"layers": {"attn": {"q_proj": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4)),
                                         "lora_a": jnp.ones((2, 4, 2)), "lora_b": jnp.ones((2, 2, 4))}},
                     "input_norm": {"scale": jnp.ones((2, 4))}}}


def test_weight_decay_skips_norms_and_biases():
  tree = _tree()
  mask = decay_mask(tree)
  assert mask["layers"]["attn"]["q_proj"]["kernel"] and mask["layers"]["attn"]["q_proj"]["lora_a"]
  assert not mask["layers"]["attn"]["q_proj"]["bias"] and not mask["layers"]["input_norm"]["scale"]
  opt, _ = make_optimizer(tree, lr=0.1, steps=10, weight_decay=0.5, max_grad_norm=0)
  zeros = jax.tree.map(jnp.zeros_like, tree)
  updates, _ = opt.update(zeros, opt.init(tree), tree)  # zero gradient: only decay moves params
  assert float(jnp.abs(updates["layers"]["attn"]["q_proj"]["kernel"]).max()) == pytest.approx(0.05)
  assert float(jnp.abs(updates["layers"]["attn"]["q_proj"]["bias"]).max()) == 0.0
  assert float(jnp.abs(updates["layers"]["input_norm"]["scale"]).max()) == 0.0


def test_lora_plus_gives_b_a_larger_learning_rate():
  tree = {"q": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 3))}}
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), tree)
  opt, _ = make_optimizer(tree, lr=1e-3, steps=10, lora_plus_ratio=16.0, max_grad_norm=0)
  updates, _ = opt.update(grads, opt.init(tree), tree)
  # Adam's first step moves every entry by ~lr, so the ratio of the step sizes is the lr ratio.
  ratio = float(jnp.abs(updates["q"]["lora_b"]).mean() / jnp.abs(updates["q"]["lora_a"]).mean())
  assert ratio == pytest.approx(16.0, rel=1e-4)
