"""A peft LoRA on the UNet's attention and feed-forward projections, and its kohya names.

The UNet counterpart of `tc_lite.lora` (same adapter name, same fp32-on-a-half-base rule, same "disable instead of
a second copy" trick). What differs is naming: kohya sd-scripts names UNet modules by their path in the model it
trains, with "." -> "_":

- SD1.x: diffusers' own paths (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`);
- SDXL: the original (SGM) block paths (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`), because
  sd-scripts trains SDXL on its own copy of the original UNet.

A1111, ComfyUI and diffusers map exactly these names (DESIGN §7). SD1's `proj_in`/`proj_out` are 1×1 convolutions
(`use_linear_projection: false`); their LoRA is a pair of 1×1 convolutions, stored 4-D as kohya stores them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from peft import LoraConfig

from tc_lite.config.schema import UNET_TARGETS
from tc_lite.errors import UserError
from tc_lite.lora import ADAPTER_NAME, _inject, lora_disabled, lora_layers

__all__ = ["KOHYA_UNET_PREFIX", "UNET_TARGETS", "add_unet_lora", "kohya_unet_module_name", "unet_kohya_state_dict",
           "unet_lora_disabled", "unet_lora_modules", "unet_lora_parameters"]

KOHYA_UNET_PREFIX = "lora_unet"
_IN_TRANSFORMER = re.compile(r"(?:^|\.)attentions\.\d+\.")  # only the cross-attention transformers' modules


def unet_lora_modules(unet: torch.nn.Module, targets: Sequence[str] = UNET_TARGETS) -> list[str]:
    """Paths of the UNet modules a LoRA on `targets` adapts: inside the transformer blocks only (the UNet's time
    embedding and ResNets have no such names, but a custom UNet might)."""
    return [name for name, mod in unet.named_modules()
            if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) and _IN_TRANSFORMER.search(name)
            and any(name == t or name.endswith("." + t) for t in targets)]


def add_unet_lora(unet: torch.nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                  targets: Sequence[str] = UNET_TARGETS, init_seed: int | None = None,
                  adapter: str = ADAPTER_NAME) -> torch.nn.Module:
    """Inject a LoRA into `unet` in place; afterwards only its fp32 LoRA weights require grad, and `lora_B` starts
    at zero, so the UNet computes exactly as before until training moves it."""
    from tc_lite.config.checks import unet_target_problems

    if problems := unet_target_problems(list(targets)):
        raise UserError(problems[0])
    if lora_layers(unet, adapter):
        raise ValueError(f"the UNet already has a LoRA adapter {adapter!r}; add it once")
    modules = unet_lora_modules(unet, targets)
    if not modules:
        raise UserError(f"unet.targets {list(targets)}: no such module in this UNet's transformer blocks")
    config = LoraConfig(r=rank, lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=modules,
                        bias="none", init_lora_weights=True)
    return _inject(unet, config, adapter, init_seed)


def unet_lora_parameters(unet: torch.nn.Module, adapter: str = ADAPTER_NAME) -> list[torch.nn.Parameter]:
    """The LoRA weights (A then B of each module, in module order), whatever their `requires_grad`."""
    return [p for _, layer in lora_layers(unet, adapter)
            for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)]


def unet_lora_disabled(unet: torch.nn.Module, adapter: str = ADAPTER_NAME) -> AbstractContextManager[None]:
    """The base UNet for the duration (see `tc_lite.lora.lora_disabled`, including its checkpointing caveat)."""
    return lora_disabled(unet, adapter)


# --------------------------------------------------------------------------------------------------- kohya names


def kohya_unet_module_name(module_path: str, base_model_version: str, config: Mapping[str, Any]) -> str:
    """The kohya module name of a diffusers UNet module path, for the family kohya calls `base_model_version`
    (`sd_v1`: diffusers paths; `sdxl_base_v1-0`: SGM paths through `tc_lite.models.ldm_keys.unet_key`)."""
    path = module_path.removeprefix("base_model.model.")
    if base_model_version == "sdxl_base_v1-0":
        from tc_lite.models.ldm_keys import unet_key

        path = unet_key(path + ".weight", config).removesuffix(".weight")
    elif base_model_version != "sd_v1":
        raise UserError(f"UNet LoRA names for {base_model_version!r} are not known to tc-lite (sd_v1, sdxl_base_v1-0)")
    return f"{KOHYA_UNET_PREFIX}_{path.replace('.', '_')}"


def unet_kohya_state_dict(unet: torch.nn.Module, base_model_version: str,
                          adapter: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The UNet LoRA as kohya tensors: `.lora_down.weight` (A: [r, in] or [r, in, 1, 1]), `.lora_up.weight` (B),
    `.alpha` (the real alpha, an fp32 scalar); detached fp32 CPU copies in module order."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(unet, adapter):
        kname = kohya_unet_module_name(name, base_model_version, unet.config)
        if f"{kname}.alpha" in out:
            raise ValueError(f"two UNet modules map to {kname!r}")
        out[f"{kname}.lora_down.weight"] = layer.lora_A[adapter].weight.detach().to("cpu", torch.float32).clone()
        out[f"{kname}.lora_up.weight"] = layer.lora_B[adapter].weight.detach().to("cpu", torch.float32).clone()
        out[f"{kname}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]), dtype=torch.float32)
    return out
