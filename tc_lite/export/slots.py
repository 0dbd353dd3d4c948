"""Which text encoder a kohya prefix names, and what the other formats call that encoder.

The prefix alone decides it, as it does for every loader we target (DESIGN §7): ``lora_te`` is SD1's one encoder;
``lora_te1`` / ``lora_te2`` are SDXL's CLIP ViT-L and OpenCLIP bigG, which diffusers holds as ``text_encoder`` /
``text_encoder_2`` (its pipeline attributes, subfolders and LoRA key prefixes), ComfyUI as ``clip_l`` / ``clip_g``
and A1111 as ``conditioner.embedders.0`` / ``.1``. So a kohya state dict says by itself which encoders it changes,
and the peft, diffusers and merged exports need no model family passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tc_lite.errors import UserError


# The transformers class diffusers' pipelines declare for each text-encoder component (model_index.json).
_ENCODER_CLASS = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


@dataclass(frozen=True)
class EncoderFormat:
    """One text encoder as the export formats name it."""

    prefix: str  # kohya / A1111 / ComfyUI module prefix
    slot: str  # tc-lite's slot name: te, te1, te2
    component: str  # diffusers pipeline attribute, subfolder and LoRA key prefix
    encoder_class: str  # the transformers class diffusers loads for it
    base_model_version: str  # kohya's ss_base_model_version of the family it belongs to


def _formats() -> dict[str, EncoderFormat]:
    from tc_lite.families import FAMILIES

    return {s.kohya_prefix: EncoderFormat(s.kohya_prefix, s.name, s.encoder_attr, _ENCODER_CLASS[s.encoder_attr],
                                          f.kohya_base_model_version)
            for f in FAMILIES.values() for s in f.slots}


FORMATS: dict[str, EncoderFormat] = _formats()  # each family's slots in its order
SD1_VERSION, SDXL_VERSION = FORMATS["lora_te"].base_model_version, FORMATS["lora_te2"].base_model_version


def family_formats(base_model_version: str) -> list[EncoderFormat]:
    """The encoders of the family kohya calls ``base_model_version``, in its order."""
    return [f for f in FORMATS.values() if f.base_model_version == base_model_version]


def format_for(component: str, base_model_version: str) -> EncoderFormat:
    """The encoder a diffusers component name means in a family (``text_encoder``: SD1's, or SDXL's te1)."""
    found = [f for f in family_formats(base_model_version) if f.component == component]
    if not found:
        raise UserError(f"{component!r} is not a text encoder of {base_model_version} "
                        f"({', '.join(f.component for f in family_formats(base_model_version))})")
    return found[0]


def format_of(prefix: str) -> EncoderFormat:
    if prefix not in FORMATS:
        raise UserError(f"export: kohya prefix {prefix!r} is not a text encoder tc-lite knows ({', '.join(FORMATS)})")
    return FORMATS[prefix]


def prefix_of(key: str) -> str | None:
    """The kohya prefix of a LoRA key (``lora_te2_text_model_…`` -> ``lora_te2``), or None."""
    for prefix in FORMATS:
        if key.startswith(prefix + "_"):
            return prefix
    return None


def split_lora(sd: Mapping[str, torch.Tensor], source: str = "LoRA") -> dict[EncoderFormat, dict[str, torch.Tensor]]:
    """A kohya state dict by encoder, in the family's order; UserError for keys of no text encoder, or for a
    file mixing SD1's ``lora_te_`` with SDXL's ``lora_te1_``/``lora_te2_`` (no model has both)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        prefix = prefix_of(key)
        if prefix is None:
            unknown.append(key)
        else:
            out.setdefault(prefix, {})[key] = value
    if unknown:
        raise UserError(f"{source}: {len(unknown)} key(s) are not text-encoder LoRA keys (first: {unknown[0]}); "
                        f"tc-lite reads and writes only {', '.join(p + '_text_model_…' for p in FORMATS)}")
    if not out:
        raise UserError(f"{source}: no LoRA weights found; pass a kohya-format text-encoder LoRA")
    families = {FORMATS[p].base_model_version for p in out}
    if len(families) > 1:
        raise UserError(f"{source}: mixes SD1 (lora_te_) and SDXL (lora_te1_/lora_te2_) modules; no model has both")
    return {FORMATS[p]: out[p] for p in sorted(out)}



def split_parts(sd: Mapping[str, torch.Tensor],
                source: str = "LoRA") -> tuple[dict[EncoderFormat, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A kohya state dict as (its text-encoder parts by encoder, as `split_lora` gives them; its UNet part, the
    ``lora_unet_`` modules). A UNet-only LoRA has no encoder parts; one with neither is refused as `split_lora`
    refuses it."""
    from tc_lite.unet_lora import split_unet_lora

    te, unet = split_unet_lora(sd)
    return (split_lora(te, source) if te or not unet else {}), unet
