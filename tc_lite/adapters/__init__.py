"""What a run trains, as objects (see `tc_lite.adapters.base`); `build_adapters` is the one place that reads
`lora.mode`."""

from __future__ import annotations

from typing import Any

from tc_lite.adapters.base import Adapter, AdapterSet
from tc_lite.adapters.text_encoder import FullTextEncoder, TextEncoderLoRA

__all__ = ["Adapter", "AdapterSet", "FullTextEncoder", "TextEncoderLoRA", "build_adapters"]


def build_adapters(lora_cfg: Any, family: Any, components: Any) -> AdapterSet:
    """The adapters the `lora` preset section asks for, applied to `components` in place: a LoRA (or full
    training) on each of the family's text encoders."""
    adapters: list[Adapter] = []
    for slot in family.slots:
        if lora_cfg.mode == "lora":
            adapters.append(TextEncoderLoRA(components, slot, rank=lora_cfg.rank, alpha=lora_cfg.alpha,
                                            dropout=lora_cfg.dropout, targets=lora_cfg.targets))
        else:
            adapters.append(FullTextEncoder(components, slot))
    return AdapterSet(adapters)
