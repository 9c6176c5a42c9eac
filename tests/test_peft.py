"""ftjax.peft on (a) ftjax's decoder, against HF PEFT on the same tiny HF model, and (b) a
user-written Flax NNX model that is not a decoder (the recipe in docs/python_api.md)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft as hf_peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import hf_models
from ftjax import models
from ftjax import peft
from ftjax import step as step_lib
from ftjax.errors import FtjaxError
from ftjax.losses import CausalLMLoss
from tiny import counting_batch


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def hf_dir(hf_llama_dir):
  return hf_llama_dir


ours = hf_models.ftjax_model


def hf_model(hf_dir):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


TOKENS = np.random.RandomState(0).randint(0, 128, (2, 16))


def hf_logits(model, tokens=TOKENS):
  """The logits of the real tokens (PEFT's prompt tuning also returns its virtual tokens')."""
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()[:, -tokens.shape[1]:]


def lora_names(model) -> set[str]:
  """Torch names of the modules ftjax's model has adapters on, one per (adapted) layer."""
  stacks = peft.core.stack_sizes(model)
  names = set()
  for path, layer in peft.adapter_layers(model):
    per_layer = peft.core.torch_names(path, stacks)[0]
    names.update(n for n, on in zip(per_layer, layer.layer_selected() or [True] * len(per_layer)) if on)
  return names


def hf_lora_names(model) -> set[str]:
  from peft.tuners.tuners_utils import BaseTunerLayer
  return {name.removeprefix("base_model.model.") for name, m in model.named_modules()
          if isinstance(m, BaseTunerLayer)}


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# method -> (ftjax config, the same config in HF PEFT, (learning rate, required loss ratio after
# 10 steps) of the toy training). A near-uniform random base learns slowly through small
# adapters. Measured: LoRA 4.85 -> 4.23; IA3, which can only rescale k, v and the FFN hidden
# features (480 numbers here), 4.85 -> 4.75.
METHODS = {
    "lora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
             lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), (1e-2, 0.95)),
    "dora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
             lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
             (1e-2, 0.95)),
    "lora_patterns": (
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                rank_pattern={"k_proj": 2, "mlp.down_proj": 6}, alpha_pattern={"up_proj": 2}),
        lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                   rank_pattern={"k_proj": 2, "mlp.down_proj": 6}, alpha_pattern={"up_proj": 2}),
        (1e-2, 0.95)),
    "lora_layers": (  # layer 1 of the 2-layer stack only
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, layers_to_transform=[1]),
        lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, layers_to_transform=[1]),
        (1e-2, 0.97)),
    "ia3": (lambda: peft.IA3Config(), lambda: hf_peft.IA3Config(), (1e-1, 0.99)),  # PEFT's defaults
    # Virtual tokens steer a random model least of all (measured at lr 0.1: prompt 4.86 -> 4.81,
    # prefix 4.87 -> 4.74, projected prefix 4.88 -> 4.64).
    "prompt": (lambda: peft.PromptTuningConfig(num_virtual_tokens=4),
               lambda: hf_peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
               (1e-1, 0.99)),
    "prefix": (lambda: peft.PrefixTuningConfig(num_virtual_tokens=4),
               lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
               (1e-1, 0.98)),
    "prefix_projection": (
        lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True),
        lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                           task_type="CAUSAL_LM"), (1e-1, 0.98)),
}
VIRTUAL = ("prompt", "prefix", "prefix_projection")  # no identity at init; nothing to merge


def perturb(model, adapter_name=None, seed=0):
  """Moves every adapter param (of one adapter, if named) off its init, so that the adapter
  changes the outputs."""
  for i, (_, layer) in enumerate(peft.adapter_layers(model)):
    key = jax.random.key(seed + i)
    if isinstance(layer, peft.ModulesToSave) or adapter_name not in (None, layer.adapter_name):
      continue
    if isinstance(layer, peft.IA3Linear):
      layer.ia3_l.set_value(layer.ia3_l[...] * (1 + 0.2 * jax.random.normal(key, layer.ia3_l.shape)))
      continue
    layer.lora_b.set_value(0.1 * jax.random.normal(key, layer.lora_b.shape))
    if isinstance(layer, peft.DoraLinear):
      layer.lora_magnitude.set_value(layer.lora_magnitude[...] * 1.1)


# --- (a) ftjax's Llama vs HF PEFT -----------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_llama_adapter_trains_keeps_base_and_loads_in_peft(hf_dir, tmp_path, method):
  ours_config, theirs_config, (lr, ratio) = METHODS[method]
  model = ours(hf_dir)
  base_logits = np.asarray(model(jnp.asarray(TOKENS)))
  model = peft.get_peft_model(model, ours_config())
  # B = 0 / IA3 scales = 1: exactly the base model at init. DoRA's m = ||W|| is divided by ||W||
  # recomputed in the layer (another reduction order), so its scale is 1 only up to f32 rounding.
  # Virtual tokens change the outputs from the start (PEFT's inits are random too).
  at_init = np.asarray(model(jnp.asarray(TOKENS)))
  if method == "dora":
    assert rel_err(at_init, base_logits) < 1e-6
  elif method not in VIRTUAL:
    np.testing.assert_array_equal(at_init, base_logits)

  # The same trainable / total counts as HF PEFT reports for the same config and model.
  reference = hf_peft.get_peft_model(hf_model(hf_dir), theirs_config())
  assert peft.count_params(model) == reference.get_nb_trainable_parameters()
  if method not in VIRTUAL:
    assert lora_names(model) == hf_lora_names(reference)

  # A few real train steps: the loss falls, the frozen base stays bit-identical in memory.
  graphdef, trainable, frozen, mutable = step_lib.split_model(model, peft.AdapterParam)
  before = jax.tree.map(np.array, frozen)  # copies
  optimizer = optax.adam(lr)
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, loss_fn=CausalLMLoss(),
                                   optimizer=optimizer), donate_argnums=0)
  state = step_lib.init_state(trainable, mutable, optimizer, seed=0)
  batch = jax.tree.map(lambda x: x[None], counting_batch(4, 16, vocab=128))
  losses = []
  for _ in range(10):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  # Every step must help, and the total drop be clear (METHODS says how much).
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < ratio * losses[0], losses
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(before),
                               jax.tree_util.tree_leaves_with_path(frozen)):
    np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(path))

  # The trained adapter, saved in PEFT's format, gives the same logits under HF PEFT.
  trained = step_lib.merge_model(graphdef, state["trainable"], frozen, state["mutable"])
  peft.save_adapter(trained, str(tmp_path / "adapter"))
  loaded = hf_peft.PeftModel.from_pretrained(hf_model(hf_dir), str(tmp_path / "adapter")).eval()
  # f32 on both sides: 1e-4 relative leaves room for summation order only.
  assert rel_err(trained(jnp.asarray(TOKENS)), hf_logits(loaded)) < 1e-4


@pytest.mark.parametrize("targets", [
    ["q_proj", "v_proj"], "all-linear", r".*self_attn\.(k|o)_proj", ["mlp.down_proj", "up_proj"],
    None,  # PEFT's default for llama: q_proj, v_proj
])
def test_target_modules_select_what_peft_selects(hf_dir, targets):
  ftjax_model = peft.get_peft_model(ours(hf_dir), peft.LoraConfig(r=2, target_modules=targets))
  reference = hf_peft.get_peft_model(hf_model(hf_dir), hf_peft.LoraConfig(r=2, target_modules=targets))
  assert lora_names(ftjax_model) == hf_lora_names(reference)


def test_target_modules_errors_name_the_problem(hf_dir):
  with pytest.raises(FtjaxError, match=r"match no module; the layers LoRA can wrap are named e.g. .*self_attn.q_proj"):
    peft.get_peft_model(ours(hf_dir), peft.LoraConfig(target_modules=r".*query"))
  with pytest.raises(FtjaxError, match=r"selects model.layers.0.self_attn, a Attention"):
    peft.get_peft_model(ours(hf_dir), peft.LoraConfig(target_modules=["self_attn"]))
  with pytest.raises(FtjaxError, match=r"in layers \[0\] but not in all 2.*layers_to_transform"):
    peft.get_peft_model(ours(hf_dir), peft.LoraConfig(target_modules=r"model\.layers\.0\..*q_proj"))
  model = peft.get_peft_model(ours(hf_dir), peft.LoraConfig(target_modules="all-linear"))
  with pytest.raises(FtjaxError, match="already has an adapter"):
    peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear"))
  with pytest.raises(FtjaxError, match="lora_dropout=1.5"):
    peft.LoraConfig(lora_dropout=1.5)
  with pytest.raises(FtjaxError, match=r"r=40 is larger than the layer model.layers.0.self_attn.k_proj \(64 -> 32\)"):
    peft.get_peft_model(ours(hf_dir), peft.LoraConfig(r=40, target_modules=["k_proj"]))


PEFT_WRITTEN = {  # random B (init_lora_weights=False): the adapter changes the logits
    "lora": lambda: hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                                       init_lora_weights=False),
    "rslora": lambda: hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules=r".*\.(q|k|down)_proj",
                                         use_rslora=True, init_lora_weights=False),
    "dora": lambda: hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                                       use_dora=True, init_lora_weights=False),
    "layers": lambda: hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                         layers_to_transform=[0], init_lora_weights=False),
    "patterns": lambda: hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                                           rank_pattern={"k_proj": 2, "down_proj": 8},
                                           alpha_pattern={"q_proj": 4}, init_lora_weights=False),
    "ia3": lambda: hf_peft.IA3Config(target_modules=["k_proj", "o_proj", "down_proj", "up_proj"],
                                     feedforward_modules=["down_proj", "up_proj"]),
    "prompt": lambda: hf_peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix": lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix_projection": lambda: hf_peft.PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("method", list(PEFT_WRITTEN))
def test_load_adapter_reads_what_peft_wrote(hf_dir, tmp_path, method):
  torch.manual_seed(0)
  reference = hf_peft.get_peft_model(hf_model(hf_dir), PEFT_WRITTEN[method]())
  with torch.no_grad():  # DoRA magnitudes and IA3 scales off their init values too
    for name, param in reference.named_parameters():
      if "lora_magnitude_vector" in name or "ia3_l" in name:
        param.mul_(1 + 0.2 * torch.randn_like(param))
  reference.eval()
  reference.save_pretrained(str(tmp_path))
  model = peft.load_adapter(ours(hf_dir), str(tmp_path))
  assert type(model.peft_config["default"]).peft_type == type(PEFT_WRITTEN[method]()).__name__.removesuffix(
      "Config").upper().replace("TUNING", "_TUNING")
  want = hf_logits(reference)
  assert rel_err(hf_logits(hf_model(hf_dir)), want) > 1e-2  # the adapter matters
  assert rel_err(model(jnp.asarray(TOKENS)), want) < 1e-4
  # ... and ftjax writes back what it read.
  peft.save_adapter(model, str(tmp_path / "again"))
  a = load_file(str(tmp_path / "adapter_model.safetensors"))
  b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_load_as_peft_reloads_them(hf_dir, tmp_path, init):
  """PiSSA / OLoRA move part of each base weight into the adapter at init; PEFT redoes that on
  the base when it reloads the adapter, and so must ftjax, or the model is another one."""
  torch.manual_seed(0)
  config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
  trained = hf_peft.get_peft_model(hf_model(hf_dir), hf_peft.LoraConfig(**config))
  with torch.no_grad():  # as if trained: both factors off their init
    for name, param in trained.named_parameters():
      if "lora_" in name:
        param.add_(0.05 * torch.randn_like(param))
  trained.save_pretrained(str(tmp_path))
  want = hf_logits(hf_peft.PeftModel.from_pretrained(hf_model(hf_dir), str(tmp_path)).eval())
  assert rel_err(hf_logits(trained.eval()), want) < 1e-5  # PEFT's reload is the trained model
  model = peft.load_adapter(ours(hf_dir), str(tmp_path))
  assert model.peft_config["default"].init_lora_weights == init
  # f32 throughout; torch's and XLA's SVD / QR differ by rounding only: measured 4.7e-7
  # (PiSSA) and 2.7e-7 (OLoRA) of the largest logit; ignoring the base change gave 0.069 / 0.13.
  assert rel_err(model(jnp.asarray(TOKENS)), want) < 1e-4
  # ftjax's own PiSSA / OLoRA init starts as the base model.
  fresh = peft.get_peft_model(ours(hf_dir), peft.LoraConfig(**config))
  assert rel_err(fresh(jnp.asarray(TOKENS)), ours(hf_dir)(jnp.asarray(TOKENS))) < 1e-5
  with pytest.raises(FtjaxError, match="init_lora_weights='pissa' with use_dora=True"):
    peft.LoraConfig(init_lora_weights="pissa", use_dora=True)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in VIRTUAL])
def test_merge_unload_disable_and_export(hf_dir, tmp_path, method):
  import transformers
  model = peft.get_peft_model(ours(hf_dir), METHODS[method][0]())
  perturb(model)
  tokens = jnp.asarray(TOKENS)
  adapted, base = np.asarray(model(tokens)), np.asarray(ours(hf_dir)(tokens))
  with peft.disable_adapters(model):
    np.testing.assert_array_equal(np.asarray(model(tokens)), base)
  np.testing.assert_array_equal(np.asarray(model(tokens)), adapted)  # enabled again
  # In place and back (on a copy: unmerging restores the base up to f32 rounding only): the
  # adapter folded into the weights while still attached, then taken out.
  twin = nnx.clone(model)
  kernel = lambda: np.array(twin.model.layers.self_attn.v_proj.base_linear().kernel[...])
  original = kernel()
  peft.merge_adapter(twin)
  assert all(layer.merged for _, layer in peft.adapter_layers(twin))
  assert rel_err(kernel(), original) > 1e-4 and rel_err(twin(tokens), adapted) < 1e-5
  peft.unmerge_adapter(twin)
  assert rel_err(kernel(), original) < 1e-6 and rel_err(twin(tokens), adapted) < 1e-5
  merged = peft.merge_and_unload(nnx.clone(model))
  assert not jax.tree.leaves(nnx.state(merged, peft.AdapterParam))
  assert not list(peft.adapter_layers(merged)) and isinstance(merged.model.layers.self_attn.v_proj, nnx.Linear)
  assert rel_err(merged(tokens), adapted) < 1e-5  # W + sAB vs factored: f32 rounding only
  models.save_pretrained(merged, str(tmp_path / "merged"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert rel_err(hf_logits(exported), adapted) < 1e-5
  unloaded = peft.unload(model)
  np.testing.assert_array_equal(np.asarray(unloaded(tokens)), base)


def test_load_adapter_bad_inputs_are_named(hf_dir, tmp_path):
  model = peft.get_peft_model(ours(hf_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
  peft.save_adapter(model, str(tmp_path / "a"))
  config_path = tmp_path / "a" / "adapter_config.json"
  weights = str(tmp_path / "a" / "adapter_model.safetensors")
  good = json.loads(config_path.read_text())
  tensors = load_file(weights)
  key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"

  with pytest.raises(FtjaxError, match="adapter_config.json: no such file"):
    peft.load_adapter(ours(hf_dir), str(tmp_path))
  for change, message in (({"peft_type": "LOHA"}, "peft_type='LOHA'; supported: 'LORA', 'IA3'"),
                          ({"fan_in_fan_out": True}, "fan_in_fan_out=True is not supported"),
                          # inits that rewrite the base in ways ftjax does not rebuild
                          ({"init_lora_weights": "pissa_niter_4"},
                           "init_lora_weights='pissa_niter_4' is not supported"),
                          ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq' is not supported")):
    config_path.write_text(json.dumps({**good, **change}))
    with pytest.raises(FtjaxError, match=message):
      peft.load_adapter(ours(hf_dir), str(tmp_path / "a"))
  config_path.write_text(json.dumps(good))

  for broken, message in (
      ({k: v for k, v in tensors.items() if k != key}, f"missing tensor '{key}'"),
      ({**tensors, key: np.zeros((3, 64), np.float32)}, r"q_proj.lora_A.weight' has shape \(3, 64\), expected \(2, 64\)"),
      ({**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((2, 64), np.float32)},
       "'base_model.model.lm_head.lora_A.weight' matches no adapted module")):
    save_file(broken, weights)
    base = ours(hf_dir)
    with pytest.raises(FtjaxError, match=message):
      peft.load_adapter(base, str(tmp_path / "a"))
    # A failed load leaves no half-attached adapter behind.
    assert not list(peft.adapter_layers(base)) and getattr(base, "peft_config", None) is None


def test_einsum_layers_take_lora():
  """nnx.Einsum kernels are viewed as [contracted dims, output dims]: identity at init, merge
  equals the factored form, and the saved tensors load back."""
  class Heads(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=rngs)

    def __call__(self, x):
      return self.proj(x)

  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  model = Heads(nnx.Rngs(0))
  base = np.asarray(model(x))
  model = peft.get_peft_model(model, peft.LoraConfig(r=3, target_modules=["proj"]))
  np.testing.assert_array_equal(np.asarray(model(x)), base)
  assert model.proj.lora_a.shape == (8, 3) and model.proj.lora_b.shape == (3, 2, 4)
  model.proj.lora_b.set_value(jax.random.normal(jax.random.key(1), (3, 2, 4)))
  adapted = np.asarray(model(x))
  assert rel_err(adapted, base) > 1e-2
  tensors = peft.adapter_state_dict(model)
  assert tensors["base_model.model.proj.lora_B.weight"].shape == (8, 3)  # [out (2*4), r]
  assert rel_err(peft.merge_and_unload(nnx.clone(model))(x), adapted) < 1e-5
  with pytest.raises(FtjaxError, match="contracted with the input or passed to the output"):
    peft.get_peft_model(PerHead(), peft.LoraConfig(target_modules=["proj"]))


class EinsumBlock(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.proj(x).reshape(x.shape))


class EinsumStack(nnx.Module):
  """Two einsum layers made by nnx.vmap and run by nnx.scan, as a user would stack them."""

  stacked_modules = ("layers",)

  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
      return EinsumBlock(rngs)
    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, layer):
      return layer(x)
    return run(x, self.layers)


def _random_b(model, seed):
  proj = model.layers.proj
  proj.lora_b.set_value(jax.random.normal(jax.random.key(seed), proj.lora_b.shape))


def test_stacked_einsum_lora_adapts_only_layers_to_transform():
  """layers_to_transform=[1] on a stacked einsum: layer 0's adapter neither changes the output
  nor gets a gradient nor counts, and the merged model is the trained one."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  model = peft.get_peft_model(EinsumStack(nnx.Rngs(0)), peft.LoraConfig(
      r=2, target_modules=["proj"], layers_to_transform=[1]))
  assert model.layers.proj.lora_a.shape == (2, 8, 2)
  _random_b(model, 1)
  adapted = np.asarray(model(x))
  with peft.disable_adapters(model):
    assert rel_err(model(x), adapted) > 1e-2  # layer 1's adapter acts
  b = model.layers.proj.lora_b
  b.set_value(b[...].at[0].set(jax.random.normal(jax.random.key(2), b.shape[1:])))
  np.testing.assert_array_equal(np.asarray(model(x)), adapted)  # layer 0's does not
  grads = nnx.grad(lambda m: m(x).sum(), argnums=nnx.DiffState(0, peft.AdapterParam))(model)
  for name in ("lora_a", "lora_b"):
    g = np.asarray(grads["layers"]["proj"][name][...])
    assert not g[0].any() and np.abs(g[1]).max() > 1e-3, name
  assert peft.count_params(model)[0] == 2 * (8 + 2 * 4)  # r x (in + out), one layer
  assert rel_err(peft.merge_and_unload(nnx.clone(model))(x), adapted) < 1e-5


def test_stacked_einsum_lora_dropout_per_layer_stream():
  """A user's stacked layers draw dropout from a stream of their own, one key per layer (the
  decoder's come through ops.project instead); model.eval() turns it off."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  model = peft.get_peft_model(EinsumStack(nnx.Rngs(0)), peft.LoraConfig(
      r=2, lora_dropout=0.5, target_modules=["proj"]))
  proj = model.layers.proj
  assert proj.dropout.rngs.key.shape == (2,)  # one key per layer

  @nnx.vmap(in_axes=(0, None))
  def dropped(layer, x):
    return layer.drop(x)
  masks = np.asarray(dropped(proj, jnp.ones((64, 8)))) != 0  # [layers, 64, 8]
  # 512 draws per layer: std sqrt(.25/512) = 0.022 of the kept fraction; 5 std = 0.11.
  assert all(abs(m.mean() - 0.5) < 0.11 for m in masks)
  assert abs((masks[0] == masks[1]).mean() - 0.5) < 0.11  # layers draw their own masks
  again = np.asarray(dropped(proj, jnp.ones((64, 8)))) != 0
  assert (again != masks).any()  # the stream advanced

  _random_b(model, 1)
  model.eval()
  no_dropout = np.asarray(model(x))
  model.train()
  for layer in (0, 1):  # with only this layer's adapter on, its dropout shows in the output
    b = proj.lora_b[...]
    proj.lora_b.set_value(b.at[1 - layer].set(0))
    model.eval()
    reference = np.asarray(model(x))
    model.train()
    assert rel_err(model(x), reference) > 1e-3, layer
    proj.lora_b.set_value(b)
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(x)), no_dropout)


class PerHead(nnx.Module):
  """An einsum with a kernel dim shared by input and output (per-head weights): not a matrix."""

  def __init__(self):
    self.proj = nnx.Einsum("bnd,ndh->bnh", (2, 8, 4), rngs=nnx.Rngs(0))


# --- (b) a user-written NNX model that is not a decoder -------------------------------------

class Classifier(nnx.Module):
  """A small MLP classifier with BatchNorm and Dropout, as a user would write it."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(16, 64, rngs=rngs)
    self.bn = nnx.BatchNorm(64, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.fc2 = nnx.Linear(64, 64, rngs=rngs)
    self.head = nnx.Linear(64, 4, rngs=rngs)

  def __call__(self, x):
    x = self.dropout(nnx.relu(self.bn(self.fc1(x))))
    return self.head(nnx.relu(self.fc2(x)))


def classification_loss(model, batch, rng):
  """A loss for ftjax.step: sums over the batch; the step divides by the count."""
  del rng  # the model's own nnx.Rngs drive its dropout
  logits = model(batch["x"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  return {"loss_sum": nll.sum(), "count": jnp.float32(batch["y"].size),
          "accuracy": jnp.sum(jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}


def test_user_model_fine_tunes_with_lora(tmp_path):
  """The recipe in docs/python_api.md: get_peft_model on the user's model, ftjax.step.fit, save / load."""
  rng = np.random.RandomState(0)
  x = rng.randn(256, 16).astype(np.float32)
  y = (x[:, :4].argmax(-1)).astype(np.int32)  # labels the random base does not know
  batches = [{"x": x, "y": y}] * 30

  model = Classifier(nnx.Rngs(0))
  model.eval()
  base_out = np.asarray(model(x))
  model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                              rngs=nnx.Rngs(1))
  assert lora_names(model) == {"fc1", "fc2", "head"}  # no output_module declared: all linear
  np.testing.assert_array_equal(np.asarray(model(x)), base_out)  # identical at init
  frozen = nnx.All(nnx.Param, nnx.Not(peft.AdapterParam))
  base_params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, frozen)))
  stats = np.array(model.bn.mean[...])

  model.train()
  history = step_lib.fit(model, batches, optimizer=optax.adamw(3e-2), trainable=peft.AdapterParam,
                         loss_fn=classification_loss)
  model.eval()
  losses = [h["loss"] for h in history]
  assert losses[-1] < 0.5 * losses[0], losses
  assert history[-1]["accuracy"] > 0.8
  after = nnx.to_pure_dict(nnx.state(model, frozen))
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(base_params),
                               jax.tree_util.tree_leaves_with_path(after)):
    np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(model.bn.mean[...], stats)  # BatchNorm statistics move in train mode

  want = np.asarray(model(x))
  peft.save_adapter(model, str(tmp_path / "adapter"))
  fresh = Classifier(nnx.Rngs(0))
  nnx.update(fresh, nnx.state(model, nnx.BatchStat))  # statistics are not part of the adapter
  fresh = peft.load_adapter(fresh, str(tmp_path / "adapter"))
  fresh.eval()
  np.testing.assert_array_equal(np.asarray(fresh(x)), want)
  merged = peft.merge_and_unload(model)
  assert rel_err(merged(x), want) < 1e-5


def test_readme_llm_recipe(tmp_path):
  """docs/python_api.md on a tiny model: load -> get_peft_model -> fit -> save_adapter,
  and the adapter and the merged model load in peft / transformers with the same logits."""
  import itertools
  import transformers
  from ftjax.data import build_dataset, quickstart_task
  from tiny import make_model_dir
  model_dir = make_model_dir(tmp_path / "model")
  quickstart_task.write_splits(str(tmp_path / "data"), n_train=32, n_eval=4, seed=0)

  model, tokenizer = models.load(model_dir)
  model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
  batches = build_dataset(str(tmp_path / "data" / "train.jsonl"), tokenizer, seq_len=128).batches(4)
  history = step_lib.fit(model, itertools.islice(batches, 12), optimizer=optax.adamw(1e-2),
                         trainable=peft.AdapterParam)
  # The quickstart JSON answers are mostly predictable: measured 6.3 -> 4.5 in 12 steps.
  assert history[-1]["loss"] < 0.8 * history[0]["loss"], [h["loss"] for h in history]
  peft.save_adapter(model, str(tmp_path / "adapter"))
  models.save_pretrained(peft.merge_and_unload(nnx.clone(model)), str(tmp_path / "merged"), tokenizer)

  tokens = np.random.RandomState(0).randint(0, 400, (2, 16))
  ours = np.asarray(model(jnp.asarray(tokens)))
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  assert rel_err(hf_logits(hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")), tokens),
                 ours) < 1e-4
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert rel_err(hf_logits(merged, tokens), ours) < 1e-4


def test_modules_to_save_train_whole_modules_and_move_both_ways(hf_dir, tmp_path):
  """LoRA on q_proj plus trainable copies of the LM head and every norm (PEFT's suffix rule:
  "norm" also selects input_layernorm): counts and selection as in PEFT, the originals stay,
  and the copies travel in the adapter file both ways."""
  import transformers
  from peft.utils import ModulesToSaveWrapper
  config = dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "norm"])
  model = peft.get_peft_model(ours(hf_dir), peft.LoraConfig(**config))
  reference = hf_peft.get_peft_model(hf_model(hf_dir), hf_peft.LoraConfig(**config))
  assert peft.count_params(model) == reference.get_nb_trainable_parameters()
  saved = {path for path, layer in peft.adapter_layers(model) if isinstance(layer, peft.ModulesToSave)}
  stacks = peft.core.stack_sizes(model)
  assert {t for p in saved for t in peft.core.torch_names(p, stacks)[0]} == {
      n.removeprefix("base_model.model.") for n, m in reference.named_modules()
      if isinstance(m, ModulesToSaveWrapper)}

  original_head = np.array(model.lm_head.base_layer.kernel[...])
  trainable = nnx.state(model, peft.AdapterParam)
  trainable["lm_head"]["trained"]["kernel"].set_value(trainable["lm_head"]["trained"]["kernel"][...] + 0.05)
  trainable["model"]["norm"]["trained"]["scale"].set_value(trainable["model"]["norm"]["trained"]["scale"][...] * 1.5)
  perturb(model)
  np.testing.assert_array_equal(model.lm_head.base_layer.kernel[...], original_head)
  adapted = np.asarray(model(jnp.asarray(TOKENS)))

  peft.save_adapter(model, str(tmp_path / "ours"))
  assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == [
      "lm_head", "norm"]
  loaded = hf_peft.PeftModel.from_pretrained(hf_model(hf_dir), str(tmp_path / "ours")).eval()
  assert rel_err(hf_logits(loaded), adapted) < 1e-4
  with peft.disable_adapters(model):
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS))),
                                  np.asarray(ours(hf_dir)(jnp.asarray(TOKENS))))
  merged = peft.merge_and_unload(nnx.clone(model))
  models.save_pretrained(merged, str(tmp_path / "merged"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert rel_err(hf_logits(exported), adapted) < 1e-5

  # PEFT-written, with its copies moved: ftjax reads the same model.
  with torch.no_grad():
    for name, param in reference.named_parameters():
      if param.requires_grad:
        param.add_(0.05 * torch.randn_like(param))
  reference.eval()
  reference.save_pretrained(str(tmp_path / "theirs"))
  again = peft.load_adapter(ours(hf_dir), str(tmp_path / "theirs"))
  assert rel_err(again(jnp.asarray(TOKENS)), hf_logits(reference)) < 1e-4


@pytest.mark.parametrize("configs", [[peft.PromptTuningConfig(num_virtual_tokens=3)],
                                     [peft.PrefixTuningConfig(num_virtual_tokens=3)],
                                     [peft.PromptTuningConfig(num_virtual_tokens=3),
                                      peft.PrefixTuningConfig(num_virtual_tokens=2)]],
                         ids=["prompt", "prefix", "prompt+prefix"])
def test_virtual_tokens_under_packing_padding_and_the_kv_cache(configs):
  """Every packed document sees the virtual tokens as if alone; padding changes nothing; cached
  greedy decoding equals recomputing the whole sequence (the cache is built apart from the
  forward pass, so this checks the two agree); they cannot be merged. With both slots on, the
  prefix comes first, then the prompt, and each changes the output."""
  from ftjax.generate import generate_ids
  from tiny import tiny_model
  config, n_virtual = configs[0], sum(c.num_virtual_tokens for c in configs)
  model = peft.get_peft_model(tiny_model(), config)
  # jitted per input shape: called op by op, the model compiled ~150 small programs here
  forward = nnx.jit(lambda m, tokens, **kw: m(tokens, **kw))
  for i, extra in enumerate(configs[1:]):
    peft.add_adapter(model, f"extra{i}", extra)
  if len(configs) > 1:  # both act: the output is neither one's alone
    tokens = jnp.asarray(TOKENS[:1] % 64)
    alone = [np.asarray(forward(model, tokens))]
    peft.set_adapter(model, "extra0")
    alone.append(np.asarray(forward(model, tokens)))
    peft.set_adapter(model, list(peft.named.configs(model)))
    assert min(rel_err(forward(model, tokens), out) for out in alone) > 1e-3
  rng = np.random.RandomState(0)
  a, b = rng.randint(0, 64, 5), rng.randint(0, 64, 7)
  packed = np.concatenate([a, b])[None]
  segments = np.array([[1] * 5 + [2] * 7])
  positions = np.array([list(range(5)) + list(range(7))])
  out = np.asarray(forward(model, jnp.asarray(packed), positions=jnp.asarray(positions),
                          segment_ids=jnp.asarray(segments)))
  # Same f32 ops over other lengths: 1e-5 leaves room for summation order only.
  a_alone = forward(model, jnp.asarray(a[None]))[0]
  assert rel_err(out[0, :5], a_alone) < 1e-5
  assert rel_err(out[0, 5:], forward(model, jnp.asarray(b[None]))[0]) < 1e-5
  padded = np.concatenate([a, np.zeros(4, int)])[None]
  pad_out = forward(model, jnp.asarray(padded), segment_ids=jnp.asarray([[1] * 5 + [0] * 4]))
  assert rel_err(pad_out[0, :5], a_alone) < 1e-5

  prompts = [list(a), list(b)]
  got = generate_ids(model, prompts, max_new_tokens=5, eos_ids=())
  for prompt, tokens in zip(prompts, got):
    # Greedy decoding without a cache in one pass: causal, so row i of the whole sequence's
    # logits is the last row of the pass over its first i + 1 tokens.
    logits = forward(model, jnp.asarray([list(prompt) + tokens]))[0, len(prompt) - 1:-1]
    assert tokens == [int(t) for t in jnp.argmax(logits, -1)]

  with pytest.raises(FtjaxError, match="cannot be folded into the base weights"):
    peft.merge_and_unload(model)
  assert model.peft_config["default"] is config and model.num_virtual_tokens == n_virtual  # unchanged
  with peft.disable_adapters(model):
    assert model.num_virtual_tokens == 0
  assert peft.unload(model).num_virtual_tokens == 0


@pytest.mark.parametrize("architecture,targets", [("houlsby", {"o_proj", "down_proj"}),
                                                  ("pfeiffer", {"down_proj"})])
def test_bottleneck_adapters(hf_dir, tmp_path, architecture, targets):
  """Houlsby (after attention and MLP) / Pfeiffer (after the MLP): the base at init, training
  lowers the loss with the base untouched, ftjax's own file format round-trips, no merge."""
  model = peft.get_peft_model(ours(hf_dir), peft.BottleneckAdapterConfig(
      reduction_factor=4, architecture=architecture))
  assert {p.rsplit("/", 1)[-1] for p, _ in peft.adapter_layers(model)} == targets
  tokens = jnp.asarray(TOKENS)
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(ours(hf_dir)(tokens)))
  layer = model.model.layers.mlp.down_proj
  assert layer.adapter_down.shape == (2, 64, 16) and layer.adapter_up.shape == (2, 16, 64)

  frozen = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(peft.AdapterParam)))))
  batches = [counting_batch(4, 16, vocab=128)] * 10
  history = step_lib.fit(model, batches, optimizer=optax.adam(1e-2), trainable=peft.AdapterParam)
  losses = [h["loss"] for h in history]
  # Measured 4.85 -> 4.72 on the near-uniform random base: falling every step, 2% at least.
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.98 * losses[0], losses
  after = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(peft.AdapterParam))))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, np.asarray(b))

  peft.save_adapter(model, str(tmp_path))
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["peft_type"] == "BOTTLENECK_ADAPTER" and config["architecture"] == architecture
  keys = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert keys["base_model.model.model.layers.1.mlp.down_proj.adapter_down.weight"].shape == (16, 64)
  again = peft.load_adapter(ours(hf_dir), str(tmp_path))
  np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(model(tokens)))
  with pytest.raises(FtjaxError, match="BottleneckLinear at model.layers.self_attn.o_proj|BottleneckLinear at model.layers.mlp.down_proj"):
    peft.merge_and_unload(model)


def test_named_adapters_switch_combine_train_save_and_delete(hf_dir, tmp_path):
  """Several adapters on one base: added inactive, switched without reloading, combined (two
  LoRAs; LoRA + prompt tuning), trained one at a time, saved one at a time, deleted."""
  tokens = jnp.asarray(TOKENS)
  logits = lambda m: np.asarray(m(tokens))
  model = peft.get_peft_model(ours(hf_dir), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                              adapter_name="a")
  perturb(model, "a", seed=0)
  only_a = logits(model)
  peft.add_adapter(model, "b", peft.LoraConfig(r=2, target_modules="all-linear"), rngs=1)
  perturb(model, "b", seed=100)
  np.testing.assert_array_equal(logits(model), only_a)  # added inactive
  assert peft.active_adapters(model) == ("a",)

  peft.save_adapter(model, str(tmp_path / "a"))  # the only active one
  peft.save_adapter(model, str(tmp_path / "b"), adapter_name="b")
  peft.set_adapter(model, "b")
  only_b = logits(model)
  b_alone = peft.load_adapter(ours(hf_dir), str(tmp_path / "b"))
  np.testing.assert_array_equal(logits(b_alone), only_b)
  peft_b = hf_peft.PeftModel.from_pretrained(hf_model(hf_dir), str(tmp_path / "b")).eval()
  assert rel_err(hf_logits(peft_b), only_b) < 1e-4

  # Two LoRAs together: as the second on top of the first merged in (f32 rounding apart).
  peft.set_adapter(model, ["a", "b"])
  a_merged = peft.merge_and_unload(peft.load_adapter(ours(hf_dir), str(tmp_path / "a")))
  assert rel_err(logits(model), logits(peft.load_adapter(a_merged, str(tmp_path / "b")))) < 1e-5

  # LoRA + prompt tuning, stated by activating both.
  peft.add_adapter(model, "p", peft.PromptTuningConfig(num_virtual_tokens=3), rngs=2)
  peft.save_adapter(model, str(tmp_path / "p"), adapter_name="p")
  peft.set_adapter(model, ["a", "p"])
  a_merged = peft.merge_and_unload(peft.load_adapter(ours(hf_dir), str(tmp_path / "a")))
  assert rel_err(logits(model), logits(peft.load_adapter(a_merged, str(tmp_path / "p")))) < 1e-5

  # Training one adapter moves only it, even under weight decay.
  peft.set_adapter(model, "b")
  frozen_a = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, lambda p, v: isinstance(
      v, peft.AdapterParam) and v.get_metadata().get("adapter_name") != "b")))
  step_lib.fit(model, [counting_batch(4, 16, vocab=128)] * 3,
               optimizer=optax.adamw(1e-2, weight_decay=0.1), trainable=peft.trainable(model))
  after_a = nnx.to_pure_dict(nnx.state(model, lambda p, v: isinstance(
      v, peft.AdapterParam) and v.get_metadata().get("adapter_name") != "b"))
  for x, y in zip(jax.tree.leaves(frozen_a), jax.tree.leaves(after_a)):
    np.testing.assert_array_equal(x, np.asarray(y))
  assert rel_err(logits(model), only_b) > 1e-4  # b did train

  with pytest.raises(FtjaxError, match="prompt slot already holds adapter 'p'"):
    peft.add_adapter(model, "p2", peft.PromptTuningConfig(num_virtual_tokens=2))
  with pytest.raises(FtjaxError, match="no adapter named 'c'"):
    peft.set_adapter(model, "c")
  trained_b = logits(model)
  peft.delete_adapter(model, "a")
  assert sorted(peft.configs(model)) == ["b", "p"] and peft.active_adapters(model) == ("b",)
  np.testing.assert_array_equal(logits(model), trained_b)
  merged = peft.merge_and_unload(model)  # merges b, drops the inactive prompt
  assert not list(peft.adapter_layers(merged)) and merged.num_virtual_tokens == 0
  assert rel_err(logits(merged), trained_b) < 1e-5


def test_prompt_tuning_init_from_text(tmp_path):
  """prompt_tuning_init="TEXT": the embeddings of the text's tokens, repeated to the length
  (HF PEFT's rule), from the tokenizer of a model reference ftjax can load."""
  from tiny import make_model_dir
  model_dir = make_model_dir(tmp_path / "model")
  model, tokenizer = models.load(model_dir)
  ids = list(tokenizer.encode("total amount"))
  n = 2 * len(ids) + 1
  model = peft.get_peft_model(model, peft.PromptTuningConfig(
      num_virtual_tokens=n, prompt_tuning_init="TEXT", prompt_tuning_init_text="total amount",
      tokenizer_name_or_path=model_dir))
  want = np.asarray(model.model.embed_tokens.embedding[...])[(ids * 3)[:n]]
  np.testing.assert_array_equal(np.asarray(model.model.prompt.prompt_embeddings[...]), want)
  with pytest.raises(FtjaxError, match="needs prompt_tuning_init_text and tokenizer_name_or_path"):
    peft.PromptTuningConfig(prompt_tuning_init="TEXT")
