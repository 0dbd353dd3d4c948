"""Model families (SD1.x and SDXL): see `tc_lite.families.base` for what a family owns.

`family_of(components)` answers for loaded components, `family_for(model_cfg)` for a `model` preset section
before anything loads (the estimator, the planner), `load_model(model_cfg, dtype)` loads through the family.
"""

from __future__ import annotations

from typing import Any

import torch

from tc_lite.families.base import EncoderSlot, ModelFamily
from tc_lite.families.sd1 import SD1
from tc_lite.families.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {"sdxl": SDXL(), "sd1": SD1()}

__all__ = ["FAMILIES", "EncoderSlot", "ModelFamily", "family_for", "family_of", "load_model"]


def family_of(components: Any) -> ModelFamily:
    return FAMILIES[getattr(components, "family", "sd1") or "sd1"]


def family_for(model_cfg: Any) -> ModelFamily:
    """The family of the `model` preset section: `model.family` when set, else read from `model.source`'s configs
    or keys alone. A model tc-lite cannot train (SD2, the SDXL refiner, SD3, FLUX) is refused here, by name."""
    from tc_lite.errors import UserError
    from tc_lite.models.detect import UNSUPPORTED, detect_family

    chosen = getattr(model_cfg, "family", "auto") or "auto"
    if chosen != "auto":
        return FAMILIES[chosen]
    found = detect_family(str(model_cfg.source), getattr(model_cfg, "revision", None))
    if found.kind in UNSUPPORTED and found.kind != "sd2":  # SD2: the SD1 loader's checks name it, file or folder
        raise UserError(found.message(str(model_cfg.source)))
    return FAMILIES[found.family or "sd1"]  # SD1's loader explains what else it found


def load_model(model_cfg: Any, dtype: torch.dtype) -> tuple[ModelFamily, Any]:
    family = family_for(model_cfg)
    return family, family.load(model_cfg, dtype)
