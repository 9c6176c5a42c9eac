"""Tiny random-init transformers models, one per supported family, built without the network."""

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3": lambda: transformers.LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    # Configs that bite: a window (4) shorter than every test sequence, soft-caps near the
    # scores' / logits' scale (build() scales the weights up until they matter), a
    # query_pre_attn_scalar that is not head_dim, 3 layers (sliding, full, sliding).
    "gemma2": lambda: transformers.Gemma2Config(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=4,
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=1.5),
    # local / global mixed (2 sliding then 1 global), a local RoPE base apart from the global one,
    # linear RoPE scaling on the global layer only, q/k norms.
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    # fused qkv_proj / gate_up_proj, partial rotary (half of each 16-dim head rotates), a
    # window (8) shorter than most test sequences.
    "phi3": lambda: transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5, sliding_window=8,
                                            pad_token_id=0),
}


def build(family: str, seed: int = 0):
  """A random-init HF model in f32 eval mode; norms and biases randomised so they matter."""
  torch.manual_seed(seed)
  config = FAMILIES[family]()
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      if getattr(config, "attn_logit_softcapping", None) and name.endswith(("q_proj.weight", "k_proj.weight")):
        p.mul_(8.0)  # scores of order 1, where the soft-cap bends them (at 0.02 init they are ~0.02)
  return model


def ftjax_model(model_dir: str):
  """ftjax's CausalLM with the weights of a saved HF model directory."""
  from ftjax import models
  from ftjax.models.config import load_hf_config
  from ftjax.models.hf import load_hf_params
  cfg = load_hf_config(model_dir)
  return models.from_params(cfg, load_hf_params(model_dir, cfg))

# Mixture-of-experts families, kept apart from FAMILIES (whose shared tests cover GGUF, which
# ftjax does not map for MoE): 4 experts, top-2, tiny experts.
MOE = dict(COMMON, intermediate_size=32, num_experts_per_tok=2, router_aux_loss_coef=0.02)
MOE_FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(**MOE, num_local_experts=4),
    # norm_topk_prob off (Qwen3-MoE's default) so the un-normalised top-k weights are tested.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**{**MOE, "intermediate_size": 96},
                                                     moe_intermediate_size=32, num_experts=4,
                                                     head_dim=32, norm_topk_prob=False,
                                                     eos_token_id=2),  # default None: greedy tests stop on it
}


def build_moe(family: str, seed: int = 0, **overrides):
  """A random-init HF MoE model, f32 eval; routers scaled up so tokens really pick different
  experts (at the 0.02 init every router is near-uniform and the top-k nearly arbitrary)."""
  torch.manual_seed(seed)
  config = MOE_FAMILIES[family]()
  for key, value in overrides.items():
    setattr(config, key, value)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
      if name.endswith("gate.weight"):
        p.mul_(50.0)
  return model
