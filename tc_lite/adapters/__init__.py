"""What a run trains, as objects (see `tc_lite.adapters.base`); `build_adapters` is the one place that reads
`lora.mode` and `lora.per_encoder`."""

from __future__ import annotations

from typing import Any

from tc_lite.adapters.base import Adapter, AdapterSet
from tc_lite.adapters.text_encoder import FullTextEncoder, TextEncoderLoRA

__all__ = ["Adapter", "AdapterSet", "FullTextEncoder", "TextEncoderLoRA", "build_adapters", "encoder_settings",
           "selected_slots"]


def build_adapters(lora_cfg: Any, family: Any, components: Any) -> AdapterSet:
    """The adapters the `lora` preset section asks for, applied to `components` in place: a LoRA (or full
    training) on each text encoder `lora.encoders` names (all of the family's by default), with the
    `lora.per_encoder` overrides of mode, rank, alpha and learning rate."""
    adapters: list[Adapter] = []
    for slot in selected_slots(lora_cfg, family):
        s = encoder_settings(lora_cfg, slot.name)
        if s["mode"] == "lora":
            adapter: Adapter = TextEncoderLoRA(components, slot, rank=s["rank"], alpha=s["alpha"],
                                               dropout=lora_cfg.dropout, targets=lora_cfg.targets)
        else:
            adapter = FullTextEncoder(components, slot)
        adapter.lr = s["lr"]
        adapters.append(adapter)
    return AdapterSet(adapters)


def selected_slots(lora_cfg: Any, family: Any) -> list[Any]:
    """The family's encoder slots that train, in the family's order."""
    wanted = getattr(lora_cfg, "encoders", None)
    return [s for s in family.slots if wanted is None or s.name in wanted]


def encoder_settings(lora_cfg: Any, slot: str) -> dict[str, Any]:
    """mode, rank, alpha and lr (None: optim.lr) of one slot: `lora.per_encoder.<slot>` over the section's values."""
    over = (getattr(lora_cfg, "per_encoder", None) or {}).get(slot)
    out = {"mode": lora_cfg.mode, "rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "lr": None}
    for key in out:
        value = getattr(over, key, None)
        if value is not None:
            out[key] = value
    return out
