"""ftjax's decoder vs transformers on tiny random-init models of every supported family."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_models
from ftjax import models
from ftjax.errors import FtjaxError
from ftjax.models import init_cache
from ftjax.models.config import ModelConfig, load_hf_config
from ftjax.models.hf import load_hf_params, save_hf_config, save_hf_params

FAMILIES = list(hf_models.FAMILIES)


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
  model = hf_models.build(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  cfg = load_hf_config(path)
  return request.param, model, path, cfg, models.from_params(cfg, load_hf_params(path, cfg))


def test_logits_match_transformers(family):
  _, model, _, cfg, ours_model = family
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  ours = ours_model(jnp.asarray(tokens))
  # f32 on both sides; 1e-4 relative leaves room for summation-order differences only.
  assert rel_err(ours, ref) < 1e-4


def test_logits_match_with_padding_mask(family):
  """Right-padded rows: valid positions must match HF given the same attention mask."""
  _, model, _, cfg, ours_model = family
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 16))
  mask = np.ones_like(tokens)
  mask[1, 10:] = 0
  mask[2, 5:] = 0
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(ours_model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask)))
  valid = mask.astype(bool)
  assert rel_err(ours[valid], ref[valid]) < 1e-4
  # Padding must not change the valid rows: same logits as the unpadded prefix alone.
  alone = np.asarray(ours_model(jnp.asarray(tokens[2:3, :5])))
  assert rel_err(ours[2, :5], alone[0]) < 1e-5


def test_export_roundtrip_through_transformers(family, tmp_path):
  name, _, _, cfg, ours_model = family
  models.save_pretrained(ours_model, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 20))
  with torch.no_grad():
    ref = reloaded(torch.tensor(tokens)).logits.numpy()
  ours = ours_model(jnp.asarray(tokens))
  assert rel_err(ours, ref) < 1e-5, name


def test_sharded_export_loads_back(tmp_path):
  model = hf_models.build("llama")
  model.save_pretrained(str(tmp_path / "src"))
  cfg = load_hf_config(str(tmp_path / "src"))
  params = load_hf_params(str(tmp_path / "src"), cfg)
  files = save_hf_params(params, cfg, str(tmp_path / "out"), max_shard_bytes=64 * 1024)
  save_hf_config(cfg, str(tmp_path / "out"))
  assert len(files) > 1 and os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  again = load_hf_params(str(tmp_path / "out"), cfg)
  np.testing.assert_array_equal(again["model"]["layers"]["mlp"]["up_proj"]["kernel"],
                                params["model"]["layers"]["mlp"]["up_proj"]["kernel"])
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  tokens = np.arange(12)[None] % cfg.vocab_size
  with torch.no_grad():
    ref = reloaded(torch.tensor(tokens)).logits.numpy()
  assert rel_err(models.from_params(cfg, params)(jnp.asarray(tokens)), ref) < 1e-5


def test_kv_cache_matches_full_forward(family):
  _, _, _, cfg, model = family
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 12)))
  full = model(tokens)
  cache = init_cache(cfg, batch=2, max_len=16)
  first, cache = model(tokens[:, :8], cache=cache, cache_index=0)
  rest = []
  for i in range(8, 12):
    step, cache = model(tokens[:, i:i + 1], cache=cache, cache_index=i)
    rest.append(step)
  stitched = jnp.concatenate([first] + rest, axis=1)
  assert rel_err(stitched, full) < 1e-5


# --- the NNX shape ---------------------------------------------------------------------

def test_every_param_names_its_logical_axes():
  """Sharding reads these names from the variables' metadata: one per dim, layers first."""
  from tiny import TINY, tiny_model
  state = nnx.state(tiny_model(), nnx.Param)
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var.ndim, path
    assert (names[0] == "layers") == (path[:2] == ("model", "layers")), path
  q = state["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (TINY.num_layers, TINY.hidden_size, TINY.q_size)
  assert q.get_metadata()["out_sharding"] == ("layers", "embed", "q_heads")


def test_layers_run_as_one_scan():
  """One compiled layer body: the forward pass has a single scan over the stacked layers."""
  from tiny import TINY, tiny_model
  graphdef, state = nnx.split(tiny_model())
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 4), jnp.int32)))(state)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == TINY.num_layers


def test_save_pretrained_refuses_a_model_with_adapters(tmp_path):
  from ftjax import peft
  from tiny import tiny_model
  model = peft.get_peft_model(tiny_model(), peft.LoraConfig(target_modules="all-linear"))
  with pytest.raises(FtjaxError, match="adapters are attached.*merge_and_unload"):
    models.save_pretrained(model, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# --- bad input ---------------------------------------------------------------------------

def test_unsupported_architecture_names_it(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 8}))
  with pytest.raises(FtjaxError, match="gpt_neox.*supported: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text"):
    load_hf_config(str(tmp_path))


def test_missing_config_names_path(tmp_path):
  with pytest.raises(FtjaxError, match="config.json: no such file"):
    load_hf_config(str(tmp_path))


def test_dir_without_weights(tmp_path):
  cfg = ModelConfig.from_hf_dict(hf_models.FAMILIES["llama"]().to_dict())
  with pytest.raises(FtjaxError, match="no model.safetensors"):
    load_hf_params(str(tmp_path), cfg)


def test_missing_and_misshaped_tensor_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  model = hf_models.build("llama")
  model.save_pretrained(str(tmp_path))
  cfg = load_hf_config(str(tmp_path))
  path = str(tmp_path / "model.safetensors")
  tensors = load_file(path)
  name = "model.layers.1.mlp.up_proj.weight"
  bad = dict(tensors, **{name: np.zeros((3, 5), np.float32)})
  save_file(bad, path, metadata={"format": "pt"})
  with pytest.raises(FtjaxError, match=r"up_proj.weight' has shape \(3, 5\), expected \(96, 64\)"):
    load_hf_params(str(tmp_path), cfg)
  del bad[name]
  save_file(bad, path, metadata={"format": "pt"})
  with pytest.raises(FtjaxError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    load_hf_params(str(tmp_path), cfg)


def test_checkpoint_tensors_the_config_does_not_read_are_an_error(hf_llama_dir, tmp_path, caplog):
  import shutil
  from safetensors.numpy import load_file, save_file
  shutil.copytree(hf_llama_dir, tmp_path, dirs_exist_ok=True)  # the session's 2-layer untied Llama
  cfg = load_hf_config(str(tmp_path))
  # One layer of a two-layer checkpoint used to load (and generate) without a word.
  with pytest.raises(FtjaxError, match=r"9 tensor\(s\) in the checkpoint are not used by its config: "
                     r"model\.layers\.1\..*layers up to 1 but the config has num_hidden_layers=1"):
    load_hf_params(str(tmp_path), cfg.replace(num_layers=1))
  # An untied config on a tied-head checkpoint is already "missing lm_head"; a tied config on an
  # untied checkpoint leaves the head unread, which transformers skips too (it re-ties): a warning.
  with caplog.at_level("WARNING", logger="ftjax.models.hf"):
    load_hf_params(str(tmp_path), cfg.replace(tie_word_embeddings=True))
  assert "ignoring 1 tensor(s) transformers also ignores: lm_head.weight" in caplog.text
  # A rotary inv_freq cache (older Llama checkpoints) is skipped as transformers skips it.
  path = str(tmp_path / "model.safetensors")
  tensors = load_file(path)
  inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32) for i in (0, 1)}
  save_file(dict(tensors, **inv_freq), path, metadata={"format": "pt"})
  params = load_hf_params(str(tmp_path), cfg)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], tensors["lm_head.weight"].T)
  # Anything else left over names itself.
  save_file(dict(tensors, **{"model.extra_proj.weight": np.ones((2, 2), np.float32)}), path,
            metadata={"format": "pt"})
  with pytest.raises(FtjaxError, match=r"1 tensor\(s\) .*: model\.extra_proj\.weight; is config\.json"):
    load_hf_params(str(tmp_path), cfg)


def test_gguf_with_more_blocks_than_its_block_count_names_the_extra_tensor(tmp_path):
  # The GGUF path reads its config from the same file and already refused tensors it does not
  # map (gguf.py, load_gguf); this pins that for the fewer-layers case of the HF test above.
  from test_gguf import write_gguf
  from ftjax.models.gguf import load_gguf
  model = hf_models.build("llama")
  model.config.num_hidden_layers = 1  # block_count 1, while both layers' tensors are written
  path = write_gguf(model, str(tmp_path / "m.gguf"), "llama")
  with pytest.raises(FtjaxError, match=r"unexpected tensor 'blk\.1\..*' for a llama model with 1 layers"):
    load_gguf(path)


# --- gemma 2 / gemma 3 (text): what makes them differ from gemma 1 ------------------------

GEMMAS = ["gemma2", "gemma3"]
# Each switch off in turn: the tiny configs of hf_models must make every one of them matter,
# or the logits tests above would pass with the switch ignored.
GEMMA_SWITCHES = {
    "gemma2": {"attn_logit_softcap": None, "final_logit_softcap": None, "query_pre_attn_scalar": None,
               "layer_types": ("full_attention",) * 3},
    "gemma3": {"rope_local_theta": None, "rope_scaling": (), "layer_types": ("full_attention",) * 3},
}


@pytest.mark.parametrize("family", GEMMAS, indirect=True)
def test_gemma_switches_change_the_logits(family):
  name, _, path, cfg, model = family
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 16)))
  base = model(tokens)
  params = load_hf_params(path, cfg)
  for key, off in GEMMA_SWITCHES[name].items():
    changed = models.from_params(cfg.replace(**{key: off}), params)(tokens)
    assert rel_err(changed, base) > 1e-3, (name, key)  # 10x the logits tolerance at least


@pytest.mark.parametrize("family", GEMMAS, indirect=True)
def test_gemma_greedy_generate_equals_transformers(family):
  _check_greedy_generate(family)


def _check_greedy_generate(family):
  """Prompts of unequal length (left-padded together by ftjax), 12 new tokens: past the
  sliding window (gemma's local layers: 4, phi3: 8), so the cached decode must apply it."""
  from ftjax.generate import generate_ids
  _, hf_model, _, cfg, model = family
  rng = np.random.RandomState(5)
  prompts = [rng.randint(3, cfg.vocab_size, n).tolist() for n in (7, 3)]
  got = generate_ids(model, prompts, max_new_tokens=12, eos_ids={cfg.eos_token_id}, pad_id=0)
  for prompt, ours in zip(prompts, got):
    with torch.no_grad():  # stops on the same eos (the config's)
      out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                              pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()
  assert sum(len(row) for row in got) > 12  # more than one row went past the window


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
  """Gemma3ForConditionalGeneration: the text model's weights sit under model.language_model
  beside a vision tower; ftjax loads the text model (config from text_config) and ignores the rest."""
  torch.manual_seed(0)
  text = hf_models.FAMILIES["gemma3"]().to_dict()
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14)
  config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                     image_token_index=127, boi_token_index=125, eoi_token_index=126)
  hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
  hf_model.save_pretrained(str(tmp_path))
  model = hf_models.ftjax_model(str(tmp_path))
  assert model.config.model_type == "gemma3_text" and model.config.layer_types == tuple(text["layer_types"])
  tokens = np.random.RandomState(6).randint(0, 120, (2, 12))
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
  assert rel_err(model(jnp.asarray(tokens)), ref) < 1e-4


@pytest.mark.parametrize("family", GEMMAS, indirect=True)
def test_gemma_lora_wraps_what_peft_wraps_and_loads_its_adapter(family, tmp_path):
  _, _, path, cfg, _ = family
  _check_lora_against_peft(path, cfg, tmp_path, ("all-linear", None))  # None: PEFT's default


def _check_lora_against_peft(path, cfg, tmp_path, target_sets):
  """For each target set: ftjax's LoRA wraps the modules peft.get_peft_model wraps, with the
  same trainable count; then an all-linear PEFT adapter (B randomised) loads within 1e-4."""
  import peft as hf_peft
  from ftjax import peft
  from test_peft import hf_lora_names, lora_names
  fresh_hf = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  for targets in target_sets:
    ours_lora = peft.get_peft_model(hf_models.ftjax_model(path), peft.LoraConfig(r=2, target_modules=targets))
    theirs = hf_peft.get_peft_model(fresh_hf(), hf_peft.LoraConfig(r=2, target_modules=targets))
    assert lora_names(ours_lora) == hf_lora_names(theirs), targets
    count = sum(int(np.prod(v.shape)) for path, v in nnx.to_flat_state(nnx.state(ours_lora, nnx.Param))
                if "lora" in "/".join(map(str, path)))
    assert count == theirs.get_nb_trainable_parameters()[0], targets
  torch.manual_seed(1)
  theirs = hf_peft.get_peft_model(fresh_hf(), hf_peft.LoraConfig(r=4, target_modules="all-linear",
                                                                 init_lora_weights="gaussian"))
  with torch.no_grad():  # B starts at zero: give the adapter an effect
    for name, p in theirs.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.05)
  theirs.save_pretrained(str(tmp_path))
  tokens = np.random.RandomState(7).randint(0, cfg.vocab_size, (2, 16))
  with torch.no_grad():
    want = theirs.eval()(torch.tensor(tokens)).logits.numpy()
    plain = fresh_hf()(torch.tensor(tokens)).logits.numpy()
  assert rel_err(plain, want) > 1e-2  # the adapter matters
  model = peft.load_adapter(hf_models.ftjax_model(path), str(tmp_path))
  assert rel_err(model(jnp.asarray(tokens)), want) < 1e-4


def test_fused_kernels_refuse_what_they_cannot_compute(tmp_path):
  """cuDNN / splash have no attention soft-capping (gemma2), and splash one static window
  (gemma3 mixes sliding and global layers): a clear error, not a silently different model."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  for name, attention, match in (("gemma2", "cudnn", "soft-capping"), ("gemma3", "splash", "one static mask")):
    cfg = ModelConfig.from_hf_dict(hf_models.FAMILIES[name]().to_dict())
    model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(FtjaxError, match=match):
      model(tokens, attention=attention)


def test_a_layers_window_as_scan_data_masks_as_the_static_window():
  """gemma2 / gemma3 hand each layer its window as an array sliced by the scan (0: global):
  the mask must equal the static int window's, and 0 the unwindowed mask."""
  from ftjax.models import ops
  index = jnp.broadcast_to(jnp.arange(10), (2, 10))
  segments = jnp.asarray(np.repeat([[1], [2]], 10, 1).astype(np.int32)).at[1, 7:].set(0)
  mask = lambda window: ops.attention_mask(index, jnp.arange(10), segments, segments, window)
  traced = jax.jit(mask)  # as inside the layer scan: the window is a tracer, not a Python int
  np.testing.assert_array_equal(traced(jnp.asarray(3, jnp.int32)), mask(3))
  np.testing.assert_array_equal(traced(jnp.asarray(0, jnp.int32)), mask(None))
  assert (mask(3) != mask(None)).any()


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_phi3_partial_rotary_and_window_change_the_logits(family):
  """The tiny Phi-3 rotates half of each head and has a window (8) shorter than the sequence:
  turning either off must move the logits, so the transformers match above tests both."""
  _, _, path, cfg, model = family
  assert cfg.fused_projections and cfg.rotary_dim == cfg.head_dim // 2
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 16)))
  base = model(tokens)
  params = load_hf_params(path, cfg)
  for key, off in (("partial_rotary_factor", 1.0), ("sliding_window", None)):
    changed = models.from_params(cfg.replace(**{key: off}), params)(tokens)
    assert rel_err(changed, base) > 1e-3, key  # 10x the logits tolerance at least


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_phi3_greedy_generate_equals_transformers(family):
  _check_greedy_generate(family)


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_phi3_lora_on_fused_projections_matches_peft(family, tmp_path):
  """LoRA on the fused qkv_proj / gate_up_proj is one A/B over the fused output, as in PEFT;
  the installed peft has no default targets for phi3, so the sets are named ("all-linear" is
  qkv_proj, o_proj, gate_up_proj and down_proj)."""
  _, _, path, cfg, _ = family
  _check_lora_against_peft(path, cfg, tmp_path, ("all-linear", ("qkv_proj",)))


def test_phi3_longrope_matches_transformers_below_and_past_the_original_length(tmp_path):
  """Phi-3 128k / 3.5 / 4-mini's longrope: short factors up to original_max_position_embeddings
  (16 here), long ones and the cos/sin scale sqrt(1 + ln(256/16) / ln 16) = 1.22 past it."""
  factors = lambda *f: list(f)  # one per rotated pair: rotary_dim 8 -> 4
  config = transformers.Phi3Config(
      **{**hf_models.COMMON, "max_position_embeddings": 256}, partial_rotary_factor=0.5,
      pad_token_id=0, original_max_position_embeddings=16,
      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                       "short_factor": factors(1.0, 1.5, 2.0, 3.0), "long_factor": factors(2.0, 4.0, 8.0, 16.0)})
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(tmp_path))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  model = hf_models.ftjax_model(str(tmp_path))
  assert dict(model.config.rope_scaling)["original_max_position_embeddings"] == 16
  rng = np.random.RandomState(9)
  for length in (12, 24):  # below, past the original length
    tokens = rng.randint(0, config.vocab_size, (2, length))
    with torch.no_grad():
      ref = hf_model(torch.tensor(tokens)).logits.numpy()
    assert rel_err(model(jnp.asarray(tokens)), ref) < 1e-4, length
  models.save_pretrained(model, str(tmp_path / "out"))  # the factors survive the export
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
  with torch.no_grad():
    assert rel_err(reloaded(torch.tensor(tokens)).logits.numpy(), ref) < 1e-5


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_phi3_lora_trains_and_its_adapter_loads_in_peft(family, tmp_path):
  """The other direction: LoRA on the fused projections trains (the loss falls each step) and
  the adapter ftjax saves gives the same logits under HF PEFT."""
  import functools
  import optax
  import peft as hf_peft
  from ftjax import peft
  from ftjax import step as step_lib
  from ftjax.losses import CausalLMLoss
  from tiny import counting_batch
  _, _, path, cfg, _ = family
  model = peft.get_peft_model(hf_models.ftjax_model(path), peft.LoraConfig(
      r=4, target_modules=("qkv_proj", "gate_up_proj")))
  graphdef, trainable, frozen, mutable = step_lib.split_model(model, peft.AdapterParam)
  optimizer = optax.adam(1e-2)
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, loss_fn=CausalLMLoss(),
                                   optimizer=optimizer))
  state = step_lib.init_state(trainable, mutable, optimizer, seed=0)
  batch = jax.tree.map(lambda x: x[None], counting_batch(4, 16, vocab=cfg.vocab_size))
  losses = []
  for _ in range(4):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  trained = step_lib.merge_model(graphdef, state["trainable"], frozen, state["mutable"])
  peft.save_adapter(trained, str(tmp_path))
  base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  tokens = np.random.RandomState(8).randint(0, cfg.vocab_size, (2, 16))
  with torch.no_grad():
    plain = base(torch.tensor(tokens)).logits.numpy()
    want = hf_peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()(torch.tensor(tokens)).logits.numpy()
  assert rel_err(plain, want) > 1e-3  # the trained adapter matters (10x the tolerance below)
  assert rel_err(trained(jnp.asarray(tokens)), want) < 1e-4  # f32 both sides: summation order only


def test_phi3_longrope_without_its_factors_is_named():
  hf = hf_models.FAMILIES["phi3"]().to_dict()
  hf["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                           "original_max_position_embeddings": 16}
  with pytest.raises(FtjaxError, match="longrope rope scaling needs long_factor"):
    ModelConfig.from_hf_dict(hf)
