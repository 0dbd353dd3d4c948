"""Device, dtypes, autocast and loss scaling resolved once from the `memory` section.

No-op objects instead of branches: on CPU/fp32 `autocast()` is a nullcontext and the scaler is disabled, so the
training loop reads the same on every device.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from .config import MemoryConfig
from .errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Precision:
    device: torch.device
    name: str  # "fp16" | "bf16" | "fp32"
    weight_dtype: torch.dtype  # frozen weights (UNet, VAE, encoder base) are stored in this dtype
    scaler: torch.amp.GradScaler

    def autocast(self) -> ContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)


HALF = (torch.float16, torch.bfloat16)


def autocast_for(module: torch.nn.Module, autocast: Callable[[], ContextManager]) -> Callable[[], ContextManager]:
    """The autocast one call of `module` needs: none when its base weights are frozen and of one floating dtype,
    and its only other weights are peft LoRA factors.

    Such a model runs natively in its weight dtype, as diffusers' pipelines run it: the frozen half-precision UNet
    and VAE (under CUDA autocast their GroupNorm/LayerNorm outputs would be fp32, and the checkpointed grad steps
    and VAE backward keep them: +1.1 GiB at SD1.5 512² batch 1, +4.5 GiB at batch 4, benchmarks/RESULTS.md), and a
    VAE kept in fp32 by `memory.vae_precision` (autocast would run its convolutions in fp16 again, and overflow).
    A UNet LoRA (fp32 factors on the half UNet, trainable) runs natively too: peft casts each adapted layer's input
    to the LoRA dtype and the sum back to the base dtype, so the LoRA branch computes in fp32 and the UNet in its
    own dtype (its gradients match autocast's, tests/test_precision_optim.py). Any other trainable weight (a fully
    trained module, DoRA magnitudes) keeps `autocast`.
    """
    lora = _lora_factors(module)
    base = [p for p in module.parameters() if id(p) not in lora]
    dtypes = {p.dtype for p in base}
    if len(dtypes) == 1 and next(iter(dtypes)).is_floating_point and not any(p.requires_grad for p in base):
        return contextlib.nullcontext
    return autocast


def _lora_factors(module: torch.nn.Module) -> set[int]:
    """ids of the A/B factors of the peft LoRA layers in `module` that cast their input to the LoRA dtype. (No
    module holds one before peft is imported; a decode need not import it to find out.)"""
    peft_lora = sys.modules.get("peft.tuners.lora")
    if peft_lora is None:
        return set()
    return {id(p) for m in module.modules()
            if isinstance(m, peft_lora.LoraLayer) and getattr(m, "cast_input_dtype_enabled", True)
            for factors in (m.lora_A, m.lora_B) for p in factors.parameters()}


def _states_force_upcast(vae: torch.nn.Module) -> bool:
    """Whether the VAE's config itself says `force_upcast: true`. diffusers defaults the key to true, so a config
    written before the key existed (SD1.5's) reads true without saying so; diffusers' SD1 pipeline never upcasts."""
    config = getattr(vae, "config", None) or {}
    defaulted = config.get("_use_default_values", ()) if hasattr(config, "get") else ()
    return bool(getattr(config, "force_upcast", False)) and "force_upcast" not in defaulted


def vae_dtype(memory_cfg: MemoryConfig, vae: torch.nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE is kept and decodes in (`memory.vae_precision`, documented in base.yaml).

    auto: fp32 when the weights are fp16 and the VAE's config states `force_upcast` (SDXL's VAE overflows in fp16:
    NaN images), as `StableDiffusionXLPipeline` does; bf16 has fp32's range and never needs it. An fp16-safe VAE
    (madebyollin/sdxl-vae-fp16-fix, `force_upcast: false`) stays fp16. weights: never upcast. fp32: always.
    Cost of fp32: the VAE's weights twice (SDXL: +0.16 GiB) and its decode activations twice."""
    choice = memory_cfg.vae_precision
    if choice == "fp32":
        return torch.float32
    if choice == "weights":
        return weight_dtype
    if choice != "auto":
        raise ValueError(f"memory.vae_precision: unknown value {choice!r}")
    return torch.float32 if weight_dtype == torch.float16 and _states_force_upcast(vae) else weight_dtype


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "memory.device: cuda was asked for but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA). "
            "Install a CUDA build of torch, or set memory.device=cpu."
        )
    return torch.device(choice)


def resolve_precision(cfg: MemoryConfig) -> Precision:
    device = resolve_device(cfg.device)
    name = cfg.precision
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("memory.precision: fp16 needs a CUDA GPU; on the CPU use bf16 or fp32 (or auto)")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("memory.precision: this GPU has no bf16 support; use fp16 (or auto)")
    scaler = torch.amp.GradScaler(device.type, enabled=(name == "fp16"))
    return Precision(device=device, name=name, weight_dtype=DTYPES[name], scaler=scaler)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return False
    return True


def set_attention(unet: torch.nn.Module, choice: str, device: torch.device, warn: Callable[[str], None] = log.warning) -> str:
    """Use PyTorch SDPA (fused, memory-efficient kernels) unless xformers is asked for and usable. Returns what is used."""
    if choice in ("xformers", "auto") and device.type == "cuda" and xformers_available():
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    if choice == "xformers":
        why = "the device is not CUDA" if device.type != "cuda" else "xformers is not installed (pip install xformers)"
        warn(f"memory.attention: xformers requested but {why}; falling back to PyTorch SDPA, which is as memory-efficient on current GPUs")
    return "sdpa"  # diffusers' default processor for torch>=2 is scaled_dot_product_attention
