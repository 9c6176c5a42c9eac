"""The pure train step: its math against PyTorch (peft + AdamW, and plain transformers), gradient
accumulation, remat, the chunked loss, and what a non-finite step does."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import hf_models
from ftjax import models, peft
from ftjax import step as step_lib
from ftjax.losses import CausalLMLoss
from ftjax.models.config import load_hf_config
from ftjax.optim import make_optimizer
from tiny import random_batch, tiny_model


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _capture_gradient():
  """An 'optimizer' whose state is the last gradient it saw (and which never moves params):
  comparing gradients directly avoids the rounding of params + tiny update."""
  return optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


def _jit_step(graphdef, optimizer, loss_fn=CausalLMLoss()):
  return jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, loss_fn=loss_fn,
                                   optimizer=optimizer, schedule=optax.constant_schedule(0.1)))


def _lora_model(rank=4, nonzero_b=True):
  model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                            target_modules="all-linear"))
  if nonzero_b:  # so that A gets gradients too
    for _, layer in peft.adapter_layers(model):
      layer.lora_b.set_value(layer.lora_b[...] + 0.1)
  return model


# --- training math vs PyTorch ---------------------------------------------------------------

def _torch_batches(vocab: int):
  """Three batches with completion-only masks (the first 5 targets of a row untrained) and
  right padding (row 1 ends after 11 tokens)."""
  out = []
  for seed in range(3):
    b = random_batch(np.random.RandomState(seed), 2, 16, vocab)
    b["segment_ids"][1, 11:] = 0
    b["loss_mask"] = np.ones((2, 16), np.float32)
    b["loss_mask"][:, :5] = 0
    b["loss_mask"] *= b["segment_ids"]
    out.append(b)
  return out


def _torch_loss(model, batch):
  """Our loss in torch: summed NLL over the masked targets / their count (one micro-batch)."""
  logits = model(input_ids=torch.tensor(batch["inputs"]),
                 attention_mask=torch.tensor(batch["segment_ids"])).logits
  mask = torch.tensor(batch["loss_mask"]) > 0
  return torch.nn.functional.cross_entropy(logits[mask], torch.tensor(batch["targets"])[mask].long())


def _torch_adamw(params, lr, weight_decay):
  """AdamW with ftjax's decay mask: matrices decay, norms (1-D) do not."""
  params = [p for p in params if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _torch_step(model, optimizer, loss) -> None:
  """One torch update as ftjax's step makes it: backward, clip to norm 1 (max_grad_norm), step."""
  loss.backward()
  torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
  optimizer.step()
  optimizer.zero_grad()


def _peft_lora_state(model) -> dict:
  """An HF PEFT model's LoRA tensors under the keys peft saves (ftjax's adapter_state_dict's)."""
  return {k.replace(".default", ""): v.detach().numpy()
          for k, v in model.state_dict().items() if "lora_" in k}


def _train_both(ftjax_model, trainable, torch_model, lr=1e-3, weight_decay=0.1, steps=3):
  graphdef, train, frozen, mutable = step_lib.split_model(ftjax_model, trainable)
  optimizer, _ = make_optimizer(train, lr=lr, steps=steps, schedule="constant",
                                weight_decay=weight_decay, max_grad_norm=1.0)
  step = _jit_step(graphdef, optimizer)
  state = step_lib.init_state(train, mutable, optimizer, seed=0)
  torch_opt = _torch_adamw(torch_model.parameters(), lr, weight_decay)
  torch_model.train()
  for batch in _torch_batches(torch_model.config.vocab_size):
    state, _ = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
    _torch_step(torch_model, torch_opt, _torch_loss(torch_model, batch))
  return step_lib.merge_model(graphdef, state["trainable"], frozen, state["mutable"])


@pytest.fixture
def hf_dir(hf_llama_dir):
  return hf_llama_dir


_ours = hf_models.ftjax_model


def l2_rel(ours: dict, theirs: dict) -> float:
  """||ours - theirs|| / ||theirs|| over every value of the two same-keyed tensor dicts.

  Why not the max entry: Adam divides each gradient entry by its own magnitude, so an entry whose
  gradient cancels to ~1e-8 (in Adam's eps regime) moves by an amount set by that tiny value,
  whose f32 summation-order error between XLA and torch is ~1e-3 relative. Measured here: the
  worst single entry differs by up to 2e-3 of its tensor's max, the whole adapter by 2e-6.
  """
  num = sum(float(np.sum((np.asarray(ours[k]) - np.asarray(theirs[k])) ** 2)) for k in theirs)
  return (num / sum(float(np.sum(np.asarray(theirs[k]) ** 2)) for k in theirs)) ** 0.5


def test_three_lora_adamw_steps_equal_peft(hf_dir, tmp_path):
  """Same LoRA init (ftjax's, saved and loaded by peft), same batches: the adapters after three
  AdamW steps agree within 1e-5 (f32 both sides; only summation order differs)."""
  import peft as hf_peft
  import transformers
  model = peft.get_peft_model(_ours(hf_dir), peft.LoraConfig(r=4, lora_alpha=8,
                                                             target_modules="all-linear"))
  peft.save_adapter(model, str(tmp_path / "init"))
  reference = hf_peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
      str(tmp_path / "init"), is_trainable=True)
  trained = _train_both(model, peft.AdapterParam, reference)
  ours = peft.adapter_state_dict(trained)
  theirs = _peft_lora_state(reference)
  assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 2
  assert l2_rel(ours, theirs) < 1e-5
  for key in ours:  # and no single tensor far off
    assert l2_rel({key: ours[key]}, {key: theirs[key]}) < 1e-4, key
  init = peft.adapter_state_dict(model)
  assert all(rel_err(ours[k], init[k]) > 1e-3 for k in ours if "lora_B" in k)  # they moved


def test_three_full_adamw_steps_equal_transformers(hf_dir, tmp_path):
  import transformers
  from ftjax.models.hf import load_hf_params as load
  reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  trained = _train_both(_ours(hf_dir), nnx.Param, reference)
  models.save_pretrained(trained, str(tmp_path / "ours"))
  reference.save_pretrained(str(tmp_path / "theirs"))
  cfg = load_hf_config(hf_dir)
  ours, theirs, init = (load(str(tmp_path / "ours"), cfg), load(str(tmp_path / "theirs"), cfg),
                        load(hf_dir, cfg))
  flat = lambda tree: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  ours, theirs, init = flat(ours), flat(theirs), flat(init)
  assert l2_rel(ours, theirs) < 1e-5
  for key in ours:
    assert l2_rel({key: ours[key]}, {key: theirs[key]}) < 1e-4, key
    assert not np.array_equal(ours[key], init[key]), key  # every param trained


# --- the step's own properties --------------------------------------------------------------

def test_remat_policies_agree_on_loss_and_gradients():
  """Remat changes what the backward pass recomputes, never the numbers (up to op order)."""
  graphdef, train, frozen, mutable = step_lib.split_model(_lora_model(rank=2), peft.AdapterParam)
  batch = random_batch(np.random.RandomState(0), 2, 12)

  def loss_and_grads(policy):
    loss_fn = CausalLMLoss(remat=policy)
    f = lambda t: loss_fn(step_lib.merge_model(graphdef, t, frozen, mutable), batch)["loss_sum"]
    return jax.jit(jax.value_and_grad(f))(train)

  ref_loss, ref_grads = loss_and_grads("none")
  for policy in ("full", "dots", "dots_no_batch", "projections"):
    loss, grads = loss_and_grads(policy)
    # Same ops recomputed; only XLA's fusion and summation order may differ.
    assert rel_err(loss, ref_loss) < 1e-6, policy
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      assert rel_err(got, want) < 1e-5, policy


@pytest.mark.parametrize("method", ["lora", "full"])
def test_grad_accumulation_equals_one_big_batch(method):
  """4 micro-batches of 2 == one batch of 8: the loss and the gradient given to the optimizer."""
  model = _lora_model() if method == "lora" else tiny_model()
  graphdef, train, frozen, mutable = step_lib.split_model(
      model, peft.AdapterParam if method == "lora" else nnx.Param)
  optimizer = _capture_gradient()
  step = _jit_step(graphdef, optimizer)
  state = step_lib.init_state(train, mutable, optimizer, 0)
  batch = random_batch(np.random.RandomState(0), 8, 16)  # uneven token counts per micro-batch
  counts = batch["loss_mask"].reshape(4, -1).sum(1)
  assert len(set(counts.tolist())) > 1  # so a mean of micro-batch means would differ
  one, m1 = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
  four, m4 = step(state, frozen, jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch))
  assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5 * float(m1["loss"])
  leaves1, leaves4 = jax.tree.leaves(one["opt_state"]), jax.tree.leaves(four["opt_state"])
  assert len(leaves1) == len(jax.tree.leaves(train))
  # f32 sums over tokens in a different order: relative L2 distance of the whole update.
  # (Single entries that are sums with heavy cancellation differ by up to ~2e-5 of their leaf's
  # max, which is rounding, not a normalisation error: that would be off by 10%+.)
  diff = optax.tree.norm(jax.tree.map(jnp.subtract, leaves4, leaves1))
  assert float(diff) <= 1e-5 * float(optax.tree.norm(leaves1))
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves1)


def test_non_finite_step_leaves_the_state_unchanged():
  graphdef, train, frozen, mutable = step_lib.split_model(_lora_model(), peft.AdapterParam)
  optimizer = optax.adam(1e-2)
  step = _jit_step(graphdef, optimizer)
  state = step_lib.init_state(train, mutable, optimizer, 0)
  batch = jax.tree.map(lambda x: x[None], random_batch(np.random.RandomState(0), 2, 8))
  good, metrics = step(state, frozen, batch)
  assert bool(metrics["finite"])
  bad_frozen = jax.tree.map(lambda x: x, frozen)
  bad_frozen["model"]["norm"]["scale"] = jnp.full_like(frozen["model"]["norm"]["scale"], jnp.nan)
  after, metrics = step(good, bad_frozen, batch)
  assert not bool(metrics["finite"]) and int(after["step"]) == 2
  for a, b in zip(jax.tree.leaves((good["trainable"], good["opt_state"])),
                  jax.tree.leaves((after["trainable"], after["opt_state"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_logged_learning_rate_is_the_applied_one_after_a_skipped_step():
  """A linear schedule, steps good / non-finite / good: each logged lr is the one the update
  applied, and the skip delays the schedule by one step (HF Trainer skips lr_scheduler.step()
  with the optimizer step). Adam with b1 = b2 = 0 moves every entry by lr * g / (|g| + eps),
  i.e. by lr to ~1e-6 (eps 1e-8 against gradients >= ~1e-4): the largest move is the lr."""
  graphdef, train, frozen, mutable = step_lib.split_model(_lora_model(), peft.AdapterParam)
  optimizer, schedule = make_optimizer(train, lr=0.01, steps=10, schedule="linear", b1=0.0,
                                       b2=0.0, max_grad_norm=0)
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, loss_fn=CausalLMLoss(),
                                   optimizer=optimizer, schedule=schedule))
  state = step_lib.init_state(train, mutable, optimizer, 0)
  batch = jax.tree.map(lambda x: x[None], random_batch(np.random.RandomState(0), 2, 8))
  bad_frozen = jax.tree.map(lambda x: x, frozen)
  bad_frozen["model"]["norm"]["scale"] = jnp.full_like(frozen["model"]["norm"]["scale"], jnp.nan)
  logged, applied = [], []
  for frozen_now in (frozen, bad_frozen, frozen):
    after, metrics = step(state, frozen_now, batch)
    logged.append(float(metrics["lr"]))
    applied.append(max(float(jnp.abs(a - b).max()) for a, b in
                       zip(jax.tree.leaves(after["trainable"]), jax.tree.leaves(state["trainable"]))))
    state = after
  assert applied[1] == 0.0 and int(state["step"]) == 3
  assert logged == pytest.approx([0.01, 0.009, 0.009], rel=1e-6)  # the skip does not advance it
  assert [applied[0], applied[2]] == pytest.approx([logged[0], logged[2]], rel=1e-4)


def test_chunked_cross_entropy_matches_full():
  model = tiny_model()
  batch = random_batch(np.random.RandomState(0), 3, 10)  # 10 positions: chunks of 8 need padding
  graphdef, params = nnx.split(model, nnx.Param)
  full, chunked = CausalLMLoss(), CausalLMLoss(vocab_chunk=8)
  a, b = full(model, batch), chunked(model, batch)
  for k in a:
    assert abs(float(a[k]) - float(b[k])) <= 1e-5 * max(abs(float(a[k])), 1.0), k
  grad = lambda loss: jax.grad(lambda p: loss(nnx.merge(graphdef, p), batch)["loss_sum"])(params)
  ga, gb = grad(full), grad(chunked)
  diff = optax.tree.norm(jax.tree.map(jnp.subtract, ga, gb))
  assert float(diff) <= 1e-5 * float(optax.tree.norm(ga))


def test_unrolled_layers_match_scanned():
  model = tiny_model()
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))
  assert rel_err(model(tokens, unroll=True), model(tokens)) < 1e-6


def test_lora_dropout_uses_the_step_key(monkeypatch):
  """Dropout on the decoder's LoRA inputs, every mask recorded: the rate and the 1/(1-p)
  scaling are right, q/k/v (gate/up) and every layer draw their own masks, a key gives the
  same loss twice and another key another; no key, no dropout."""
  from ftjax.peft import core
  rate, masks = 0.25, []
  record = lambda x, xd: masks.append((np.asarray(x), np.asarray(xd)))

  def recording(x, p, key):
    out = core.dropout.__wrapped__(x, p, key)
    jax.debug.callback(record, x, out)  # fires once per layer of the scan
    return out
  recording.__wrapped__ = core.dropout
  monkeypatch.setattr(core, "dropout", recording)
  model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_dropout=rate,
                                                            target_modules="all-linear"))
  for _, layer in peft.adapter_layers(model):
    layer.lora_b.set_value(layer.lora_b[...] + 0.5)
  batch = random_batch(np.random.RandomState(0), 2, 8)
  jitted = nnx.jit(lambda m, rng: CausalLMLoss()(m, batch, rng)["loss_sum"])
  loss = lambda rng: float(jitted(model, rng))
  assert loss(jax.random.key(0)) != loss(jax.random.key(1))
  masks.clear()
  loss(jax.random.key(2))

  # 7 wrapped linears per layer, one mask each.
  n_layers = model.config.num_layers
  assert len(masks) == 7 * n_layers
  keep = [xd != 0 for _, xd in masks]
  kept = np.concatenate([k.ravel() for k in keep])
  # Binomial: n = 16 tokens x (32 x 6 + 64) inputs x 2 layers = 8192 elements, std
  # sqrt(p(1-p)/n) = 0.0048; 5 std is 0.024 (a missing mask moves the rate by 0.25).
  assert abs(1 - kept.mean() - rate) < 0.024
  for (x, xd), k in zip(masks, keep):  # kept inputs scaled by 1/(1-p), up to f32 rounding
    np.testing.assert_allclose(xd[k], x[k] / (1 - rate), rtol=1e-6)
  # Modules reading the same input (q/k/v, gate/up) and the layers of the stack: masks agree
  # where independent ones would, p^2 + (1-p)^2 = 0.625 (a shared mask agrees everywhere).
  by_input = {}
  for x, k in zip([x for x, _ in masks], keep):
    by_input.setdefault(x.tobytes(), []).append(k)
  groups = [g for g in by_input.values() if len(g) > 1]
  assert sorted(len(g) for g in groups) == [2] * n_layers + [3] * n_layers
  agree = lambda a, b: float((a == b).mean())
  pairs = [agree(g[i], g[j]) for g in groups for i in range(len(g)) for j in range(i + 1, len(g))]
  # each pair has >= 512 elements: std <= 0.021, 5 std 0.11
  assert all(abs(a - 0.625) < 0.11 for a in pairs), pairs
  # The same site (q/k/v) in layer 0 and layer 1 draws other masks too.
  first, second = [g[0] for g in groups if len(g) == 3]
  assert abs(agree(first, second) - 0.625) < 0.11

  assert loss(jax.random.key(0)) == loss(jax.random.key(0))
  masks.clear()
  with peft.disable_adapters(model):
    base = loss(None)
  assert loss(None) != base and not masks  # no key: no dropout, but the adapter is on
