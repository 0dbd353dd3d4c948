"""Loading SD1.x/SDXL pipelines (hub id, diffusers folder, single file) and the tiny built-in models.

Names are resolved lazily so that importing `tc_lite.models.components` (e.g. from config validation) does not pay
for importing diffusers and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from tc_lite.models.components import SDComponents

_EXPORTS = {
    "clip_tokenizer": "tc_lite.models.tokenizer",
    "sd15_config_dir": "tc_lite.models.loading",
    "load_components": "tc_lite.models.loading",
    "freeze_and_cast": "tc_lite.models.loading",
    "build_tiny_components": "tc_lite.models.tiny",
    "save_tiny_model": "tc_lite.models.tiny",
    "tiny_prompts": "tc_lite.models.tiny",
    "TINY_COLOURS": "tc_lite.models.tiny",
    "TINY_OBJECTS": "tc_lite.models.tiny",
    "TINY_RESOLUTION": "tc_lite.models.tiny",
    "build_tiny_sdxl_components": "tc_lite.models.tiny_sdxl",
    "save_tiny_sdxl_model": "tc_lite.models.tiny_sdxl",
    "ldm_state_dict": "tc_lite.models.ldm_keys",
    "sdxl_ldm_state_dict": "tc_lite.models.ldm_keys",
}

__all__ = ["SDComponents", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
