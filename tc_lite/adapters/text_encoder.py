"""The text-encoder adapters: a peft LoRA on one encoder slot (kohya names from the family's prefix), or the whole
encoder trained (the paper's setting), which keeps a frozen copy for the original embeddings."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from tc_lite.adapters.base import Adapter, check_same_names
from tc_lite.families.base import EncoderSlot


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class _TextEncoderAdapter(Adapter):
    """What both text-encoder adapters share: one slot's encoder, whose `requires_grad` weights are the trained ones."""

    slot: EncoderSlot
    components: Any

    def module(self) -> torch.nn.Module:
        return self.slot.encoder(self.components)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(_trainable(self.module()).values())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in _trainable(self.module()).items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        params = _trainable(self.module())
        check_same_names(params, state, source)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])


class TextEncoderLoRA(_TextEncoderAdapter):
    kind = "lora"

    def __init__(self, components: Any, slot: EncoderSlot, *, rank: int, alpha: float, dropout: float,
                 targets: list[str]):
        from tc_lite.lora import add_lora

        self.key, self.slot, self.components = slot.name, slot, components
        add_lora(slot.encoder(components), rank=rank, alpha=alpha, dropout=dropout, targets=targets)

    def original(self) -> contextlib.AbstractContextManager[None]:
        from tc_lite.lora import lora_disabled

        return lora_disabled(self.module())

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        from tc_lite.lora import kohya_state_dict

        return kohya_state_dict(self.module(), prefix=self.slot.kohya_prefix)


class FullTextEncoder(_TextEncoderAdapter):
    """Every weight of one encoder trained in fp32; `original()` swaps the frozen copy into the components."""

    kind = "full"

    def __init__(self, components: Any, slot: EncoderSlot):
        from tc_lite.lora import enable_full_finetune

        self.key, self.slot, self.components = slot.name, slot, components
        encoder = slot.encoder(components)
        self.frozen = copy.deepcopy(encoder).requires_grad_(False)  # the untouched encoder, for the early steps
        enable_full_finetune(encoder)

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        tuned = self.slot.encoder(self.components)
        self.slot.set_encoder(self.components, self.frozen)
        try:
            yield
        finally:
            self.slot.set_encoder(self.components, tuned)

    def held_modules(self) -> dict[str, torch.nn.Module]:
        return {f"original {self.slot.name} copy": self.frozen}  # for memory reports
