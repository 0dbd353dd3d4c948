"""The diffusers LoRA file (``pytorch_lora_weights.safetensors``) that ``pipe.load_lora_weights(folder)`` loads,
text encoders and UNet in one file, with alpha folded in so every diffusers version applies the same scale."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from tc_lite.errors import UserError
from tc_lite.export.kohya import (
    CANONICAL_PREFIX,
    _canonical_module,
    _cast_lora,
    _check_dtype,
    _uniform_rank,
    lora_groups,
)
from tc_lite.export.peft_format import _lora_config_kwargs
from tc_lite.export.slots import split_parts
from tc_lite.io import save_safetensors_atomic

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
_DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
BASE_MODEL_META_KEY = "tc_lite_base_model_version"  # ours: tells SD1 from an SDXL te1-only file when read back


def export_diffusers(lora: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], *,
                     save_dtype: torch.dtype = torch.float16, source: str = "LoRA", unet: torch.nn.Module | None = None,
                     base_model_version: str | None = None) -> Path:
    """``folder/pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(folder)`` loads it.

    Keys are ``<component>.text_model.encoder.layers.N.<module>.lora_A/B.weight`` with component ``text_encoder``
    (SD1, SDXL's te1) or ``text_encoder_2`` (SDXL's te2), as ``StableDiffusionXLLoraLoaderMixin.save_lora_weights``
    writes them (diffusers strips ``text_model.`` itself when the installed transformers has no such submodule);
    a UNet LoRA (``lora_unet_`` modules) becomes ``unet.<diffusers module path>.lora_A/B.weight``, as
    ``save_lora_weights(unet_lora_layers=…)`` writes it. ``unet`` is the base UNet's module tree (a 'meta' one will
    do), needed to place the kohya names; ``base_model_version`` is recorded for a file without text encoders.
    alpha/r is folded into lora_B and the per-component metadata says alpha = r: diffusers versions that ignore the
    metadata assume exactly that, so every version applies the same scale; each component keeps its own rank.
    Returns the file's path.
    """
    _check_dtype(save_dtype)
    tensors: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, object] = {}
    parts, unet_part = split_parts(lora, source)
    for fmt, part in parts.items():
        groups = lora_groups(part, source)
        rank = _uniform_rank(groups, f"{source} ({fmt.prefix})")
        for (layer, block, proj), down, up, alpha in groups:
            path = f"{fmt.component}.{_canonical_module(layer, block, proj)}"
            tensors[f"{path}.lora_A.weight"] = down
            tensors[f"{path}.lora_B.weight"] = up * (alpha / down.shape[0])
        kwargs = _lora_config_kwargs([(k, d, u, float(rank)) for k, d, u, _ in groups], rank, CANONICAL_PREFIX)
        kwargs.pop("alpha_pattern")
        adapter_meta.update({f"{fmt.component}.{k}": v for k, v in kwargs.items()})
    if unet_part:
        unet_tensors, unet_meta = _unet_tensors(unet_part, unet, source)
        tensors.update(unet_tensors)
        adapter_meta.update(unet_meta)
    out = _cast_lora(tensors, save_dtype, DIFFUSERS_WEIGHT_NAME)
    version = next(iter(parts)).base_model_version if parts else base_model_version
    meta = {"format": "pt", _DIFFUSERS_META_KEY: json.dumps(adapter_meta, sort_keys=True),
            **({BASE_MODEL_META_KEY: version} if version else {})}
    return save_safetensors_atomic(out, Path(folder) / DIFFUSERS_WEIGHT_NAME, meta)


def _unet_tensors(lora: Mapping[str, torch.Tensor], unet: torch.nn.Module | None,
                  source: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """``unet.<path>.lora_A/B.weight`` (alpha/r folded into B) and the ``unet.*`` LoraConfig metadata."""
    from tc_lite.export.unet import UNET_COMPONENT
    from tc_lite.unet_lora import resolve_unet_lora

    if unet is None:
        raise UserError(f"{source}: holds a UNet LoRA; the diffusers format needs the base UNet to name its modules")
    modules = resolve_unet_lora(unet, lora, source)
    rank = unet_rank(modules, source)
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        tensors[f"{UNET_COMPONENT}.{m.path}.lora_A.weight"] = m.down.float()
        tensors[f"{UNET_COMPONENT}.{m.path}.lora_B.weight"] = m.up.float() * (m.alpha / rank)
    config = {"r": rank, "lora_alpha": rank, "target_modules": [m.path for m in modules], "lora_dropout": 0.0,
              "bias": "none"}
    return tensors, {f"{UNET_COMPONENT}.{k}": v for k, v in config.items()}


def unet_rank(modules: list, source: str) -> int:
    """The one rank of a UNet LoRA's modules (peft and diffusers configs carry one rank per component)."""
    return _uniform_rank([(m.name, m.down, m.up, m.alpha) for m in modules], f"{source} (UNet)")
