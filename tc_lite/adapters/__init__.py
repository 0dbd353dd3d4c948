"""What a run trains, as objects (see `tc_lite.adapters.base`); `build_adapters` is the one place that reads
`lora.mode`, `lora.per_encoder` and `unet.mode`, and `active_adapters` the one that reads the UNet's stage."""

from __future__ import annotations

from typing import Any

from tc_lite.adapters.base import Adapter, AdapterSet
from tc_lite.adapters.text_encoder import FullTextEncoder, TextEncoderLoRA
from tc_lite.adapters.unet import UNetLoRA

__all__ = ["Adapter", "AdapterSet", "FullTextEncoder", "TextEncoderLoRA", "UNetLoRA", "active_adapters",
           "build_adapters", "drift_penalty", "encoder_settings", "selected_slots"]


def build_adapters(cfg: Any, family: Any, components: Any) -> AdapterSet:
    """The adapters the preset asks for, applied to `components` in place: a LoRA (or full training) on each text
    encoder `lora.encoders` names (all of the family's by default), with the `lora.per_encoder` overrides of mode,
    rank, alpha and learning rate; then, with `unet.mode: lora`, a LoRA on the UNet (its own rank, alpha, lr)."""
    lora_cfg = cfg.lora
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
    u = cfg.unet
    if u.mode == "lora":
        unet = UNetLoRA(components, rank=u.rank, alpha=u.alpha, dropout=u.dropout, targets=list(u.targets),
                        base_model_version=family.kohya_base_model_version)
        unet.lr = u.lr
        adapters.append(unet)
    return AdapterSet(adapters)


def active_adapters(cfg: Any, adapters: AdapterSet, step: int) -> set[str]:
    """The keys of the adapters that train at optimizer step `step` (0-based): all, except the UNet LoRA before
    `unet.start_step`, and with `unet.stage: after_te` the text-encoder adapters from then on (the paper's staged
    Text+UNet). A function of the step alone, so a resumed run continues in the same stage."""
    u = cfg.unet
    if u.mode == "none":
        return adapters.keys()
    if step < u.start_step:
        return adapters.keys("text_encoder")
    return adapters.keys("unet") if u.stage == "after_te" else adapters.keys()


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


def drift_penalty(cfg: Any, adapters: AdapterSet) -> Any:
    """The `DriftPenalty` `unet.drift_weight` asks for (its base is the UNet with the UNet LoRA off), or None; the
    recipe and the estimator build their denoisers with it."""
    from tc_lite.sampling import DriftPenalty

    u = cfg.unet
    if u.mode != "lora" or u.drift_weight <= 0:
        return None
    return DriftPenalty(u.drift_weight, lambda: adapters.original(only=adapters.keys("unet")))
