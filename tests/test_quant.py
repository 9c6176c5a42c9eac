"""ftjax.quant against bitsandbytes (its CPU path), byte for byte where the format allows."""

import json

import numpy as np
import pytest
import torch

from ftjax import quant
from ftjax.errors import FtjaxError

bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (the test extra) absent")

# Shapes of real projections, odd sizes, and sizes that are not a multiple of the block.
SHAPES = [(64, 64), (576, 192), (1536, 576), (130, 70), (1000,), (7, 9)]


def _bnb(x, block_size, quant_type, double_quant):
  return bnb.quantize_4bit(torch.tensor(x), blocksize=block_size, quant_type=quant_type,
                           compress_statistics=double_quant)


def test_code_books_are_bitsandbytes():
  assert quant.NF4_CODE.tolist() == [
      -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
      0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
      0.7229568362236023, 1.0]  # the 16 published values
  np.testing.assert_array_equal(quant.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())
  np.testing.assert_array_equal(quant.FP4_CODE, bnb.get_4bit_type("fp4", device="cpu").numpy())
  np.testing.assert_array_equal(quant.DYNAMIC_CODE, bnb.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_4bit_bytes_equal_bitsandbytes(quant_type, block_size):
  rng = np.random.RandomState(0)
  for shape in SHAPES:
    x = rng.randn(*shape).astype(np.float32)
    packed, state = _bnb(x, block_size, quant_type, False)
    ours = quant.quantize_4bit(x, block_size, quant_type, double_quant=False)
    np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1), err_msg=str(shape))
    np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy(), err_msg=str(shape))
    # The format's definition: code[index] * absmax of the block. (bitsandbytes' own CPU
    # dequantize_4bit agrees at block size 64 and is wrong at 128 in 0.50.2: errors of ~1.2
    # where the format allows ~0.5.)
    index = np.stack([packed.numpy().reshape(-1) >> 4, packed.numpy().reshape(-1) & 15], -1).reshape(-1)
    n = x.size
    want = (bnb.get_4bit_type(quant_type, device="cpu").numpy()[index[:n]]
            * np.repeat(state.absmax.numpy(), block_size)[:n]).reshape(shape)
    np.testing.assert_array_equal(np.asarray(quant.dequantize_4bit(ours)), want, err_msg=str(shape))
    if block_size == 64:
      np.testing.assert_array_equal(np.asarray(quant.dequantize_4bit(ours)),
                                    bnb.dequantize_4bit(packed, state).numpy().reshape(shape))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantisation_matches_bitsandbytes(quant_type):
  """Every byte is bitsandbytes' where the absmax mean (`offset`) is: torch's float32 sum runs
  in an order of its own (CPU vector width, threads), so it can be 1 ulp apart; then only the
  8-bit codes of values that ulp moves across a table point differ."""
  rng = np.random.RandomState(1)
  same_offset = 0
  for shape in SHAPES + [(4096, 576), (2048, 1536)]:
    x = rng.randn(*shape).astype(np.float32)
    packed, state = _bnb(x, 64, quant_type, True)
    ours = quant.quantize_4bit(x, 64, quant_type, double_quant=True)
    np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1))
    offset, theirs = np.float32(ours.offset), np.float32(state.offset)
    assert abs(offset - theirs) <= np.spacing(theirs), shape
    codes, their_codes = np.asarray(ours.absmax), state.absmax.numpy()
    restored = np.asarray(quant.dequantize_4bit(ours))
    if offset == theirs:
      same_offset += 1
      np.testing.assert_array_equal(codes, their_codes, err_msg=str(shape))
      np.testing.assert_array_equal(np.asarray(ours.absmax_scale), state.state2.absmax.numpy())
      np.testing.assert_array_equal(restored, bnb.dequantize_4bit(packed, state).numpy().reshape(shape))
    else:
      assert (codes != their_codes).mean() < 1e-3, shape
      np.testing.assert_allclose(restored, bnb.dequantize_4bit(packed, state).numpy().reshape(shape),
                                 rtol=0, atol=0.02 * np.abs(x).max())  # a step of the 8-bit code
  assert same_offset >= len(SHAPES) // 2  # the byte-for-byte case is the common one


def test_double_quantisation_costs_what_the_paper_says():
  x = np.random.RandomState(2).randn(576, 1536).astype(np.float32)
  plain = quant.nf4_quantize(x, double_quant=False).bits_per_param()
  double = quant.nf4_quantize(x).bits_per_param()
  # 4 bits + one f32 per 64 (0.5) vs 4 bits + one byte per 64 + f32 per 64 * 256 (~0.127)
  assert plain == pytest.approx(4.5) and double == pytest.approx(4.127, abs=2e-3)
  restored = np.asarray(quant.nf4_dequantize(quant.nf4_quantize(x)))
  assert np.abs(restored - x).max() < 0.2 * np.abs(x).max()  # NF4's coarsest step, about


def test_bad_block_size_is_refused():
  with pytest.raises(FtjaxError, match="block_size=48"):
    quant.nf4_quantize(np.ones((4, 4), np.float32), block_size=48)


# --- QLoRA: a 4-bit base under LoRA -------------------------------------------------------------


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import hf_models  # noqa: E402
from ftjax import models, peft  # noqa: E402
from ftjax import step as step_lib  # noqa: E402
from tiny import counting_batch, tiny_tokenizer  # noqa: E402

TOKENS = np.random.RandomState(0).randint(0, 128, (2, 16))


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", list(hf_models.FAMILIES))
def test_qlora_at_init_is_the_dequantised_float_model(family, tmp_path):
  """Exactly the float model built from the dequantised base; the distance to the original
  float model is NF4's rounding (measured per family, printed; bounded loosely here)."""
  hf_models.build(family).save_pretrained(str(tmp_path))
  original = hf_models.ftjax_model(str(tmp_path))
  quantized = quant.quantize_model(hf_models.ftjax_model(str(tmp_path)))
  qlora = peft.get_peft_model(quantized, peft.LoraConfig(r=4, target_modules="all-linear"))
  tokens = jnp.asarray(TOKENS)
  got = np.asarray(qlora(tokens))
  dequantised = quant.dequantize_model(peft.unload(nnx.clone(qlora)))
  np.testing.assert_array_equal(np.asarray(dequantised(tokens)), got)
  distance = rel_err(got, original(tokens))
  print(f"{family}: NF4 base vs float, max logit error / max logit = {distance:.3f}")
  # gemma2 / gemma3 normalise each block's output (post-attention / post-feed-forward norms) up to
  # the residual's scale, so NF4's per-weight rounding shows in full in the logits: measured
  # 0.34 (gemma2) and 0.30 (gemma3) against 0.009 for gemma 1, whose tiny block outputs barely
  # move its residual stream.
  assert 1e-4 < distance < (0.5 if family in ("gemma2", "gemma3") else 0.3)
  assert peft.count_params(qlora) == peft.count_params(peft.get_peft_model(
      original, peft.LoraConfig(r=4, target_modules="all-linear")))  # 4-bit codes count as params


def test_qlora_trains_keeps_the_4bit_base_and_exports(hf_llama_dir, tmp_path):
  import peft as hf_peft
  import transformers
  model = quant.quantize_model(hf_models.ftjax_model(hf_llama_dir))
  assert quant.base_bits_per_param(model) < 4.2
  model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
  frozen = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Any(quant.QuantCodes, quant.QuantStat))))
  history = step_lib.fit(model, [counting_batch(4, 16, vocab=128)] * 10, optimizer=optax.adam(1e-2),
                         trainable=peft.trainable(model))
  losses = [h["loss"] for h in history]
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
  after = nnx.to_pure_dict(nnx.state(model, nnx.Any(quant.QuantCodes, quant.QuantStat)))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, np.asarray(b))  # the 4-bit base never moves

  # Merged export: dequantise, merge in f32, save; transformers reproduces it.
  tokens = jnp.asarray(TOKENS)
  merged = peft.merge_and_unload(quant.dequantize_model(nnx.clone(model)))
  models.save_pretrained(merged, str(tmp_path / "merged"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  with torch.no_grad():
    assert rel_err(hf(torch.tensor(TOKENS)).logits.numpy(), merged(tokens)) < 1e-4
  assert rel_err(merged(tokens), model(tokens)) < 1e-5  # merging changed nothing but rounding
  with pytest.raises(FtjaxError, match="dequantise the model first"):
    peft.merge_and_unload(nnx.clone(model))

  # The adapter alone, for the float base: peft loads it there.
  peft.save_adapter(model, str(tmp_path / "adapter"))
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_llama_dir, dtype=torch.float32)
  loaded = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  on_float = peft.load_adapter(hf_models.ftjax_model(hf_llama_dir), str(tmp_path / "adapter"))
  with torch.no_grad():
    assert rel_err(loaded(torch.tensor(TOKENS)).logits.numpy(), on_float(tokens)) < 1e-4


# --- 4-bit checkpoints: what transformers + bitsandbytes save, both ways ----------------------


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
  """A tiny HF Llama whose linear inputs are whole 64-blocks: bitsandbytes' CPU forward (which
  repacks the codes per row) fails on an input width that is not (here 96), ftjax's does not."""
  import transformers
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**{**hf_models.COMMON, "intermediate_size": 128},
                                    tie_word_embeddings=False)
  path = str(tmp_path_factory.mktemp("hf_llama_64"))
  transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
  return path


def _bnb_checkpoint(float_dir: str, out_dir: str, quant_type: str, double_quant: bool):
  """transformers' own load_in_4bit model of a float checkpoint, saved (bitsandbytes' bytes)."""
  import transformers
  settings = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
      bnb_4bit_compute_dtype=torch.float32)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      float_dir, quantization_config=settings, device_map="cpu").eval()
  model.save_pretrained(out_dir)
  tiny_tokenizer().save(out_dir)  # models.load wants a tokenizer beside the weights
  return model


def _tensors(model_dir: str) -> dict:
  from safetensors.numpy import load_file
  return load_file(f"{model_dir}/model.safetensors")


def _dequantised_by_bnb(float_dir: str, hf_4bit):
  """The float transformers model holding bitsandbytes' own dequantisation of a 4-bit model's
  weights: the reference for ftjax's 4-bit forward. (bitsandbytes' CPU forward itself repacks
  the absmax to bfloat16, 0.4% off in logits, so it is not the reference; call this before it.)"""
  import bitsandbytes.functional as bnb_f
  import transformers
  ref = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, module in hf_4bit.named_modules():
      if type(module).__name__ == "Linear4bit":
        weight = bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state)
        ref.get_submodule(name).weight.copy_(weight.float())
  return ref


def _logits(hf_model):
  with torch.no_grad():
    return hf_model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_checkpoint_loads_as_stored_and_saves_back(float_dir, tmp_path, quant_type,
                                                                double_quant):
  import transformers
  bnb_dir, ours_dir = str(tmp_path / "bnb"), str(tmp_path / "ours")
  hf_4bit = _bnb_checkpoint(float_dir, bnb_dir, quant_type, double_quant)
  expected = _logits(_dequantised_by_bnb(float_dir, hf_4bit))
  model, _ = models.load(bnb_dir)  # stays 4-bit: the checkpoint's bytes, unchanged
  assert isinstance(model.model.layers.mlp.down_proj, quant.QuantLinear)
  tokens = jnp.asarray(TOKENS)
  # Both dequantise the same bytes to the same f32 weights; only the matmul order differs.
  assert rel_err(model(tokens), expected) < 1e-5

  # Saved by ftjax: every tensor transformers wrote, byte for byte; transformers runs it as its own.
  models.save_pretrained(model, ours_dir)
  theirs, ours = _tensors(bnb_dir), _tensors(ours_dir)
  assert sorted(ours) == sorted(theirs)
  for key in theirs:
    if "quant_state" in key:  # JSON: the same fields and values
      assert json.loads(bytes(ours[key])) == json.loads(bytes(theirs[key])), key
    else:
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours_dir, device_map="cpu").eval()
  np.testing.assert_array_equal(_logits(reloaded), _logits(hf_4bit))

  # As float (quantize=False): the dequantised weights, the same function up to f32 rounding
  # (dequantised eagerly here, fused inside the forward there).
  float_model, _ = models.load(bnb_dir, quantize=False)
  assert isinstance(float_model.model.layers.mlp.down_proj, nnx.Linear)
  assert rel_err(float_model(tokens), model(tokens)) < 1e-6


def test_ftjax_4bit_model_loads_in_transformers(float_dir, tmp_path):
  """quantize_model's save is a load_in_4bit checkpoint transformers runs as its own: bitsandbytes
  dequantises ftjax's bytes to ftjax's weights."""
  import transformers
  model = quant.quantize_model(hf_models.ftjax_model(float_dir))
  models.save_pretrained(model, str(tmp_path / "q"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), device_map="cpu").eval()
  assert type(hf.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
  ours = np.asarray(model(jnp.asarray(TOKENS)))
  assert rel_err(_logits(_dequantised_by_bnb(float_dir, hf)), ours) < 1e-5
  # bitsandbytes' own CPU forward, with its bfloat16 absmax (see _dequantised_by_bnb): 1% bound.
  assert rel_err(_logits(hf), ours) < 1e-2


def test_4bit_checkpoint_of_another_shape_names_the_tensor(float_dir, tmp_path):
  bnb_dir = str(tmp_path / "bnb")
  _bnb_checkpoint(float_dir, bnb_dir, "nf4", True)
  with open(f"{bnb_dir}/config.json") as f:
    config = json.load(f)
  config["intermediate_size"] = 192  # the config of another model beside these tensors
  with open(f"{bnb_dir}/config.json", "w") as f:
    json.dump(config, f)
  for quantize in (None, False):  # into a 4-bit model, and dequantised into a float one
    with pytest.raises(FtjaxError, match=r"4-bit tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                         r"has shape \[(128, 64|64, 128)\], expected"):
      models.load(bnb_dir, quantize=quantize)


# --- int8 per channel (qwix) ---------------------------------------------------------------------


def test_int8_per_channel_round_trip():
  x = np.random.RandomState(0).randn(3, 96, 40).astype(np.float32)  # a stack of [in, out] kernels
  q = quant.int8_quantize(x)
  assert q.qvalue.dtype == jnp.int8 and q.scale.shape == (3, 1, 40)  # per layer and column
  np.testing.assert_allclose(q.scale, np.abs(x).max(axis=1, keepdims=True) / 127.5, rtol=1e-6)
  error = np.abs(np.asarray(quant.int8_dequantize(q)) - x)
  # Round to nearest, never clipped: half a step at most (plus f32 rounding of x / scale * scale).
  assert np.all(error <= np.asarray(q.scale) * (0.5 + 1e-4))


def test_int8_base_under_lora_is_the_dequantised_float_model(hf_llama_dir):
  original = hf_models.ftjax_model(hf_llama_dir)
  model = quant.quantize_model(hf_models.ftjax_model(hf_llama_dir), quant_type="int8")
  assert 8 < quant.base_bits_per_param(model) < 8.5  # codes + one f32 scale per column
  model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
  tokens = jnp.asarray(TOKENS)
  got = np.asarray(model(tokens))
  dequantised = quant.dequantize_model(peft.unload(nnx.clone(model)))
  np.testing.assert_array_equal(np.asarray(dequantised(tokens)), got)
  nf4 = quant.quantize_model(hf_models.ftjax_model(hf_llama_dir))
  int8_error, nf4_error = rel_err(got, original(tokens)), rel_err(nf4(tokens), original(tokens))
  print(f"int8 base vs float: {int8_error:.4f}; NF4: {nf4_error:.4f}")
  assert int8_error < nf4_error / 4  # 16x finer steps; at least 4x smaller logit error
  assert peft.count_params(model)[1] == peft.count_params(peft.get_peft_model(
      original, peft.LoraConfig(r=4, target_modules="all-linear")))[1]
  history = step_lib.fit(model, [counting_batch(4, 16, vocab=128)] * 5, optimizer=optax.adam(1e-2),
                         trainable=peft.trainable(model))
  assert history[-1]["loss"] < history[0]["loss"]
  with pytest.raises(FtjaxError, match="int8 kernels have no HF checkpoint format"):
    models.save_pretrained(peft.unload(model), "/nonexistent/never-written")


def test_width_not_a_multiple_of_the_block_is_kept_flat_and_recorded(hf_llama_dir, caplog):
  """down_proj's input (intermediate_size 96) is not a multiple of 64: bitsandbytes' blocks then
  run across rows, so the codes cannot keep a [out, in / 2] shape; ftjax stores them flat per
  layer (still bitsandbytes' bytes), says so, and the layer computes the same function."""
  import logging
  with caplog.at_level(logging.INFO, logger="ftjax.quant.linear"):
    model = quant.quantize_model(hf_models.ftjax_model(hf_llama_dir))
  assert "not a multiple of block_size=64" in caplog.text and "down_proj (in=96)" in caplog.text
  down, up = model.model.layers.mlp.down_proj, model.model.layers.mlp.up_proj
  assert not down.rows and down.codes.ndim == 2 and up.rows and up.codes.ndim == 3  # [layers, ...]
  weight = np.random.RandomState(0).randn(64, 96).astype(np.float32)  # one [out, in] layer
  q = quant.quantize_4bit(weight, 64, "nf4", True)
  packed, _ = _bnb(weight, 64, "nf4", True)
  np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))


def test_qlora_on_a_user_flax_model():
  """quantize_model and LoRA on any NNX model, not only ftjax's decoders."""

  class Regressor(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(128, 256, rngs=rngs)
      self.out = nnx.Linear(256, 8, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.gelu(self.hidden(x)))

  x = jax.random.normal(jax.random.key(1), (32, 128))
  y = jax.random.normal(jax.random.key(2), (32, 8))
  model = quant.quantize_model(Regressor(nnx.Rngs(0)), skip=())
  assert isinstance(model.hidden, quant.QuantLinear) and isinstance(model.out, quant.QuantLinear)
  model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["hidden", "out"]))
  np.testing.assert_array_equal(np.asarray(model(x)),
                                np.asarray(quant.dequantize_model(peft.unload(nnx.clone(model)))(x)))
  codes = np.asarray(model.hidden.base_layer.codes[...])
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=peft.AdapterParam)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                     argnums=nnx.DiffState(0, peft.AdapterParam))(model)
    optimizer.update(model, grads)
    return loss
  losses = [float(step(model, optimizer)) for _ in range(10)]
  assert losses[-1] < 0.9 * losses[0], losses
  np.testing.assert_array_equal(np.asarray(model.hidden.base_layer.codes[...]), codes)
