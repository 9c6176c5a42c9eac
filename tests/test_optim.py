"""Optimizer pieces: schedules, the weight-decay mask and LoRA+."""

import jax
import jax.numpy as jnp
import pytest

from ftjax.errors import FtjaxError
from ftjax.optim import decay_mask, loraplus_labels, make_optimizer, make_schedule


def test_warmup_then_cosine_to_zero():
  s = make_schedule(1e-3, steps=100, warmup_steps=10, kind="cosine")
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1e-3)
  assert float(s(5)) == pytest.approx(5e-4)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-9)
  assert float(make_schedule(1e-3, 100, 0, "linear")(50)) == pytest.approx(5e-4)
  assert float(make_schedule(1e-3, 100, 0, "constant")(99)) == pytest.approx(1e-3)


def test_unknown_schedule_kind_is_refused():
  with pytest.raises(FtjaxError, match=r"schedule kind='cosin'; expected one of \('cosine', 'linear', 'constant'\)"):
    make_schedule(1e-3, 100, 10, "cosin")


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


def _peft_vectors_tree(layers=2, d=4, m=2):
  """Every kind of trained leaf of the PEFT methods, stacked over `layers` as the decoder is."""
  ones = lambda *shape: jnp.ones((layers, *shape))
  return {"q_proj": {"lora_a": ones(d, 2), "lora_b": ones(2, d), "lora_magnitude": ones(d)},
          "k_proj": {"ia3_l": ones(d)},
          "o_proj": {"adapter_down": ones(d, m), "adapter_down_bias": ones(m),
                     "adapter_up": ones(m, d), "adapter_up_bias": ones(d)},
          "q_norm": {"scale": ones(d)}, "post_attention_layernorm": {"weight": ones(d)},
          "prompt": {"prompt_embeddings": jnp.ones((3, d))}}


def test_weight_decay_reaches_matrices_only():
  """IA3 scales (start at 1), DoRA magnitudes and bottleneck biases are vectors: decay would pull
  them toward 0, so none decays (HF Trainer's bias/norm rule widened to vectors, see
  ftjax/optim.py); every matrix does, by lr * weight_decay * param = 0.1 * 0.5 * 1."""
  tree = _peft_vectors_tree()
  opt, _ = make_optimizer(tree, lr=0.1, steps=10, weight_decay=0.5, max_grad_norm=0)
  zeros = jax.tree.map(jnp.zeros_like, tree)
  updates, _ = opt.update(zeros, opt.init(tree), tree)  # zero gradient: only decay moves params
  moved = {"/".join(str(k.key) for k in path): float(jnp.abs(u).max())
           for path, u in jax.tree_util.tree_leaves_with_path(updates)}
  matrices = {"q_proj/lora_a", "q_proj/lora_b", "o_proj/adapter_down", "o_proj/adapter_up",
              "prompt/prompt_embeddings"}
  assert {k for k, v in moved.items() if v} == matrices
  assert all(moved[k] == pytest.approx(0.05) for k in matrices)


def _peft_loraplus_groups(ratio):
  """PEFT's own LoRA+ grouping of a LoRA + DoRA model with trained biases and a trained norm:
  {peft parameter name: True when in the fast (lr x ratio) group}."""
  torch = pytest.importorskip("torch")
  from peft import LoraConfig, get_peft_model
  from peft.optimizers import create_loraplus_optimizer

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.q_proj, self.norm, self.down_proj = (torch.nn.Linear(4, 6), torch.nn.LayerNorm(6),
                                                torch.nn.Linear(6, 4))

    def forward(self, x):
      return self.down_proj(self.norm(self.q_proj(x)))

  model = get_peft_model(Block(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                             use_dora=True, bias="lora_only",
                                             modules_to_save=["norm"]))
  opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1.0, loraplus_lr_ratio=ratio)
  names = {id(p): n for n, p in model.named_parameters()}
  return {names[id(p)]: group["lr"] == ratio for group in opt.param_groups for p in group["params"]}


def _ftjax_leaf(peft_name: str) -> tuple[str, str]:
  """PEFT's name of a parameter -> (module, leaf) in ftjax's trainable tree."""
  parts = peft_name.removeprefix("base_model.model.").split(".")
  leaf = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "lora_magnitude"}
  for part in parts[1:]:
    if part in leaf:
      return parts[0], leaf[part]
  return parts[0], "scale" if parts[0] == "norm" and parts[-1] == "weight" else parts[-1]


@pytest.mark.parametrize("layers", [(), (3,)], ids=["single", "stacked"])
def test_lora_plus_groups_as_peft_does(layers):
  """The fast group is PEFT's: lora_B and every vector (DoRA magnitude, bias, norm weights), for
  leaves with and without the decoder's stacked layer axis."""
  peft_fast = _peft_loraplus_groups(16.0)
  shapes = {"lora_a": (4, 2), "lora_b": (2, 6), "lora_magnitude": (6,), "bias": (6,), "scale": (6,)}
  tree = {}
  for name in peft_fast:
    module, leaf = _ftjax_leaf(name)
    tree.setdefault(module, {})[leaf] = jnp.ones(layers + shapes[leaf])
  labels = loraplus_labels(tree)
  ours = {name: labels[_ftjax_leaf(name)[0]][_ftjax_leaf(name)[1]] == "b" for name in peft_fast}
  assert ours == peft_fast
  # fast: 2 B, 2 DoRA magnitudes, the 2 wrapped layers' biases, the norm's weight and bias; not 2 A
  assert sum(peft_fast.values()) == 8 and len(peft_fast) == 10
