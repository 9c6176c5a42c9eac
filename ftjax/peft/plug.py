"""The PEFT plug interface: how a method attaches to the decoder without changing it.

A plug owns an *adapter tree*: a nested dict whose paths mirror the base params it modifies
(`layers/attn/q_proj/lora_a` sits beside `layers/attn/q_proj/kernel`, stacked on the same
leading layer axis). The decoder (ftjax/models/llama.py) calls the plug's hooks at fixed
points; every hook defaults to "leave it alone", so a new method overrides only the hooks it
needs and touches nothing outside its own module:

  project(x, outs, base, adapters)   after each group of linear maps sharing input x
                                     (q/k/v, o, gate/up, down): LoRA, DoRA, IA3
  embeddings(x, adapters)            after the token embedding: prompt tuning

plus the non-hook parts of a method:

  init(rng, params, cfg)             -> adapter tree
  merge(params, adapters)            -> base params with the adapter folded in (export)
  axes(adapters, cfg)                -> logical axis names of the adapter leaves (sharding)
  peft_config / to_peft_state_dict   the HF PEFT on-disk format (export)

Memory: under the default remat policy ("projections", ftjax/models/llama.py) the backward pass
recomputes everything in a layer except the projection outputs and values a plug tags with
`jax.ad_checkpoint.checkpoint_name(x, "adapter")`. Tag small intermediates that are costly to
recompute (LoRA tags its x @ A); leave big ones untagged.
"""

from __future__ import annotations

from typing import Any

Params = dict[str, Any]


class Plug:
  """No-op base class: the decoder with this plug is the plain base model."""

  name = "none"

  def init(self, rng, params: Params, cfg) -> Params:
    del rng, params, cfg
    return {}

  def project(self, x, outs: dict, base: Params, adapters: Params, *, rng=None) -> dict:
    del x, base, adapters, rng
    return outs

  def embeddings(self, x, adapters: Params):
    del adapters
    return x

  def merge(self, params: Params, adapters: Params) -> Params:
    del adapters
    return params

  def axes(self, adapters: Params, cfg) -> Params:
    """Logical axis names for each adapter leaf (for sharding); default: replicated."""
    del cfg
    import jax
    return jax.tree.map(lambda x: (None,) * x.ndim, adapters)


NO_PLUG = Plug()
