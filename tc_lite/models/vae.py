"""`model.vae`: replace the model's VAE, as A1111's "SD VAE" setting does.

Why it matters: SDXL's VAE overflows in fp16 (diffusers marks it `force_upcast`), so on cards without bf16 the
decode, the largest activation of a step at 1024², would have to run in fp32. madebyollin/sdxl-vae-fp16-fix is the
same decoder rescaled to stay finite in fp16 (its config says `force_upcast: false`), and saves that.
Accepted: a hub id, a diffusers VAE folder (or a pipeline folder with `vae/`), or a `.safetensors` VAE in
diffusers or original (LDM) key names, read with the model's own VAE architecture. A single file carries no config:
an fp16-fix file then keeps the model's `force_upcast` (set `memory.vae_precision: weights` to decode it in fp16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tc_lite.errors import UserError

_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors"]


def load_vae(source: str, dtype: torch.dtype, *, family: str = "sd1", revision: str | None = None,
             like: Any = None) -> torch.nn.Module:
    """The VAE `source` names. A single file takes the architecture of `like` (the model's own VAE config),
    else the family's bundled one."""
    source = str(source).strip()
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path, dtype, source)
    if path.is_file():
        return _from_file(path, dtype, family, like)
    from tc_lite.models.loading import _looks_like_path

    if _looks_like_path(source):
        raise UserError(f"model.vae: {source!r} does not exist; give a hub id, a VAE folder or a .safetensors file.")
    from tc_lite.models.hub import snapshot

    return _from_folder(snapshot(source, _PATTERNS, revision=revision, key="model.vae"), dtype, source)


def _from_folder(folder: Path, dtype: torch.dtype, label: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    sub = "" if (folder / "config.json").is_file() else "vae"
    if not (folder / sub / "config.json").is_file():
        raise UserError(f"model.vae: {label} has no config.json (nor vae/config.json): not a diffusers VAE folder.")
    try:
        return AutoencoderKL.from_pretrained(str(folder), subfolder=sub or None, torch_dtype=dtype,
                                             use_safetensors=True)
    except (OSError, ValueError) as err:
        raise UserError(f"model.vae: {label} could not be loaded as a diffusers VAE: {err}") from err


def _from_file(path: Path, dtype: torch.dtype, family: str, like: Any) -> torch.nn.Module:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from tc_lite.models.ldm_keys import VAE_PREFIX, vae_key
    from tc_lite.models.loading import bundled_config_dir

    if path.suffix.lower() != ".safetensors":
        raise UserError(f"model.vae: {path} is not a .safetensors file (pickled VAEs are not loaded).")
    config = like if like is not None else AutoencoderKL.load_config(str(bundled_config_dir(family) / "vae"))
    vae = AutoencoderKL.from_config(config)
    state = {k.removeprefix(VAE_PREFIX): v for k, v in load_file(str(path)).items()}
    own = vae.state_dict()
    if not set(own) <= set(state):  # original (LDM) names: map ours onto them
        names = {k: vae_key(k, vae.config) for k in own}
        if not set(names.values()) <= set(state):
            missing = sorted(set(names.values()) - set(state))[:3]
            raise UserError(f"model.vae: {path} is not a {family.upper()} VAE (missing e.g. {missing}).")
        state = {k: state[n].reshape(own[k].shape) for k, n in names.items()}  # LDM attention: 1x1 convs
    vae.load_state_dict({k: state[k] for k in own})
    return vae.to(dtype).requires_grad_(False)
