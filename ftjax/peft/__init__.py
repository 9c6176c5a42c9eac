"""PEFT for any Flax NNX model, with HF PEFT's names and on-disk format.

  model = ftjax.peft.get_peft_model(model, ftjax.peft.LoraConfig(r=8, lora_alpha=16,
                                                                 target_modules="all-linear"))
  ftjax.peft.print_trainable_parameters(model)
  adapters = nnx.state(model, ftjax.peft.AdapterParam)   # the adapter tree: what trains
  with ftjax.peft.disable_adapters(model): ...           # the base model's outputs
  ftjax.peft.save_adapter(model, "adapter/")             # peft.PeftModel.from_pretrained reads it
  model = ftjax.peft.load_adapter(base_model, "adapter/")  # ftjax's or HF PEFT's adapter
  model = ftjax.peft.merge_and_unload(model)             # plain model, adapter folded in
  model = ftjax.peft.unload(model)                       # plain model, adapter dropped
  ftjax.peft.add_adapter(model, "other", config); ftjax.peft.set_adapter(model, "other")

Adapters attach in place by wrapping the matched layers (ftjax/peft/core.py explains how);
ftjax's own decoders additionally share work between the q/k/v (and gate/up) adapters.
"""

from __future__ import annotations

from ftjax import models
from ftjax.peft import experts, lora

from ftjax.peft.bottleneck import BottleneckAdapterConfig, BottleneckLinear, BottleneckParam
from ftjax.peft.core import (AdapterLayer, AdapterParam, ModulesToSave, PeftConfig, SavedModuleParam,
                             adapter_layers, can_merge, count_params, disable_adapters,
                             merge_adapter, merge_and_unload, merged_for_gguf, merged_model,
                             unmerge_adapter,
                             print_trainable_parameters, unload)
from ftjax.peft.hf_format import adapter_state_dict, load_adapter, load_adapter_weights, save_adapter
from ftjax.peft.ia3 import IA3Config, IA3Linear, IA3Param
from ftjax.peft.lora import DoraLinear, LoraConfig, LoraEinsum, LoraLinear, LoraParam
from ftjax.peft.named import (CONFIG_TYPES, active_adapters, add_adapter, configs, delete_adapter,
                              get_peft_model, set_adapter, trainable)
from ftjax.peft.prompt import (PrefixEncoder, PrefixTuningConfig, PromptEmbedding, PromptParam,
                               PromptTuningConfig)

__all__ = ["AdapterLayer", "AdapterParam", "BottleneckAdapterConfig", "BottleneckLinear",
           "BottleneckParam", "DoraLinear", "IA3Config", "IA3Linear", "IA3Param",
           "LoraConfig", "LoraEinsum", "LoraLinear", "LoraParam", "ModulesToSave", "PeftConfig",
           "PrefixEncoder", "PrefixTuningConfig", "PromptEmbedding", "PromptParam",
           "PromptTuningConfig", "SavedModuleParam",
           "active_adapters", "adapter_layers", "adapter_state_dict", "add_adapter", "configs",
           "delete_adapter", "merge_adapter", "set_adapter", "trainable", "unmerge_adapter", "can_merge", "count_params", "disable_adapters",
           "get_peft_model", "load_adapter", "load_adapter_weights", "merge_and_unload", "print_trainable_parameters",
           "merged_model", "save_adapter", "unload"]

# ftjax.models.save_gguf folds adapters in with this (models/ never imports peft/).
models.set_adapter_merge(merged_for_gguf)
# LoRA's target_parameters (MoE experts / router) are experts.py's, built on lora.py's layers.
lora.plug_parameter_targets(experts.resolve_moe_targets, experts.attach_parameter_targets)
