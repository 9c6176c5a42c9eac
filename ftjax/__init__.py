"""ftjax: fine-tuning open LLMs in JAX, with Flax NNX models and PEFT for any Flax model.

  ftjax.models   load / save_pretrained / CausalLM (the Llama-family decoders)
  ftjax.peft     LoraConfig, get_peft_model, save_adapter, load_adapter, merge_and_unload, ...
  ftjax.step     the pure train step over split NNX state; `fit` for a loop in a notebook
  ftjax.train    `python -m ftjax.train --config ...` and `train(config, workdir)`
"""

from ftjax import models, peft

__all__ = ["models", "peft"]
