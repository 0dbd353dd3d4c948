"""The UNet parts of tuned models at inference: each LoRA file's `lora_unet_` modules loaded once, as its own peft
adapter on the components' UNet, and switched on at a weight for one render.

The text-encoder parts mix in embedding space (`tc_lite.inference`); a UNet LoRA has no embedding, so its weight
is the LoRA multiplier, W + w·(alpha/r)·up@down: what A1111's `<lora:name:w>` and ComfyUI's strength_model do.
Several files add up. A weight of 0 leaves that adapter off, so all-zero weights are the base UNet bit for bit.
The UNet LoRA applies on every denoising step (it trained so), whatever `tuned_steps` says for the text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

__all__ = ["UNetLoRAMix"]

_PREFIX = "tc_lite_mix"


def _unet_part(source: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """(label, the `lora_unet_` tensors) of a tuned source, in any format `read_tuned` reads (kohya, diffusers and
    peft files bring their UNet part under kohya names); empty for modules, full encoders and TE-only files."""
    from tc_lite.export import read_tuned
    from tc_lite.unet_lora import split_unet_lora

    if isinstance(source, torch.nn.Module):
        return "module", {}
    if isinstance(source, Mapping) and not all(isinstance(v, torch.Tensor) for v in source.values()):
        # slot name -> encoder file or module (full encoders), and the run's kohya file under "unet"
        return _unet_part(source["unet"]) if "unet" in source else ("encoders", {})
    label = "LoRA state dict" if isinstance(source, Mapping) else str(source)
    if isinstance(source, Mapping) and not source:
        return label, {}
    kind, sd = read_tuned(source)
    return label, split_unet_lora(sd)[1] if kind == "lora" else {}


class UNetLoRAMix:
    """The UNet LoRAs of `sources` (one per tuned model, in order; sources without one hold a place), loaded into
    `unet` once. `applied(weights)` turns them on for its duration; `close()` removes them again."""

    def __init__(self, unet: torch.nn.Module, sources: Sequence[Any]):
        from tc_lite.unet_lora import load_unet_lora

        self.unet = unet
        self.names: list[str | None] = []
        for i, source in enumerate(sources):
            label, part = _unet_part(source)
            name = f"{_PREFIX}{i}"
            if part:
                load_unet_lora(unet, part, source=label, adapter=name)
            self.names.append(name if part else None)
        self._off()

    def __bool__(self) -> bool:
        return any(self.names)

    def _layers(self) -> list[LoraLayer]:
        mine = {n for n in self.names if n}
        return [m for m in self.unet.modules() if isinstance(m, LoraLayer) and mine & set(m.lora_A)]

    def _activate(self, layer: LoraLayer, names: list[str]) -> None:
        """Exactly `names` of ours active on `layer`; other adapters (a trainer's) keep their state and flags
        (peft's set_adapter rewrites every adapter's requires_grad)."""
        mine = {n for n in self.names if n}
        keep = [a for a in layer.active_adapters if a not in mine]
        flags = [(p, p.requires_grad) for p in layer.parameters()]
        layer.set_adapter(keep + names, inference_mode=True)
        for p, flag in flags:
            p.requires_grad_(flag)

    def _off(self) -> None:
        for layer in self._layers():
            self._activate(layer, [])

    @contextlib.contextmanager
    def applied(self, weights: Sequence[float]) -> Iterator[None]:
        """The UNet with LoRA i at multiplier `weights[i]` (one weight per source; 0: off)."""
        if len(weights) != len(self.names):
            raise ValueError(f"{len(weights)} weight(s) for {len(self.names)} tuned model(s)")
        on = {n: float(w) for n, w in zip(self.names, weights) if n and float(w) != 0.0}
        layers = self._layers()
        for layer in layers:
            active = [n for n in on if n in layer.lora_A]
            self._activate(layer, active)
            for n in active:
                layer.set_scale(n, on[n])
        try:
            yield
        finally:
            self._off()

    def close(self) -> None:
        """Remove the loaded adapters (the LoRA wrappers stay, computing the base UNet)."""
        for layer in self._layers():
            for n in self.names:
                if n and n in layer.lora_A:
                    layer.delete_adapter(n)
        self.names = [None] * len(self.names)
