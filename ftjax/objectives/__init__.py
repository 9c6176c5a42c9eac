"""Training objectives as plugs (see ftjax.objectives.base): `get(config)` is the run's one.

Adding one: subclass `Objective`, register it in REGISTRY, give its own keys a config block
(docs/design.md, "Adding an objective").
"""

from __future__ import annotations

from ftjax import config as config_lib
from ftjax.errors import FtjaxError
from ftjax.objectives.base import Objective, refuse_other_blocks
from ftjax.objectives.classification import Classification
from ftjax.objectives.dpo import DPO, KTO, ORPO, SimPO
from ftjax.objectives.grpo import GRPO
from ftjax.objectives.sft import SFT

REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (SFT, Classification, DPO, ORPO,
                                                                  SimPO, KTO, GRPO)}


def get(config) -> Objective:
  """The objective `config.objective` names, validated against the config."""
  cls = REGISTRY.get(config.objective)
  if cls is None:
    raise FtjaxError(f"config: objective={config.objective!r}; expected one of {tuple(REGISTRY)}")
  refuse_other_blocks(config, REGISTRY, config_lib.base_config())
  objective = cls(config)
  objective.validate()
  return objective


__all__ = ["Classification", "DPO", "GRPO", "KTO", "ORPO", "Objective", "REGISTRY", "SFT", "SimPO",
           "get"]
