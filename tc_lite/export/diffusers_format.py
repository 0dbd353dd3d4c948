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
from tc_lite.io import save_safetensors_atomic

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
_DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def export_diffusers(lora: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], *,
                     save_dtype: torch.dtype = torch.float16, source: str = "LoRA") -> Path:
    """``folder/pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(folder)`` loads it.

    Keys are ``text_encoder.text_model.encoder.layers.N.<module>.lora_A/B.weight`` (diffusers strips
    ``text_model.`` itself when the installed transformers has no such submodule). alpha/r is folded into lora_B
    and the metadata says alpha = r: diffusers versions that ignore the metadata assume exactly that, so every
    version applies the same scale. Returns the file's path.
    """
    _check_dtype(save_dtype)
    groups = lora_groups(lora, source)
    rank = _uniform_rank(groups, source)
    tensors: dict[str, torch.Tensor] = {}
    for (layer, block, proj), down, up, alpha in groups:
        path = f"text_encoder.{_canonical_module(layer, block, proj)}"
        tensors[f"{path}.lora_A.weight"] = down
        tensors[f"{path}.lora_B.weight"] = up * (alpha / down.shape[0])
    out = _cast_lora(tensors, save_dtype, DIFFUSERS_WEIGHT_NAME)
    kwargs = _lora_config_kwargs([(k, d, u, float(rank)) for k, d, u, _ in groups], rank, CANONICAL_PREFIX)
    kwargs.pop("alpha_pattern")
    meta = {"format": "pt", _DIFFUSERS_META_KEY: json.dumps({f"text_encoder.{k}": v for k, v in kwargs.items()},
                                                            sort_keys=True)}
    return save_safetensors_atomic(out, Path(folder) / DIFFUSERS_WEIGHT_NAME, meta)
