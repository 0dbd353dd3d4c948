"""Model families (SD1.x today; SDXL next): see `tc_lite.families.base` for what a family owns.

`family_of(components)` answers for loaded components, `family_for(model_cfg)` for a `model` preset section
before anything loads (the estimator, the planner), `load_model(model_cfg, dtype)` loads through the family.
"""

from __future__ import annotations

from typing import Any

import torch

from tc_lite.families.base import EncoderSlot, ModelFamily
from tc_lite.families.sd1 import SD1

FAMILIES: dict[str, ModelFamily] = {"sd1": SD1()}

__all__ = ["FAMILIES", "EncoderSlot", "ModelFamily", "family_for", "family_of", "load_model"]


def family_of(components: Any) -> ModelFamily:
    return FAMILIES[getattr(components, "family", "sd1") or "sd1"]


def family_for(model_cfg: Any) -> ModelFamily:
    """The family `model.source` names, from its configs or keys alone (first family that recognises it)."""
    for family in FAMILIES.values():
        if family.recognises(str(model_cfg.source)):
            return family
    return FAMILIES["sd1"]  # whose loader explains what it found instead


def load_model(model_cfg: Any, dtype: torch.dtype) -> tuple[ModelFamily, Any]:
    family = family_for(model_cfg)
    return family, family.load(model_cfg, dtype)
