"""A whole text encoder: canonical ``text_model.…`` names whatever transformers builds, LoRA merging, loading,
and the merged-encoder export (with how much of a fine-tune's update a save precision keeps)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tc_lite import __version__
from tc_lite.errors import UserError
from tc_lite.export.kohya import (
    _KNOWN_PREFIXES,
    CANONICAL_PREFIX,
    _canonical_module,
    _check_dtype,
    _str,
    lora_groups,
)
from tc_lite.io import save_json_atomic, save_safetensors_atomic
from tc_lite.lora import kohya_state_dict

# --------------------------------------------------------------------------------------------------- encoder names

_PROJECTION = "text_projection."


def canonical_encoder_key(name: str) -> str:
    """``encoder.layers.0…`` / ``base_model.model.encoder…`` / ``text_encoder.text_model…`` -> ``text_model.…``;
    ``text_projection.weight`` (CLIPTextModelWithProjection, SDXL's te2) sits beside ``text_model`` and stays."""
    for prefix in ("text_encoder_2.", "text_encoder.", "base_model.model."):
        name = name.removeprefix(prefix)
    name = name.replace(".base_layer.", ".")
    return name if name.startswith((CANONICAL_PREFIX, _PROJECTION)) else CANONICAL_PREFIX + name


def encoder_state_dict(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights as fp32 CPU tensors with canonical ``text_model.…`` names, any LoRA merged in.

    This is the fix for the names trap of full fine-tuning: ``CLIPTextModel.state_dict()`` under transformers
    >= 5.6 has no ``text_model.`` prefix, which ComfyUI's CLIPLoader and older transformers do not recognise.
    """
    plain = {
        canonical_encoder_key(k): v.detach().to("cpu", torch.float32).clone()
        for k, v in text_encoder.state_dict().items()
        if ".lora_" not in k and not k.endswith("position_ids")
    }
    lora = kohya_state_dict(text_encoder)
    return merge_lora(plain, lora) if lora else plain


def merge_lora(encoder_sd: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], scale: float = 1.0,
               source: str = "LoRA") -> dict[str, torch.Tensor]:
    """W + scale·(alpha/r)·up@down for every LoRA module (fp32), on a canonical encoder state dict."""
    out = {k: v.float().clone() for k, v in encoder_sd.items()}
    for (layer, block, proj), down, up, alpha in lora_groups(lora, source):
        key = _canonical_module(layer, block, proj) + ".weight"
        if key not in out:
            raise UserError(f"{source}: targets {key}, which the base text encoder does not have (different model?)")
        delta = (alpha / down.shape[0]) * (up @ down)
        if delta.shape != out[key].shape:
            raise UserError(
                f"{source}: {key} is {tuple(out[key].shape)} in the base model but the LoRA makes "
                f"{tuple(delta.shape)}; it was trained for a different base model"
            )
        out[key] += scale * delta
    return out


def load_encoder_weights(text_encoder: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load a full-encoder state dict (canonical or live names) into ``text_encoder``; UserError on any mismatch."""
    own = {canonical_encoder_key(k): k for k in text_encoder.state_dict() if not k.endswith("position_ids")}
    given = {canonical_encoder_key(k): v for k, v in sd.items() if not k.endswith("position_ids")}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    target = text_encoder.state_dict()
    wrong = [k for k in sorted(set(own) & set(given)) if tuple(given[k].shape) != tuple(target[own[k]].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label} {len(keys)} (first: {keys[0]}"
            + (f" {tuple(given[keys[0]].shape)} vs {tuple(target[own[keys[0]]].shape)}" if label == "wrong shape" else "")
            + ")"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise UserError(
            f"{source}: not a text encoder of this base model ({detail}). Use the base model the file was trained on."
        )
    with torch.no_grad():
        for k, name in own.items():
            target[name].copy_(given[k].to(target[name].dtype))


# --------------------------------------------------------------------------------------------------- merged encoder


def encoder_path(dest: str | os.PathLike[str], component: str, several: bool = False) -> Path:
    """Where the merged encoder of diffusers component ``component`` goes, given the export's ``dest``.

    A file name takes diffusers' numbering (``x_text_encoder.safetensors`` -> ``x_text_encoder_2.safetensors`` for
    ``text_encoder_2``; unchanged for ``text_encoder``), so ComfyUI's DualCLIPLoader gets a clip_l and a clip_g file
    side by side; a folder holds one transformers folder per component when the family has ``several`` encoders,
    as a diffusers pipeline folder does (``CLIPTextModelWithProjection.from_pretrained(dest, subfolder=…)``).
    """
    p = Path(dest)
    if p.suffix == ".safetensors":
        return p.with_name(p.stem + component.removeprefix("text_encoder") + p.suffix)
    return p / component if several else p


def update_retention(tuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Relative error of the weight UPDATE (tuned − base) after storing ``tuned`` in ``dtype``: 0 = kept exactly.

    Why: a full fine-tune at lr 1e-6 moves weights by ~1e-6 of their size, below fp16's resolution (~5e-4), so an
    fp16 encoder file can silently be the base model again.
    """
    err = ref = 0.0
    for k, t in tuned.items():
        if k not in base:
            continue
        d = t.float() - base[k].float()
        ref += float(d.square().sum())
        err += float((t.to(dtype).float() - t.float()).square().sum())
    return math.sqrt(err / ref) if ref > 0 else 0.0


def export_encoder(sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, save_dtype: torch.dtype,
                   config: Any = None, metadata: Mapping[str, Any] | None = None,
                   architecture: str = "CLIPTextModel", component: str = "text_encoder") -> Path:
    """Write a full text encoder (canonical ``text_model.…`` names) to ``path``.

    A path ending in ``.safetensors`` gets one file (ComfyUI's CLIPLoader / DualCLIPLoader, A1111 extensions, or
    ``load_encoder_weights``); any other path becomes a transformers folder (``config.json`` + ``model.safetensors``)
    for ``<architecture>.from_pretrained(path)``. ``config`` is the CLIPTextConfig (needed for the folder form);
    ``architecture`` is SDXL te2's ``CLIPTextModelWithProjection`` there, ``component`` its diffusers name.
    """
    _check_dtype(save_dtype)
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"export: refusing to write the encoder: {len(bad)} tensor(s) contain NaN/inf (first: {bad[0]})")
    out = {canonical_encoder_key(k): v.detach().to("cpu", save_dtype) for k, v in sd.items()}
    over = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if over:
        raise UserError(f"export: {len(over)} encoder tensor(s) overflow {save_dtype} (first: {over[0]}); use fp32")
    meta = {"format": "pt", "tc_lite_version": __version__, "tc_lite_component": component}
    if config is not None:
        meta["tc_lite_text_encoder_config"] = config.to_json_string(use_diff=False)
    for k, v in (metadata or {}).items():
        meta[k if str(k).startswith(_KNOWN_PREFIXES) else f"tc_lite_{k}"] = _str(v)
    dest = Path(path)
    if dest.suffix == ".safetensors":
        return save_safetensors_atomic(out, dest, meta)
    if config is None:
        raise ValueError("a folder export needs the encoder config")
    dest.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg["architectures"] = [architecture]
    cfg["torch_dtype"] = cfg["dtype"] = str(save_dtype).removeprefix("torch.")
    save_json_atomic(cfg, dest / "config.json")
    save_safetensors_atomic(out, dest / "model.safetensors", meta)
    return dest
