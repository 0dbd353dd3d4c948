"""Read any tc-lite output back (kohya, peft, diffusers, merged encoder; file, folder or state dict) as one of
the two intermediates, so every command accepts every format."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tc_lite.errors import UserError
from tc_lite.export.diffusers_format import _DIFFUSERS_META_KEY, BASE_MODEL_META_KEY, DIFFUSERS_WEIGHT_NAME
from tc_lite.export.encoder import canonical_encoder_key
from tc_lite.export.kohya import _TARGET_ORDER, _kohya_module, lora_groups, read_kohya
from tc_lite.export.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME, PREFIX_META_KEY
from tc_lite.export.slots import SD1_VERSION, SDXL_VERSION, format_for, format_of, split_parts

# peft / diffusers UNet LoRA keys (diffusers' `unet.` prefix, or peft's `base_model.model.`), by module path.
_UNET_KEY_RE = re.compile(
    r"^(?:unet\.|base_model\.model\.)?(?P<path>(?:down_blocks|mid_block|up_blocks)\.[\w.]+?)"
    r"\.lora_(?P<ab>A|B)(?:\.[\w-]+)?\.weight$"
)
# Subfolders a peft export holds one adapter in each (diffusers' component names).
_ADAPTER_SUBFOLDERS = ("text_encoder", "text_encoder_2", "unet")
# peft / diffusers LoRA keys, with or without their prefixes and an adapter name, old or new module tree.
_PEFT_KEY_RE = re.compile(
    r"^(?:(?P<component>text_encoder(?:_2)?)\.|base_model\.model\.)?(?:text_model\.)?encoder\.layers\.(?P<layer>\d+)\."
    r"(?P<block>self_attn|mlp)\.(?P<proj>\w+)\.lora_(?P<ab>A|B)(?:\.[\w-]+)?\.weight$"
)


def read_tuned(source: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """Read any tc-lite output as ("lora", kohya state dict) or ("encoder", canonical encoder state dict).

    Accepts a kohya ``.safetensors``, a diffusers LoRA (file, or folder holding ``pytorch_lora_weights.safetensors``),
    a peft adapter folder (or its ``adapter_model.safetensors``; SDXL, or any LoRA with a UNet part: the folder of
    ``text_encoder/``, ``text_encoder_2/`` and ``unet/`` adapters), a merged / full fine-tuned encoder file or
    folder, or an in-memory state dict of any of these. SDXL LoRAs come back with ``lora_te1_``/``lora_te2_`` names;
    a UNet LoRA's modules with ``lora_unet_`` names: as written in a kohya file, and for peft/diffusers files the
    diffusers path (``lora_unet_down_blocks_…``, kohya's SD1 names; SDXL files then differ from kohya's SGM names,
    which every loader, ``tc_lite.unet_lora.load_unet_lora`` included, maps the same). Anything else is a
    ``UserError`` naming the file. A merged UNet (a diffusers UNet folder) is not read here: load it with
    ``UNet2DConditionModel.from_pretrained``.
    """
    if isinstance(source, Mapping):
        return _classify(dict(source), {}, None, "state dict")
    p = Path(source)
    if p.is_dir():
        for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME, "model.safetensors"):
            if (p / name).is_file():
                return read_tuned(p / name)
        subs = [p / name for name in _ADAPTER_SUBFOLDERS]
        if any((s / PEFT_WEIGHT_NAME).is_file() for s in subs):
            return "lora", {k: v for s in subs if (s / PEFT_WEIGHT_NAME).is_file() for k, v in read_tuned(s)[1].items()}
        if any((s / "model.safetensors").is_file() for s in subs):
            raise UserError(f"{str(p)!r} holds one merged encoder per subfolder; pass {subs[0]} or {subs[1]}")
        raise UserError(
            f"{str(p)!r} is a folder without {DIFFUSERS_WEIGHT_NAME}, {PEFT_WEIGHT_NAME} or model.safetensors; "
            "pass a LoRA .safetensors file or an export folder"
        )
    tensors, metadata = read_kohya(p)
    peft_cfg = None
    if (p.parent / PEFT_CONFIG_NAME).is_file() and p.name == PEFT_WEIGHT_NAME:
        try:
            peft_cfg = json.loads((p.parent / PEFT_CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{p.parent / PEFT_CONFIG_NAME}: unreadable ({e}); re-export the peft adapter") from e
    return _classify(tensors, metadata, peft_cfg, str(p))


def _classify(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], peft_cfg: Mapping[str, Any] | None,
              source: str) -> tuple[str, dict[str, torch.Tensor]]:
    from tc_lite.unet_lora import unet_lora_groups

    keys = list(tensors)
    if keys and all(k.startswith("lora_") for k in keys):
        parts, unet = split_parts(tensors, source)
        for part in parts.values():
            lora_groups(part, source)  # validate now, with the file's name in the message
        if unet:
            unet_lora_groups(unet, source)
        return "lora", tensors
    if keys and any(".lora_A" in k or ".lora_B" in k for k in keys):
        unet = {k: v for k, v in tensors.items() if _UNET_KEY_RE.match(k)}
        te = {k: v for k, v in tensors.items() if k not in unet}
        out = _peft_to_kohya(te, metadata, peft_cfg, source) if te else {}
        return "lora", {**out, **(_peft_unet_to_kohya(unet, metadata, peft_cfg, source) if unet else {})}
    if any(k.endswith("self_attn.q_proj.weight") for k in keys) and not any("lora" in k for k in keys):
        if any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.", "conditioner."))
               for k in keys):
            raise UserError(f"{source}: is a whole Stable Diffusion checkpoint; pass it as the base model instead")
        return "encoder", {canonical_encoder_key(k): v for k, v in tensors.items()}
    raise UserError(
        f"{source}: not a text-encoder LoRA or text encoder (first keys: {', '.join(keys[:3]) or 'none'}); "
        "pass a file written by `tc_lite export` or by training"
    )


def _peft_alpha(metadata: Mapping[str, str], peft_cfg: Mapping[str, Any] | None, rank: int,
                component: str) -> tuple[float, dict]:
    """(default alpha, alpha_pattern) from a peft adapter_config or diffusers' lora_adapter_metadata."""
    if peft_cfg is not None:
        return float(peft_cfg.get("lora_alpha", rank)), dict(peft_cfg.get("alpha_pattern") or {})
    raw = metadata.get(_DIFFUSERS_META_KEY)
    if raw:
        meta = json.loads(raw)
        return float(meta.get(f"{component}.lora_alpha", rank)), dict(meta.get(f"{component}.alpha_pattern") or {})
    return float(rank), {}  # no config: diffusers then uses alpha = rank


def _peft_to_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   peft_cfg: Mapping[str, Any] | None, source: str) -> dict[str, torch.Tensor]:
    """peft/diffusers keys -> kohya names. The kohya prefix: a diffusers key's component (``text_encoder_2.`` is
    SDXL's te2), a peft adapter's ``tc_lite_kohya_prefix`` metadata, and for ``text_encoder.`` the family our
    metadata names (an SDXL te1-only file has no other sign); foreign files without it are SD1's."""
    parts: dict[tuple[str, int, str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in tensors.items():
        m = _PEFT_KEY_RE.match(k)
        if m is None:
            unknown.append(k)
            continue
        parts.setdefault((m["component"] or "", int(m["layer"]), m["block"], m["proj"]), {})[m["ab"]] = v
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} key(s) are not text-encoder or UNet LoRA keys (first: {unknown[0]}); "
            "pass a file written by `tc_lite export` or by training"
        )
    incomplete = [k for k, ab in parts.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise UserError(f"{source}: lora_A/lora_B missing for layer {incomplete[0][1]}; the file is truncated")
    version = metadata.get(BASE_MODEL_META_KEY, SD1_VERSION)
    if any(k[0] == "text_encoder_2" for k in parts):
        version = SDXL_VERSION
    out: dict[str, torch.Tensor] = {}
    for component in sorted({k[0] for k in parts}):
        own = {k[1:]: ab for k, ab in parts.items() if k[0] == component}
        fmt = (format_of(metadata[PREFIX_META_KEY]) if not component and PREFIX_META_KEY in metadata
               else format_for(component or "text_encoder", version))
        rank = int(next(iter(own.values()))["A"].shape[0])
        alpha, pattern = _peft_alpha(metadata, peft_cfg, rank, fmt.component)
        for key in sorted(own, key=lambda k: (k[0], _TARGET_ORDER.get(k[2], 9))):
            name = _kohya_module(*key, prefix=fmt.prefix)
            module_path = f"encoder.layers.{key[0]}.{key[1]}.{key[2]}"
            a = next((float(v) for pat, v in pattern.items() if re.fullmatch(rf"(.*\.)?{pat}", module_path)), alpha)
            out[f"{name}.lora_down.weight"] = own[key]["A"]
            out[f"{name}.lora_up.weight"] = own[key]["B"]
            out[f"{name}.alpha"] = torch.tensor(a, dtype=torch.float32)
        lora_groups({k: v for k, v in out.items() if k.startswith(fmt.prefix + "_")}, source)
    return out


def _peft_unet_to_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                        peft_cfg: Mapping[str, Any] | None, source: str) -> dict[str, torch.Tensor]:
    """peft/diffusers UNet keys -> kohya ``lora_unet_<diffusers path>`` modules, alpha from the adapter config or
    diffusers' ``unet.*`` metadata (none: alpha = rank, as diffusers reads it)."""
    from tc_lite.unet_lora import kohya_unet_module_name, unet_lora_groups

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = _UNET_KEY_RE.match(k)
        assert m is not None
        parts.setdefault(m["path"], {})[m["ab"]] = v
    half = sorted(path for path, ab in parts.items() if set(ab) != {"A", "B"})
    if half:
        raise UserError(f"{source}: lora_A/lora_B missing for UNet module {half[0]}; the file is truncated")
    rank = int(next(iter(parts.values()))["A"].shape[0])
    alpha, pattern = _peft_alpha(metadata, peft_cfg, rank, "unet")
    out: dict[str, torch.Tensor] = {}
    for path in sorted(parts):
        name = kohya_unet_module_name(path, SD1_VERSION, {})  # diffusers paths: kohya's SD1 naming
        a = next((float(v) for pat, v in pattern.items() if re.fullmatch(rf"(.*\.)?{pat}", path)), alpha)
        out[f"{name}.lora_down.weight"] = parts[path]["A"]
        out[f"{name}.lora_up.weight"] = parts[path]["B"]
        out[f"{name}.alpha"] = torch.tensor(a, dtype=torch.float32)
    unet_lora_groups(out, source)
    return out
