"""Load an SD1.x or SDXL pipeline's trainable pieces from whatever the user points at.

`load_components(source, family=...)` accepts "tiny"/"tiny-sdxl", a diffusers folder, an A1111/ComfyUI-style single
`.safetensors` file (read with the bundled SD1.5 or SDXL base configs, offline), or a hub id. Every way it can go
wrong that the user can fix (missing path, pickle checkpoint, a model of another family, hub id not cached while
offline) becomes one `UserError` naming the input and the fix; library tracebacks are for our bugs only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from tc_lite.errors import UserError
from tc_lite.models._cache import atomic_dir, cache_root
from tc_lite.models.components import SDComponents
from tc_lite.models.hub import snapshot
from tc_lite.models.detect import read_json
from tc_lite.models.ldm_keys import UNET_PREFIX, VAE_PREFIX
from tc_lite.models.tokenizer import PAD_TOKENS, clip_tokenizer_dir

PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
_ASSETS = Path(__file__).resolve().parent.parent / "assets"  # package data: ship tc_lite/assets/**
# tokenizer subfolder -> its pad token, text encoder subfolders, per family
_TOKENIZERS = {"sd1": {"tokenizer": "<|endoftext|>"}, "sdxl": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}}
_ENCODERS = {"sd1": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def _label(family: str) -> str:
    from tc_lite.families import FAMILIES

    return FAMILIES[family].label


def _subfolders(family: str) -> tuple[str, ...]:
    return (*_TOKENIZERS[family], *_ENCODERS[family], "unet", "vae", "scheduler")


def _hub_patterns(family: str, allow_pickle: bool) -> list[str]:
    """What a hub snapshot needs: configs, tokenizers, full-precision safetensors weights (possibly sharded)."""
    patterns = ["model_index.json", "scheduler/*.json", "*/config.json", *(f"{t}/*" for t in _TOKENIZERS[family]),
                "vae/diffusion_pytorch_model.safetensors"]
    for sub, stem in [*((e, "model") for e in _ENCODERS[family]), ("unet", "diffusion_pytorch_model")]:
        patterns += [f"{sub}/{stem}.safetensors", f"{sub}/{stem}.safetensors.index.json",
                     f"{sub}/{stem}-*-of-*.safetensors"]
        if allow_pickle:
            patterns.append(f"{sub}/{'pytorch_model' if stem == 'model' else stem}.bin")
    return patterns + (["vae/diffusion_pytorch_model.bin"] if allow_pickle else [])


def bundled_config_dir(family: str = "sd1") -> Path:
    """A complete local diffusers config folder (no weights) for SD1.5 or SDXL base, for offline single-file loading.

    The bundled JSONs are copied next to the generated tokenizer(s) into the cache (the package folder may be
    read-only and tokenizers are built at run time); the folder name carries a hash of the JSONs, so edits take effect.
    """
    assets = _ASSETS / {"sd1": "sd15", "sdxl": "sdxl"}[family]

    def fill(folder: Path) -> None:
        shutil.copytree(assets, folder, dirs_exist_ok=True)
        for sub, pad in _TOKENIZERS[family].items():
            shutil.copytree(clip_tokenizer_dir(pad), folder / sub)

    digest = hashlib.sha256(repr(sorted(PAD_TOKENS)).encode())
    for file in sorted(assets.rglob("*.json")):
        digest.update(file.relative_to(assets).as_posix().encode() + b"\0" + file.read_bytes())
    name = {"sd1": "sd15", "sdxl": "sdxl"}[family]
    return atomic_dir(cache_root() / f"{name}_config_{digest.hexdigest()[:12]}", fill)


def sd15_config_dir() -> Path:
    return bundled_config_dir("sd1")


def load_components(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    config_dir: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    family: str = "sd1",
    vae: str | None = None,
) -> SDComponents:
    """Load tokenizers, text encoders, UNet, VAE and scheduler (never the safety checker) from `source`.

    `config_dir` (single files only) is a diffusers folder describing the architecture, default the family's bundled
    base configs; `revision` applies to hub ids only; `allow_pickle` permits `.ckpt`/`.bin` files, which can run
    code on load; `vae` replaces the model's VAE (`tc_lite.models.vae`).
    """
    source = str(source).strip()
    if not source:
        raise UserError("model.source is empty: set it to 'tiny', a hub id, a diffusers folder or a .safetensors file.")
    path = Path(source).expanduser()
    if revision is not None and (source.startswith("tiny") or path.exists()):
        warnings.warn(f"model.revision={revision!r} is ignored: {source!r} is not a hub id", stacklevel=2)
    if source in ("tiny", "tiny-sdxl"):
        components = _load_tiny(source, family)
        _cast(components, dtype)
    elif path.is_dir():
        components = _load_folder(path, dtype, allow_pickle, family=family)
    elif path.is_file():
        components = _load_file(path, dtype, config_dir, allow_pickle, family)
    elif _looks_like_path(source):
        raise UserError(f"model.source: {source!r} does not exist. Check the path (it is resolved from {os.getcwd()}).")
    else:
        components = _load_hub(source, dtype, allow_pickle, revision, family)
    components.source, components.family = source, family
    if vae:
        from tc_lite.models.vae import load_vae

        components.vae = load_vae(vae, dtype, family=family, like=components.vae.config)
    return components


def _load_tiny(source: str, family: str) -> SDComponents:
    wanted = "tiny-sdxl" if family == "sdxl" else "tiny"
    if source != wanted:
        raise UserError(f"model.source: {source!r} is the built-in tiny {'SDXL' if source == 'tiny-sdxl' else 'SD1'} "
                        f"model, but model.family is {family}; use {wanted!r} or set model.family: auto")
    if family == "sdxl":
        from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

        return build_tiny_sdxl_components()
    from tc_lite.models.tiny import build_tiny_components

    return build_tiny_components()


def freeze_and_cast(components: SDComponents, dtype: torch.dtype, memory_cfg: Any = None) -> None:
    """Freeze every weight and cast the frozen models to `dtype` (LoRA weights are added later, in fp32); the VAE
    to the dtype `memory.vae_precision` (default auto) gives it: fp32 where fp16 would overflow (SDXL's VAE)."""
    from tc_lite.config import MemoryConfig
    from tc_lite.precision import vae_dtype

    for module in _modules(components):
        if module is not None:
            module.requires_grad_(False)
    _cast(components, dtype)
    cast_module(components.vae, vae_dtype(memory_cfg or MemoryConfig(), components.vae, dtype))


def _cast(components: SDComponents, dtype: torch.dtype) -> None:
    """Cast only what differs. diffusers' `.to(dtype)` warns about "modules that should be kept in float32" on
    every call, even when there are none (SD1.5's UNet and VAE); then the plain `nn.Module.to` is used, and the
    warning stays for a model that does name fp32 modules."""
    for module in _modules(components):
        if module is not None:
            cast_module(module, dtype)


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module` to `dtype`, without diffusers' fp32-modules warning when it names none (see `_cast`)."""
    if all(p.dtype == dtype for p in module.parameters()):
        return
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype=dtype)
    else:
        torch.nn.Module.to(module, dtype=dtype)


def _modules(components: SDComponents) -> tuple[torch.nn.Module | None, ...]:
    return (components.text_encoder, components.text_encoder_2, components.unet, components.vae)


def _looks_like_path(source: str) -> bool:
    """Hub ids are exactly `org/name`; anything with a file suffix, several slashes or a path prefix is a path."""
    if source.startswith(("/", "./", "../", "~", "\\")) or "\\" in source or Path(source).is_absolute():
        return True
    if source.lower().endswith((".safetensors", *PICKLE_SUFFIXES, ".json", ".yaml", ".yml")):
        return True
    return source.count("/") != 1


def _pickle_error(what: str) -> UserError:
    return UserError(
        f"{what} is a pickle checkpoint, and loading a pickle can run arbitrary code. Prefer a .safetensors version "
        "of the model; if you trust this file, set `model.allow_pickle: true` in your preset."
    )


# ---- diffusers folder --------------------------------------------------------------------------------------------


def _load_folder(folder: Path, dtype: torch.dtype, allow_pickle: bool, label: str | None = None,
                 family: str = "sd1") -> SDComponents:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    label = label or str(folder)
    _check_folder(folder, label, allow_pickle, family)
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        scheduler_class = getattr(diffusers, json.load(f).get("_class_name", ""), diffusers.DDIMScheduler)
    weights = dict(torch_dtype=dtype, use_safetensors=None if allow_pickle else True)
    encoder_class = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    try:
        parts = {sub: CLIPTokenizer.from_pretrained(str(folder / sub)) for sub in _TOKENIZERS[family]}
        parts |= {sub: encoder_class[sub].from_pretrained(str(folder), subfolder=sub, **weights)
                  for sub in _ENCODERS[family]}
        parts |= dict(unet=UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **weights),
                      vae=AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **weights),
                      scheduler=scheduler_class.from_pretrained(str(folder), subfolder="scheduler"))
    except (OSError, ValueError) as err:
        raise UserError(f"{label} could not be loaded as a diffusers {_label(family)} folder: {err}") from err
    comps = SDComponents(**parts)
    if family == "sdxl":
        index = read_json(folder / "model_index.json")
        comps.extra["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
    return comps


def _check_folder(folder: Path, label: str, allow_pickle: bool, family: str) -> None:
    from tc_lite.models.detect import UNSUPPORTED, folder_family

    found = folder_family(folder)
    if found.kind in UNSUPPORTED:
        raise UserError(found.message(label))
    if found.family not in (None, family) and found.kind != "unknown":
        raise UserError(f"{label} looks like an {_label(found.family)} model ({found.evidence}) but model.family "
                        f"is {family}; set model.family: auto (or {found.family}).")
    missing = [s for s in _subfolders(family) if not (folder / s).is_dir()]
    if missing:
        raise UserError(
            f"{label} is not a diffusers {_label(family)} pipeline folder: missing {', '.join(missing)}. Point "
            "model.source at the folder that holds model_index.json, or at a single .safetensors checkpoint."
        )
    if not allow_pickle:
        for sub in (*_ENCODERS[family], "unet", "vae"):
            files = list((folder / sub).iterdir())
            if not any(f.name.endswith(".safetensors") for f in files) and any(f.suffix == ".bin" for f in files):
                raise _pickle_error(f"{label}/{sub}")


# ---- single file -------------------------------------------------------------------------------------------------


def _load_file(path: Path, dtype: torch.dtype, config_dir: str | None, allow_pickle: bool,
               family: str = "sd1") -> SDComponents:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_error(str(path))
    elif path.suffix.lower() != ".safetensors":
        raise UserError(f"model.source: {path} is neither a .safetensors checkpoint nor a diffusers folder.")
    else:
        _check_single_file(path, family)
    label = _label(family)
    config = Path(config_dir).expanduser() if config_dir else bundled_config_dir(family)
    if not (config / "model_index.json").is_file():
        raise UserError(
            f"model.config_dir: {config} is not a diffusers config folder (no model_index.json). Point it at a "
            f"diffusers {label} model folder, or leave it unset to use the bundled base configs."
        )
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None}
    try:
        pipe = pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True,
                                               torch_dtype=dtype, **extra)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        detail = str(err).split(" If you want to instead overwrite")[0]  # diffusers' hint does not apply here
        raise UserError(
            f"{path} does not fit the {label} architecture described in {config}: {detail} If it is a model with a "
            "different architecture, set model.config_dir to a diffusers folder (configs suffice) that matches it."
        ) from err
    comps = SDComponents(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae,
                         scheduler=pipe.scheduler)
    if family == "sdxl":
        comps.tokenizer_2, comps.text_encoder_2 = pipe.tokenizer_2, pipe.text_encoder_2
        comps.extra["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    return comps


def _check_single_file(path: Path, family: str = "sd1") -> None:
    """Refuse, with a clear reason, files that diffusers would misload or fail on deep inside."""
    from safetensors import SafetensorError, safe_open

    from tc_lite.models.detect import TRAINABLE, UNSUPPORTED, keys_family

    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            conv_in_shape = f.get_slice(conv_in).get_shape() if conv_in in keys else []
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable .safetensors file ({err}); re-download it.") from err
    found = keys_family(keys)
    kind, label = found.kind, _label(family)
    if kind in UNSUPPORTED:
        raise UserError(found.message(str(path)))
    if kind in TRAINABLE and kind != family:
        raise UserError(f"{path} looks like an {_label(kind)} checkpoint but model.family is {family}; set "
                        f"model.family: auto (or {kind}).")
    if kind == "lora":
        raise UserError(f"{path} is a LoRA, not a base model. Set model.source to the {label} checkpoint it was "
                        "made for.")
    if kind == "no_unet":
        raise UserError(f"{path} has no UNet weights ({UNET_PREFIX}*): it is not a full {label} checkpoint.")
    if kind != family:
        raise UserError(f"{path} has no text encoder weights tc-lite knows (SD1.x: cond_stage_model.transformer.*, "
                        "SDXL: conditioner.embedders.*); it cannot be trained here.")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise UserError(f"{path} has no VAE weights ({VAE_PREFIX}*); use a checkpoint with a baked-in VAE.")
    if len(conv_in_shape) == 4 and conv_in_shape[1] != 4:
        raise UserError(
            f"{path} is an inpainting/instruct model (its UNet takes {conv_in_shape[1]} input channels, not 4); "
            f"use a txt2img {label} model."
        )


# ---- hub ---------------------------------------------------------------------------------------------------------


def _load_hub(repo_id: str, dtype: torch.dtype, allow_pickle: bool, revision: str | None,
              family: str = "sd1") -> SDComponents:
    folder = snapshot(repo_id, _hub_patterns(family, allow_pickle), revision=revision)
    return _load_folder(folder, dtype, allow_pickle, label=f"{repo_id} ({folder})", family=family)
