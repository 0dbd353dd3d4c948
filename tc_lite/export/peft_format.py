"""The peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), named for the installed
transformers' module tree; its LoraConfig arguments are shared with the diffusers export."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tc_lite.errors import UserError
from tc_lite.export.kohya import (
    _TARGET_ORDER,
    CANONICAL_PREFIX,
    _cast_lora,
    _check_dtype,
    _uniform_rank,
    lora_groups,
)
from tc_lite.export.slots import EncoderFormat, family_formats, split_parts
from tc_lite.io import save_json_atomic, save_safetensors_atomic

PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PREFIX_META_KEY = "tc_lite_kohya_prefix"  # ours, in the weights' metadata: which encoder the adapter is for


@functools.lru_cache(maxsize=None)
def encoder_has_text_model(encoder_class: str = "CLIPTextModel") -> bool:
    """Whether the installed transformers' ``encoder_class`` keeps the ``text_model`` submodule: CLIPTextModel
    dropped it in 5.6, CLIPTextModelWithProjection (SDXL's te2) still has it."""
    import transformers
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=4, projection_dim=8)
    with torch.device("meta"):
        return hasattr(getattr(transformers, encoder_class)(cfg), "text_model")


def _lora_config_kwargs(groups: list, rank: int, module_prefix: str) -> dict[str, Any]:
    """LoraConfig arguments reproducing ``groups``: target names, rank, the common alpha and any exceptions."""
    alphas = [alpha for *_, alpha in groups]
    common = max(set(alphas), key=alphas.count)
    layers = sorted({k[0] for k, *_ in groups})
    projs = sorted({k[2] for k, *_ in groups}, key=_TARGET_ORDER.get)
    every = {(layer, p) for layer in layers for p in projs} == {(k[0], k[2]) for k, *_ in groups}
    # proj names match every layer; exact paths only when the LoRA covers some layers but not others
    targets = projs if every else [f"{module_prefix}encoder.layers.{k[0]}.{k[1]}.{k[2]}" for k, *_ in groups]
    pattern = {f"{module_prefix}encoder.layers.{k[0]}.{k[1]}.{k[2]}": a for k, _, _, a in groups if a != common}
    return {"r": rank, "lora_alpha": common, "target_modules": targets, "alpha_pattern": pattern,
            "lora_dropout": 0.0, "bias": "none"}


def export_peft(lora: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], *,
                save_dtype: torch.dtype = torch.float16, base_model: str | None = None,
                source: str = "LoRA", unet: torch.nn.Module | None = None) -> Path:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) as ``save_pretrained`` writes it.

    Loads with ``PeftModel.from_pretrained(CLIPTextModel…, folder)`` and ``text_encoder.load_adapter(folder)``.
    A peft adapter belongs to one model, so an SDXL LoRA becomes one adapter per encoder, in the subfolders the
    diffusers pipeline names them (``folder/text_encoder``, ``folder/text_encoder_2``; only those trained):
    ``pipe.text_encoder_2.load_adapter(folder + "/text_encoder_2")``. SD1 keeps the adapter at the folder's root.
    peft matches parameter names exactly, so the names follow the module tree of the INSTALLED transformers
    (``base_model.model.encoder.layers…`` for CLIPTextModel on >= 5.6, ``…text_model.encoder.layers…`` before and
    for CLIPTextModelWithProjection); export again after switching across that version (the kohya and diffusers
    files do not have this limitation).

    A UNet LoRA (``lora_unet_`` modules) is one more adapter, in ``folder/unet`` (named by diffusers module paths;
    ``unet`` is the base UNet's module tree, a 'meta' one will do): ``PeftModel.from_pretrained(pipe.unet,
    folder + "/unet")``. A LoRA with a UNet part puts every adapter in its component's subfolder, SD1's text
    encoder in ``folder/text_encoder``.
    """
    _check_dtype(save_dtype)
    dest = Path(folder)
    parts, unet_part = split_parts(lora, source)
    for fmt, part in parts.items():
        alone = len(family_formats(fmt.base_model_version)) == 1 and not unet_part
        sub = dest if alone else dest / fmt.component
        _write_adapter(part, sub, fmt, save_dtype, base_model, f"{source} ({fmt.prefix})")
    if unet_part:
        _write_unet_adapter(unet_part, dest, unet, save_dtype, base_model, source)
    return dest


def _write_adapter(lora: Mapping[str, torch.Tensor], dest: Path, fmt: EncoderFormat, save_dtype: torch.dtype,
                   base_model: str | None, source: str) -> None:
    from peft import LoraConfig

    groups = lora_groups(lora, source)
    rank = _uniform_rank(groups, source)
    prefix = CANONICAL_PREFIX if encoder_has_text_model(fmt.encoder_class) else ""
    tensors: dict[str, torch.Tensor] = {}
    for (layer, block, proj), down, up, _ in groups:
        path = f"base_model.model.{prefix}encoder.layers.{layer}.{block}.{proj}"
        tensors[f"{path}.lora_A.weight"] = down
        tensors[f"{path}.lora_B.weight"] = up
    out = _cast_lora(tensors, save_dtype, PEFT_WEIGHT_NAME)
    config = LoraConfig(**_lora_config_kwargs(groups, rank, prefix), base_model_name_or_path=base_model).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["auto_mapping"] = {"base_model_class": fmt.encoder_class,
                              "parent_library": "transformers.models.clip.modeling_clip"}
    save_safetensors_atomic(out, dest / PEFT_WEIGHT_NAME, {"format": "pt", PREFIX_META_KEY: fmt.prefix})
    save_json_atomic(config, dest / PEFT_CONFIG_NAME)


def _write_unet_adapter(lora: Mapping[str, torch.Tensor], folder: Path, unet: torch.nn.Module | None,
                        save_dtype: torch.dtype, base_model: str | None, source: str) -> None:
    """``folder/unet``: the UNet LoRA as peft saves an adapter of a diffusers UNet (diffusers module paths, the
    common alpha and an ``alpha_pattern`` for the exceptions)."""
    from peft import LoraConfig

    from tc_lite.export.diffusers_format import unet_rank
    from tc_lite.export.unet import UNET_COMPONENT
    from tc_lite.unet_lora import KOHYA_UNET_PREFIX, resolve_unet_lora

    if unet is None:
        raise UserError(f"{source}: holds a UNet LoRA; the peft format needs the base UNet to name its modules")
    modules = resolve_unet_lora(unet, lora, source)
    rank = unet_rank(modules, source)
    alphas = [m.alpha for m in modules]
    common = max(set(alphas), key=alphas.count)
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        tensors[f"base_model.model.{m.path}.lora_A.weight"] = m.down.float()
        tensors[f"base_model.model.{m.path}.lora_B.weight"] = m.up.float()
    config = LoraConfig(r=rank, lora_alpha=common, target_modules=[m.path for m in modules], lora_dropout=0.0,
                        bias="none", alpha_pattern={m.path: m.alpha for m in modules if m.alpha != common},
                        base_model_name_or_path=base_model).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["auto_mapping"] = {"base_model_class": type(unet).__name__, "parent_library": type(unet).__module__}
    dest = folder / UNET_COMPONENT
    out = _cast_lora(tensors, save_dtype, PEFT_WEIGHT_NAME)
    save_safetensors_atomic(out, dest / PEFT_WEIGHT_NAME, {"format": "pt", PREFIX_META_KEY: KOHYA_UNET_PREFIX})
    save_json_atomic(config, dest / PEFT_CONFIG_NAME)
