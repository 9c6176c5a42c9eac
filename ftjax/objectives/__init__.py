"""Training objectives as plugs (see ftjax.objectives.base): `get(config)` is the run's one.

Adding one: subclass `Objective`, register it in REGISTRY, give its own keys a config block
(docs/design.md, "Adding an objective").
"""

from __future__ import annotations

from ftjax import config as config_lib
from ftjax.errors import FtjaxError
from ftjax.objectives.base import Objective, refuse_other_blocks
from ftjax.objectives.sft import SFT

REGISTRY: dict[str, type[Objective]] = {SFT.name: SFT}


def get(config) -> Objective:
  """The objective `config.objective` names, validated against the config."""
  cls = REGISTRY.get(config.objective)
  if cls is None:
    raise FtjaxError(f"config: objective={config.objective!r}; expected one of {tuple(REGISTRY)}")
  refuse_other_blocks(config, REGISTRY, config_lib.base_config())
  objective = cls(config)
  objective.validate()
  return objective


__all__ = ["Objective", "REGISTRY", "SFT", "get"]
