"""Mixture-of-experts families (Mixtral, Qwen3-MoE) against transformers on tiny random-init
models: 4 experts, top-2, 2 layers, routers scaled so tokens pick different experts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import hf_models
from ftjax import models, peft
from ftjax.errors import FtjaxError
from ftjax.losses import CausalLMLoss
from ftjax.models import moe
from ftjax.models.config import ModelConfig, load_hf_config
from ftjax.models.hf import load_hf_params

FAMILIES = list(hf_models.MOE_FAMILIES)


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
  model = hf_models.build_moe(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  cfg = load_hf_config(path)
  return request.param, model, path, cfg, models.from_params(cfg, load_hf_params(path, cfg))


def padded_tokens(cfg, seed=0):
  tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (3, 16))
  mask = np.ones_like(tokens)
  mask[1, 10:] = 0
  mask[2, 5:] = 0
  return tokens, mask


def test_config_reads_the_routing_switches(family):
  name, model, _, cfg, _ = family
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.router_aux_loss_coef) == (4, 2, 0.02)
  assert cfg.norm_topk_prob == (name == "mixtral")  # mixtral always re-normalises
  assert cfg.intermediate_size == 32  # the experts' width (qwen3_moe: moe_intermediate_size)


def test_logits_match_transformers(family):
  """Full forward with padding (valid rows) and, per token, a KV-cache decode."""
  _, model, _, cfg, ours_model = family
  tokens, mask = padded_tokens(cfg)
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    chosen = [torch.topk(l, 2).indices for l in model(torch.tensor(tokens), output_router_logits=True).router_logits]
  assert len({tuple(sorted(c.tolist())) for c in chosen[0]}) > 2  # the routing really varies
  ours = np.asarray(ours_model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask)))
  valid = mask.astype(bool)
  # f32 on both sides; 1e-4 relative as for the dense families (summation order only).
  assert rel_err(ours[valid], ref[valid]) < 1e-4
  grouped = nnx.clone(ours_model)  # the GPU / TPU path (ragged_dot), here on CPU
  getattr(grouped.model.layers, cfg.moe_module).implementation = "ragged"
  ours = np.asarray(grouped(jnp.asarray(tokens), segment_ids=jnp.asarray(mask)))
  assert rel_err(ours[valid], ref[valid]) < 1e-4
  # prefill 12 tokens, then decode 4 one at a time (one compile: cache_index is traced)
  decode = nnx.jit(lambda m, tok, cache, i: m(tok, cache=cache, cache_index=i))
  logits, cache = decode(ours_model, jnp.asarray(tokens[:1, :12]), ours_model.init_cache(1, 16), 0)
  steps = [np.asarray(logits)[0]]
  for i in range(12, 16):
    logits, cache = decode(ours_model, jnp.asarray(tokens[:1, i:i + 1]), cache, jnp.int32(i))
    steps.append(np.asarray(logits)[0])
  assert rel_err(np.concatenate(steps), ref[0]) < 1e-4


def test_aux_loss_equals_transformers(family):
  """The load-balancing loss over the valid tokens of every layer, as transformers' aux_loss."""
  _, model, _, cfg, ours_model = family
  tokens, mask = padded_tokens(cfg, seed=1)
  with torch.no_grad():
    want = float(model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                       output_router_logits=True).aux_loss)
  _, stats = ours_model.hidden_states(jnp.asarray(tokens), segment_ids=jnp.asarray(mask),
                                      router_stats=True)
  got = float(moe.load_balancing_loss(stats))
  assert abs(got - want) < 1e-5, (got, want)
  assert abs(got - 2.0) > 1e-3  # not the perfectly balanced value (top_k) by accident


def test_training_loss_adds_the_aux_loss_as_transformers(family):
  """CausalLMLoss's loss = mean NLL + router_aux_loss_coef * aux_loss, transformers' loss with
  output_router_logits, and "aux_loss" is reported."""
  _, model, _, cfg, ours_model = family
  tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 12))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  with torch.no_grad():
    out = model(torch.tensor(inputs), labels=torch.tensor(np.pad(targets[:, :-1], ((0, 0), (1, 0)))),
                output_router_logits=True)
  batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
           "positions": jnp.broadcast_to(jnp.arange(11), (2, 11)),
           "segment_ids": jnp.ones((2, 11), jnp.int32),
           "loss_mask": jnp.ones((2, 11)).at[:, -1].set(0)}  # HF's shift drops the last target
  sums = CausalLMLoss()(ours_model, batch)
  assert abs(float(sums["aux_loss"] / sums["count"]) - float(out.aux_loss)) < 1e-5
  assert abs(float(sums["loss_sum"] / sums["count"]) - float(out.loss)) < 1e-5


def test_grouped_experts_equal_every_expert_dense():
  """ragged_dot over expert-sorted rows = the every-token-every-expert einsum, values and grads."""
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(keys[0], (24, 16))
  kernels = (jax.random.normal(keys[1], (4, 16, 8)), jax.random.normal(keys[2], (4, 16, 8)),
             jax.random.normal(keys[3], (4, 8, 16)))
  weights, chosen = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[4], (24, 4))), 2)

  def run(impl):
    f = lambda x, k: jnp.sum(moe.IMPLEMENTATIONS[impl](x, weights, chosen, k, jax.nn.silu) ** 2)
    return jax.jit(jax.value_and_grad(f, (0, 1)))(x, kernels)
  (ragged, ragged_grads), (dense, dense_grads) = run("ragged"), run("dense")
  assert rel_err(ragged, dense) < 1e-5
  for a, b in zip(jax.tree.leaves(ragged_grads), jax.tree.leaves(dense_grads)):
    assert rel_err(a, b) < 1e-5


def test_export_roundtrip_through_transformers(family, tmp_path):
  name, _, _, cfg, ours_model = family
  models.save_pretrained(ours_model, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model_type"] == name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 20))
  with torch.no_grad():
    ref = reloaded(torch.tensor(tokens)).logits.numpy()
  assert rel_err(ours_model(jnp.asarray(tokens)), ref) < 1e-5
  assert load_hf_config(str(tmp_path)) == cfg.replace(generation_eos_token_ids=load_hf_config(
      str(tmp_path)).generation_eos_token_ids)


# transformers 4 names of the experts (and router) in target_modules, which peft 0.21 maps onto
# transformers 5's fused parameters (ftjax/peft/experts.py)
V4_EXPERTS = {"mixtral": ["w1", "w3", "w2"], "qwen3_moe": ["gate_proj", "up_proj", "down_proj"]}


def fresh_hf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def lora_target_sets(name):
  """LoraConfig kwargs covering every way peft reaches the experts: "all-linear" (attention,
  experts at rank 2r for the fused gate/up, router), target_parameters (both, or one: then the
  file has no "base_layer." keys; or the router by full name) and transformers 4's expert names."""
  return [dict(target_modules="all-linear"),
          dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
          dict(target_modules=["q_proj"], target_parameters=["down_proj"]),
          # full names, as transformers 5 spells them (mixtral's block is `mlp` there)
          dict(target_modules=["q_proj"], target_parameters=[f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)]),
          dict(target_modules=["v_proj", *V4_EXPERTS[name]])]


def test_lora_on_experts_has_peft_keys_shapes_and_counts(family):
  """For each way of naming the experts: the adapter's keys and shapes equal the state dict of
  peft.get_peft_model on transformers' model, and the trainable / total counts equal peft's."""
  import peft as hf_peft
  name, _, path, _, ours_model = family
  for kwargs in lora_target_sets(name):
    ours = peft.get_peft_model(nnx.clone(ours_model), peft.LoraConfig(r=2, lora_alpha=4, **kwargs))
    theirs = hf_peft.get_peft_model(fresh_hf(path), hf_peft.LoraConfig(r=2, lora_alpha=4, **kwargs))
    want = {k: tuple(v.shape) for k, v in hf_peft.get_peft_model_state_dict(theirs).items()}
    assert {k: v.shape for k, v in peft.adapter_state_dict(ours).items()} == want, kwargs
    assert any(".experts." in k or ".gate." in k for k in want), kwargs
    assert peft.count_params(ours) == theirs.get_nb_trainable_parameters(), kwargs
    hash(nnx.graphdef(ours))  # static attributes hashable: jit's static args take the graphdef


def test_expert_targets_peft_refuses_are_refused_by_name(family):
  """Half of the fused gate/up pair, a parameter the model lacks, a router both LoRA'd and
  trained whole: one-line errors naming the targets."""
  name, _, _, _, ours_model = family
  with pytest.raises(FtjaxError, match="one fused gate_up_proj parameter"):
    peft.get_peft_model(nnx.clone(ours_model), peft.LoraConfig(r=2, target_modules=V4_EXPERTS[name][:1]))
  with pytest.raises(FtjaxError, match=r"target_parameters \['experts.up_proj'\] match no parameter"):
    peft.get_peft_model(nnx.clone(ours_model), peft.LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["experts.up_proj"]))
  # all-linear adds the router's LoRA, which a router trained whole cannot take (peft: TypeError)
  with pytest.raises(FtjaxError, match=r"\['gate.weight'\] match no parameter.*modules_to_save trains"):
    peft.get_peft_model(nnx.clone(ours_model), peft.LoraConfig(
        r=2, target_modules="all-linear", modules_to_save=["gate"]))


def randomise_b(model, scale=0.05, seed=1):
  """LoRA's B starts at zero: give every adapter an effect."""
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, peft.AdapterParam))):
    if str(path[-1]) in ("lora_b", "gate_up_proj_b", "down_proj_b"):
      var.set_value(scale * jax.random.normal(jax.random.PRNGKey(seed + i), var.shape))
  return model


def test_expert_lora_adapters_load_both_ways_and_merge(family, tmp_path):
  """all-linear LoRA (experts and router included) with random B: ftjax's adapter under peft,
  and peft's under ftjax, give the same logits within 1e-4 (f32; summation order only), on the
  dense and the grouped (ragged_dot) expert paths; merged and exported, transformers loads
  the model with those logits."""
  import peft as hf_peft
  _, _, path, cfg, ours_model = family
  tokens = np.random.RandomState(7).randint(0, cfg.vocab_size, (2, 16))
  config = dict(r=2, lora_alpha=4, target_modules="all-linear")
  ours = randomise_b(peft.get_peft_model(nnx.clone(ours_model), peft.LoraConfig(**config)))
  peft.save_adapter(ours, str(tmp_path / "ours"))
  with torch.no_grad():
    plain = fresh_hf(path)(torch.tensor(tokens)).logits.numpy()
    want = hf_peft.PeftModel.from_pretrained(fresh_hf(path), str(tmp_path / "ours")).eval()(
        torch.tensor(tokens)).logits.numpy()
  assert rel_err(plain, want) > 1e-2  # the adapter matters (100x the tolerance)
  assert rel_err(ours(jnp.asarray(tokens)), want) < 1e-4
  grouped = nnx.clone(ours)
  getattr(grouped.model.layers, cfg.moe_module).implementation = "ragged"
  assert rel_err(grouped(jnp.asarray(tokens)), want) < 1e-4
  # a run continuing that adapter: its saved (peft-rewritten) config is the run's all-linear one
  resumed = peft.get_peft_model(nnx.clone(ours_model), peft.LoraConfig(**config))
  peft.load_adapter_weights(resumed, str(tmp_path / "ours"), "default")
  saved, again = peft.adapter_state_dict(ours), peft.adapter_state_dict(resumed)
  assert saved.keys() == again.keys() and all(np.array_equal(saved[k], again[k]) for k in saved)

  theirs = hf_peft.get_peft_model(fresh_hf(path), hf_peft.LoraConfig(init_lora_weights="gaussian", **config))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.05)
    want = theirs.eval()(torch.tensor(tokens)).logits.numpy()
  theirs.save_pretrained(str(tmp_path / "theirs"))
  loaded = peft.load_adapter(nnx.clone(ours_model), str(tmp_path / "theirs"))
  assert rel_err(loaded(jnp.asarray(tokens)), want) < 1e-4

  models.save_pretrained(peft.merge_and_unload(loaded), str(tmp_path / "merged"))
  with torch.no_grad():
    merged = fresh_hf(str(tmp_path / "merged"))(torch.tensor(tokens)).logits.numpy()
  assert rel_err(merged, want) < 1e-4


def test_dense_layers_mixed_in_are_refused_by_name():
  hf = hf_models.MOE_FAMILIES["qwen3_moe"]().to_dict()
  with pytest.raises(FtjaxError, match=r"config.json: layers \[1\] are dense MLP layers"):
    ModelConfig.from_hf_dict({**hf, "mlp_only_layers": [1]})
  with pytest.raises(FtjaxError, match="num_experts_per_tok=5 must be in 1..4"):
    ModelConfig.from_hf_dict({**hf, "num_experts_per_tok": 5})


def make_run_dir(tmp_path_factory, name):
  """A tiny HF folder of the family with the tiny tokenizer, and quickstart data: config runs."""
  from tiny import quickstart_data, tiny_tokenizer
  path = tmp_path_factory.mktemp(f"{name}_run")
  tok = tiny_tokenizer()
  hf_models.build_moe(name, vocab_size=512, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id).save_pretrained(str(path))
  tok.save(str(path))
  return str(path), quickstart_data(tmp_path_factory, n_train=16, n_eval=4)


@pytest.fixture(scope="module")
def moe_run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory, "mixtral")


def lora_steps(model_dir, data_dir, method="lora", steps=2, **mesh):
  from ftjax import run as run_lib
  from tiny import run_config
  config = run_config(model_dir, data_dir, with_eval=False, **{
      "method": method, "train.steps": steps, "train.lr": 1e-2, "data.seq_len": 64,
      **{f"mesh.{k}": v for k, v in mesh.items()}})
  run = run_lib.setup(config)
  state, _ = run_lib.init_or_restore(run, None)
  step = run_lib.jit_train_step(run, state)
  loader = run.train_ds.batches(config.train.batch_size, seed=0)
  metrics = []
  for _ in range(steps):
    state, m = step(state, run.frozen, run.place_batch(loader.next_batch(config.train.batch_size)))
    metrics.append({k: float(v) for k, v in m.items()})
  return config, run, state, metrics


def test_lora_steps_on_an_fsdp_mesh_equal_one_device(moe_run_dir):
  """Two LoRA steps from a config: the loss moves, aux_loss is reported, and on fsdp=2 x
  tensor=2 (experts split over fsdp) the losses equal the one-device run's."""
  *_, one = lora_steps(*moe_run_dir)
  assert one[1]["loss"] < one[0]["loss"] and 0 < one[0]["aux_loss"]
  _, run, state, sharded = lora_steps(*moe_run_dir, data=1, fsdp=2, tensor=2)
  spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  experts = run.frozen["model"]["layers"]["block_sparse_moe"]["experts"]
  assert spec(experts["base_layer"]["w1"]["kernel"][...]) == (None, "fsdp", None, "tensor")
  # all-linear LoRA reaches the experts (as peft's): each expert's A / B lives with its expert
  lora = state["trainable"]["model"]["layers"]["block_sparse_moe"]["experts"]
  assert spec(lora["gate_up_proj_a"][...]) == (None, "fsdp", None, None)
  assert spec(lora["down_proj_b"][...]) == (None, "fsdp", None, None)
  for a, b in zip(one, sharded):
    # f32 with "highest" matmuls; only the reduction order differs between the meshes.
    assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["aux_loss"] - b["aux_loss"]) < 1e-5


def test_qlora_loads_attention_in_4_bits_and_keeps_experts_float(family):
  """Loading with 4-bit quantisation (QLoRA) quantises the attention kernels as they are read;
  the router and expert kernels (no nnx.Linear) stay float, and the model runs."""
  from ftjax import quant
  from ftjax.quant.linear import QuantLinear
  _, _, path, cfg, ours_model = family
  params = quant.collect_sinks(load_hf_params(path, cfg, allocate=quant.quant_sinks(quant_type="nf4")))
  model = models.from_params(cfg, params, transform=quant.quantize_model)
  quantised = {str(p[-1]) for p, m in nnx.iter_modules(model) if isinstance(m, QuantLinear)}
  assert quantised == {"q_proj", "k_proj", "v_proj", "o_proj"}
  layer = getattr(model.model.layers, cfg.moe_module)
  assert layer.experts.kernels(jnp.float32)[0].dtype == jnp.float32
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (1, 8)))
  # NF4 attention weights: close to the float model, not equal (measured ~1e-2 relative)
  assert 0 < rel_err(model(tokens), ours_model(tokens)) < 0.3


@pytest.mark.parametrize("name", FAMILIES)
def test_a_qlora_step_from_a_config_and_its_plan(name, tmp_path_factory):
  """Each family trains one QLoRA step from a run config (all-linear: attention in 4 bits with
  LoRA, float experts and router with peft's expert / router LoRA), and ftjax.plan of that
  config counts the adapter bytes the run holds: peft's trainable count for all-linear r=8, f32."""
  import peft as hf_peft
  from ftjax import plan as plan_lib
  model_dir, data_dir = make_run_dir(tmp_path_factory, name)
  config, run, state, metrics = lora_steps(model_dir, data_dir, method="qlora", steps=1)
  assert np.isfinite(metrics[0]["loss"]) and metrics[0]["aux_loss"] > 0
  theirs = hf_peft.get_peft_model(fresh_hf(model_dir), hf_peft.LoraConfig(r=8, lora_alpha=8,
                                                                           target_modules="all-linear"))
  trainable = sum(x.size for x in jax.tree.leaves(state["trainable"]))
  assert trainable == theirs.get_nb_trainable_parameters()[0]
  abstract, abstract_state, batch = plan_lib.abstract_run(config)
  assert plan_lib.plan_of(abstract, abstract_state, batch).adapters == 4 * trainable


def test_greedy_generate_equals_transformers(family):
  from test_models import _check_greedy_generate
  _check_greedy_generate(family)


def test_flops_count_the_active_experts_only(family):
  """MFU's per-token matmul params: top-k experts and the router, not every expert."""
  from ftjax.flops import matmul_params
  cfg = family[3]
  dense = matmul_params(cfg.replace(num_experts=0, num_experts_per_tok=0))
  d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  assert matmul_params(cfg) - dense == layers * (3 * d * f * (2 - 1) + d * 4)


def test_expert_lora_gradients_equal_on_the_dense_and_grouped_paths():
  """The LoRA gradients through the every-expert einsum (CPU) and through ragged_dot (GPU /
  TPU) agree: the adapted kernels feed both the same way. One MoE block (one compile each)."""
  from ftjax.peft.experts import ExpertsLora
  cfg = ModelConfig.from_hf_dict(hf_models.MOE_FAMILIES["mixtral"]().to_dict())
  block = moe.MoE(cfg, dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.5, rngs=nnx.Rngs(0))
  block.experts = randomise_b(ExpertsLora(block.experts, ranks={"gate_up_proj": 4, "down_proj": 2},
                                          scalings={"gate_up_proj": 2.0, "down_proj": 2.0},
                                          init=True, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 12, cfg.hidden_size))
  valid = jnp.ones((2, 12), bool)

  def grads(impl):
    block.implementation = impl
    graphdef, adapter, rest = nnx.split(block, peft.AdapterParam, ...)
    f = lambda a: jnp.sum(nnx.merge(graphdef, a, rest)(x, valid)[0] ** 2)
    return jax.jit(jax.grad(f))(adapter)
  dense, ragged = jax.tree.leaves(grads("dense")), jax.tree.leaves(grads("ragged"))
  assert len(dense) == 4 and all(float(jnp.abs(g).max()) > 0 for g in dense)
  for a, b in zip(dense, ragged):
    assert rel_err(a, b) < 1e-5  # f32, summation order only


def test_three_lora_adamw_steps_with_experts_equal_peft(family, tmp_path):
  """all-linear LoRA (attention, experts, router), same init (ftjax's, loaded by peft), same
  batches, loss = NLL + router_aux_loss_coef * aux_loss on both sides: the adapters after three
  AdamW steps agree within the SFT parity test's 1e-5 (tests/test_step.py's l2_rel says why the
  whole adapter's L2 is the measure)."""
  import peft as hf_peft
  from ftjax import step as step_lib
  from ftjax.optim import make_optimizer
  from test_step import _jit_step, _peft_lora_state, _torch_adamw, _torch_batches, _torch_step, l2_rel
  _, _, path, cfg, ours_model = family
  model = peft.get_peft_model(nnx.clone(ours_model), peft.LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules="all-linear"))
  peft.save_adapter(model, str(tmp_path / "init"))
  reference = hf_peft.PeftModel.from_pretrained(fresh_hf(path), str(tmp_path / "init"), is_trainable=True)
  graphdef, train, frozen, mutable = step_lib.split_model(model, peft.AdapterParam)
  optimizer, _ = make_optimizer(train, lr=1e-3, steps=3, schedule="constant", weight_decay=0.1,
                                max_grad_norm=1.0)
  step = _jit_step(graphdef, optimizer)
  state = step_lib.init_state(train, mutable, optimizer, seed=0)
  torch_opt = _torch_adamw(reference.parameters(), 1e-3, 0.1)
  reference.train()
  for batch in _torch_batches(cfg.vocab_size):
    state, metrics = step(state, frozen, jax.tree.map(lambda x: x[None], batch))
    out = reference(input_ids=torch.tensor(batch["inputs"]), output_router_logits=True,
                    attention_mask=torch.tensor(batch["segment_ids"]))
    mask = torch.tensor(batch["loss_mask"]) > 0
    loss = (torch.nn.functional.cross_entropy(out.logits[mask], torch.tensor(batch["targets"])[mask].long())
            + cfg.router_aux_loss_coef * out.aux_loss)
    assert abs(float(metrics["loss"]) - loss.item()) < 1e-5
    _torch_step(reference, torch_opt, loss)
  trained = step_lib.merge_model(graphdef, state["trainable"], frozen, state["mutable"])
  ours = peft.adapter_state_dict(trained)
  theirs = _peft_lora_state(reference)
  assert ours.keys() == theirs.keys() and any(".experts." in k for k in ours)
  assert l2_rel(ours, theirs) < 1e-5
  for key in ours:  # and no single tensor far off
    # 1e-3, not test_step's 1e-4: in qwen3_moe's layer-0 gate_up B one entry's first gradient
    # is -2.2e-8 (median 5e-4), where Adam's first update g / (|g| + 1e-8) turns f32
    # summation-order noise into a visible difference (l2_rel's doc); measured: that tensor
    # 6e-4 after step 1, 3e-4 after step 3; the other expert tensors <= 8e-6.
    assert l2_rel({key: ours[key]}, {key: theirs[key]}) < 1e-3, key
  assert all(np.abs(ours[k]).max() > 1e-4 for k in ours if "lora_B" in k)  # B moved off zero


def test_run_config_names_the_expert_parameters():
  """lora.target_parameters (comma-separated) reaches LoraConfig as peft's target_parameters."""
  from ftjax import config as config_lib
  from ftjax import run as run_lib
  c = config_lib.base_config()
  assert run_lib.method_config(c, "lora", None).target_parameters is None
  c.lora.target_parameters = "experts.gate_up_proj, experts.down_proj"
  assert run_lib.method_config(c, "lora", None).target_parameters == (
      "experts.gate_up_proj", "experts.down_proj")
