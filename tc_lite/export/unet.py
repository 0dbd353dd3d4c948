"""The UNet part of a run (its `lora_unet_` modules) merged into the base UNet, and where that merged UNet goes.

A merged UNet is written as diffusers writes one (`UNet2DConditionModel.save_pretrained`): a folder holding
`config.json` and `diffusion_pytorch_model.safetensors` with diffusers' parameter names, which
`UNet2DConditionModel.from_pretrained(folder)` (or `subfolder="unet"` of a pipeline folder) loads; ComfyUI's
"Load Diffusion Model" reads the `.safetensors` file (it maps diffusers UNet names itself, `unet_to_diffusers`). The kohya names of the file are matched to the UNet by `tc_lite.unet_lora`, which
knows SD1's (diffusers path) and SDXL's (SGM path) names, so the family need not be passed in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tc_lite import __version__
from tc_lite.errors import UserError
from tc_lite.export.kohya import _KNOWN_PREFIXES, _check_dtype, _str
from tc_lite.io import save_safetensors_atomic, save_text_atomic

UNET_COMPONENT = "unet"  # diffusers' pipeline attribute, subfolder and LoRA key prefix
UNET_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' from_pretrained reads


def unet_path(dest: str | os.PathLike[str]) -> Path:
    """Where the merged UNet goes, given a merged export's `dest`: beside a file (`x_text_encoder.safetensors` ->
    `x_unet/`, `x.safetensors` -> `x_unet/`), or as the `unet/` subfolder of a folder, as in a pipeline folder."""
    p = Path(dest)
    if p.suffix == ".safetensors":
        return p.with_name(p.stem.removesuffix("_text_encoder") + "_unet")
    return p / UNET_COMPONENT


def base_unet_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's own weights as fp32 CPU copies in diffusers' names (a LoRA injected in it is left out)."""
    out = {}
    for k, v in unet.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.removeprefix("base_model.model.").replace(".base_layer.", ".")] = v.detach().to("cpu", torch.float32)
    return out


def merge_unet_lora(unet: torch.nn.Module, lora: Mapping[str, torch.Tensor], scale: float = 1.0,
                    source: str = "LoRA") -> dict[str, torch.Tensor]:
    """The base UNet's state dict (fp32) with W + scale·(alpha/r)·up@down on every module of the UNet LoRA `lora`
    (`lora_unet_` keys; 1×1 convolutions as their matrices, as kohya, A1111 and ComfyUI merge them)."""
    from tc_lite.unet_lora import resolve_unet_lora

    out = {k: v.clone() for k, v in base_unet_state_dict(unet).items()}
    for m in resolve_unet_lora(unet, lora, source):
        key = f"{m.path}.weight"
        if m.down.dim() > 2 and m.down.shape[2:] != (1, 1):
            raise UserError(f"{source}: {m.name} is a {tuple(m.down.shape[2:])} convolution LoRA; tc-lite merges "
                            "linear and 1x1 LoRAs only (load it with diffusers instead)")
        delta = (m.alpha / m.down.shape[0]) * (m.up.flatten(1).float() @ m.down.flatten(1).float())
        out[key] += scale * delta.reshape(out[key].shape)
    return out


def export_unet(sd: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], *, unet: torch.nn.Module,
                save_dtype: torch.dtype, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a whole UNet (diffusers names) as `save_pretrained` lays it out: `folder/config.json` (the config of
    `unet`, the base it came from) and `folder/diffusion_pytorch_model.safetensors`; returns the folder."""
    _check_dtype(save_dtype)
    own = set(base_unet_state_dict(unet))
    if set(sd) != own:
        wrong = sorted(set(sd) ^ own)
        raise ValueError(f"export_unet: the state dict is not this UNet's ({len(wrong)} keys differ, first {wrong[0]})")
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"export: refusing to write the UNet: {len(bad)} tensor(s) contain NaN/inf (first: {bad[0]})")
    out = {k: v.detach().to("cpu", save_dtype).contiguous() for k, v in sd.items()}
    over = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if over:
        raise UserError(f"export: {len(over)} UNet tensor(s) overflow {save_dtype} (first: {over[0]}); use fp32")
    meta = {"format": "pt", "tc_lite_version": __version__, "tc_lite_component": UNET_COMPONENT}
    for k, v in (metadata or {}).items():
        meta[k if str(k).startswith(_KNOWN_PREFIXES) else f"tc_lite_{k}"] = _str(v)
    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    save_text_atomic(unet.to_json_string(), dest / "config.json")
    save_safetensors_atomic(out, dest / UNET_WEIGHT_NAME, meta)
    return dest


def meta_unet(config: Mapping[str, Any]) -> torch.nn.Module:
    """A UNet with `config`'s module tree on the 'meta' device: the names and shapes the peft and diffusers formats
    need, without weights or memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))
