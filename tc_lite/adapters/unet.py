"""The UNet adapter: a peft LoRA on the UNet's transformer projections (`tc_lite.unet_lora`), beside or instead of
the text-encoder adapters (the paper's Text+UNet setting; AlignProp's UNet-only setting).

Unlike a text-encoder adapter it changes every denoising step, the no-grad prefix included, as a UNet LoRA does at
inference: `affects_prefix` is True, so the prefix cache is refused (`tc_lite.prefix_rules`), and the two-encoder
schedule switches only the text encoders to their original weights in the early steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from tc_lite.adapters.base import Adapter, check_same_names


class UNetLoRA(Adapter):
    key = "unet"
    kind = "lora"
    part = "unet"
    affects_prefix = True

    def __init__(self, components: Any, *, rank: int, alpha: float, dropout: float, targets: list[str],
                 base_model_version: str):
        from tc_lite.unet_lora import add_unet_lora

        self.components = components
        self.base_model_version = base_model_version  # kohya's family name: decides SD1 or SGM module names
        add_unet_lora(components.unet, rank=rank, alpha=alpha, dropout=dropout, targets=targets)

    def module(self) -> torch.nn.Module:
        return self.components.unet

    def parameters(self) -> list[torch.nn.Parameter]:
        from tc_lite.unet_lora import unet_lora_parameters

        return unet_lora_parameters(self.module())

    def _named(self) -> dict[str, torch.nn.Parameter]:
        ids = {id(p) for p in self.parameters()}
        return {n: p for n, p in self.module().named_parameters() if id(p) in ids}

    def original(self) -> AbstractContextManager[None]:
        from tc_lite.unet_lora import unet_lora_disabled

        return unet_lora_disabled(self.module())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self._named().items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        params = self._named()
        check_same_names(params, state, source)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        from tc_lite.unet_lora import unet_kohya_state_dict

        return unet_kohya_state_dict(self.module(), self.base_model_version)
