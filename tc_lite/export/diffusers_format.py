"""The diffusers LoRA file (``pytorch_lora_weights.safetensors``) that ``pipe.load_lora_weights(folder)`` loads,
with alpha folded in so every diffusers version applies the same scale."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from tc_lite.export.kohya import (
    CANONICAL_PREFIX,
    _canonical_module,
    _cast_lora,
    _check_dtype,
    _uniform_rank,
    lora_groups,
)
from tc_lite.export.peft_format import _lora_config_kwargs
from tc_lite.export.slots import split_lora
from tc_lite.io import save_safetensors_atomic

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
_DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
BASE_MODEL_META_KEY = "tc_lite_base_model_version"  # ours: tells SD1 from an SDXL te1-only file when read back


def export_diffusers(lora: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], *,
                     save_dtype: torch.dtype = torch.float16, source: str = "LoRA") -> Path:
    """``folder/pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(folder)`` loads it.

    Keys are ``<component>.text_model.encoder.layers.N.<module>.lora_A/B.weight`` with component ``text_encoder``
    (SD1, SDXL's te1) or ``text_encoder_2`` (SDXL's te2), as ``StableDiffusionXLLoraLoaderMixin.save_lora_weights``
    writes them (diffusers strips ``text_model.`` itself when the installed transformers has no such submodule).
    alpha/r is folded into lora_B and the per-component metadata says alpha = r: diffusers versions that ignore the
    metadata assume exactly that, so every version applies the same scale; each encoder keeps its own rank.
    Returns the file's path.
    """
    _check_dtype(save_dtype)
    tensors: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, object] = {}
    parts = split_lora(lora, source)
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
    out = _cast_lora(tensors, save_dtype, DIFFUSERS_WEIGHT_NAME)
    meta = {"format": "pt", _DIFFUSERS_META_KEY: json.dumps(adapter_meta, sort_keys=True),
            BASE_MODEL_META_KEY: next(iter(parts)).base_model_version}
    return save_safetensors_atomic(out, Path(folder) / DIFFUSERS_WEIGHT_NAME, meta)
