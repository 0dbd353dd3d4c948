"""Load an SD1.x pipeline's trainable pieces from whatever the user points at.

`load_components(source)` accepts "tiny", a diffusers folder, an A1111-style single `.safetensors` file, or a hub id.
Every way it can go wrong that the user can fix (missing path, pickle checkpoint, SDXL/SD2 file, hub id not cached
while offline) becomes one `UserError` naming the input and the fix; library tracebacks are for our bugs only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from tc_lite.errors import UserError
from tc_lite.models._cache import atomic_dir, cache_root
from tc_lite.models.components import SDComponents
from tc_lite.models.ldm_keys import UNET_PREFIX, VAE_PREFIX, checkpoint_family
from tc_lite.models.tokenizer import clip_tokenizer_dir

PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "sd15"  # package data: ship tc_lite/assets/**
_SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
# What a hub snapshot needs: configs, the tokenizer, full-precision safetensors weights (possibly sharded).
_HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "*/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-*-of-*.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*-of-*.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
_HUB_PICKLE_PATTERNS = [
    "text_encoder/pytorch_model.bin",
    "unet/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.bin",
]


def sd15_config_dir() -> Path:
    """A complete local diffusers config folder for SD1.5 (no weights), for offline single-file loading.

    The bundled JSONs are copied next to the generated tokenizer into the cache (the package folder may be read-only
    and the tokenizer is built at run time); the folder name carries a hash of the JSONs, so edits take effect.
    """

    def fill(folder: Path) -> None:
        shutil.copytree(_ASSETS, folder, dirs_exist_ok=True)
        shutil.copytree(clip_tokenizer_dir(), folder / "tokenizer")

    digest = hashlib.sha256()
    for file in sorted(_ASSETS.rglob("*.json")):
        digest.update(file.relative_to(_ASSETS).as_posix().encode() + b"\0" + file.read_bytes())
    return atomic_dir(cache_root() / f"sd15_config_{digest.hexdigest()[:12]}", fill)


def load_components(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    config_dir: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
) -> SDComponents:
    """Load tokenizer, text encoder, UNet, VAE and scheduler (never the safety checker) from `source`.

    `config_dir` (single files only) is a diffusers folder describing the architecture, default SD1.5's;
    `revision` applies to hub ids only; `allow_pickle` permits `.ckpt`/`.bin` files, which can run code on load.
    """
    source = str(source).strip()
    if not source:
        raise UserError("model.source is empty: set it to 'tiny', a hub id, a diffusers folder or a .safetensors file.")
    path = Path(source).expanduser()
    if revision is not None and (source == "tiny" or path.exists()):
        warnings.warn(f"model.revision={revision!r} is ignored: {source!r} is not a hub id", stacklevel=2)
    if source == "tiny":
        from tc_lite.models.tiny import build_tiny_components

        components = build_tiny_components()
        _cast(components, dtype)
    elif path.is_dir():
        components = _load_folder(path, dtype, allow_pickle)
    elif path.is_file():
        components = _load_file(path, dtype, config_dir, allow_pickle)
    elif _looks_like_path(source):
        raise UserError(f"model.source: {source!r} does not exist. Check the path (it is resolved from {os.getcwd()}).")
    else:
        components = _load_hub(source, dtype, allow_pickle, revision)
    components.source = source
    return components


def freeze_and_cast(components: SDComponents, dtype: torch.dtype) -> None:
    """Freeze every weight and cast the frozen models to `dtype` (LoRA weights are added later, in fp32)."""
    for module in (components.text_encoder, components.unet, components.vae, components.text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
    _cast(components, dtype)


def _cast(components: SDComponents, dtype: torch.dtype) -> None:
    """Cast only what differs. diffusers' `.to(dtype)` warns about "modules that should be kept in float32" on
    every call, even when there are none (SD1.5's UNet and VAE); then the plain `nn.Module.to` is used, and the
    warning stays for a model that does name fp32 modules."""
    for module in (components.text_encoder, components.unet, components.vae, components.text_encoder_2):
        if module is None or all(p.dtype == dtype for p in module.parameters()):
            continue
        if getattr(module, "_keep_in_fp32_modules", None):
            module.to(dtype=dtype)
        else:
            torch.nn.Module.to(module, dtype=dtype)


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


def _load_folder(folder: Path, dtype: torch.dtype, allow_pickle: bool, label: str | None = None) -> SDComponents:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    label = label or str(folder)
    _check_folder(folder, label, allow_pickle)
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        scheduler_class = getattr(diffusers, json.load(f).get("_class_name", ""), diffusers.DDIMScheduler)
    use_safetensors = None if allow_pickle else True
    try:
        return SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
            text_encoder=CLIPTextModel.from_pretrained(
                str(folder), subfolder="text_encoder", torch_dtype=dtype, use_safetensors=use_safetensors
            ),
            unet=UNet2DConditionModel.from_pretrained(
                str(folder), subfolder="unet", torch_dtype=dtype, use_safetensors=use_safetensors
            ),
            vae=AutoencoderKL.from_pretrained(
                str(folder), subfolder="vae", torch_dtype=dtype, use_safetensors=use_safetensors
            ),
            scheduler=scheduler_class.from_pretrained(str(folder), subfolder="scheduler"),
        )
    except (OSError, ValueError) as err:
        raise UserError(f"{label} could not be loaded as a diffusers SD1.x folder: {err}") from err


def _check_folder(folder: Path, label: str, allow_pickle: bool) -> None:
    missing = [s for s in _SUBFOLDERS if not (folder / s).is_dir()]
    if (folder / "text_encoder_2").is_dir():
        raise UserError(f"{label} looks like an SDXL model (it has text_encoder_2); this release supports SD1.x.")
    if missing:
        raise UserError(
            f"{label} is not a diffusers pipeline folder: missing {', '.join(missing)}. Point model.source at the "
            "folder that holds model_index.json, or at a single .safetensors checkpoint."
        )
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("addition_embed_type") == "text_time":
        family = "SDXL" if unet_config.get("addition_embed_type") == "text_time" else "SD2"
        raise UserError(f"{label} looks like an {family} model; this release supports SD1.x.")
    if not allow_pickle:
        for sub in ("text_encoder", "unet", "vae"):
            files = list((folder / sub).iterdir())
            if not any(f.name.endswith(".safetensors") for f in files) and any(f.suffix == ".bin" for f in files):
                raise _pickle_error(f"{label}/{sub}")


# ---- single file -------------------------------------------------------------------------------------------------


def _load_file(path: Path, dtype: torch.dtype, config_dir: str | None, allow_pickle: bool) -> SDComponents:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_error(str(path))
    elif path.suffix.lower() != ".safetensors":
        raise UserError(f"model.source: {path} is neither a .safetensors checkpoint nor a diffusers folder.")
    else:
        _check_single_file(path)
    config = Path(config_dir).expanduser() if config_dir else sd15_config_dir()
    if not (config / "model_index.json").is_file():
        raise UserError(
            f"model.config_dir: {config} is not a diffusers config folder (no model_index.json). Point it at a "
            "diffusers SD1.x model folder, or leave it unset to use the bundled SD1.5 configs."
        )
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=dtype, safety_checker=None
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        detail = str(err).split(" If you want to instead overwrite")[0]  # diffusers' hint does not apply here
        raise UserError(
            f"{path} does not fit the SD1.x architecture described in {config}: {detail} If it is a model with a "
            "different architecture, set model.config_dir to a diffusers folder (configs suffice) that matches it."
        ) from err
    return SDComponents(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae, scheduler=pipe.scheduler
    )


def _check_single_file(path: Path) -> None:
    """Refuse, with a clear reason, files that diffusers would misload or fail on deep inside."""
    from safetensors import SafetensorError, safe_open

    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            conv_in_shape = f.get_slice(conv_in).get_shape() if conv_in in keys else []
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable .safetensors file ({err}); re-download it.") from err
    family = checkpoint_family(keys)
    if family in ("sdxl", "sd2"):
        name = {"sdxl": "an SDXL", "sd2": "an SD2 (OpenCLIP text encoder)"}[family]
        raise UserError(f"{path} looks like {name} checkpoint; this release supports SD1.x.")
    if family == "lora":
        raise UserError(
            f"{path} is a LoRA, not a base model. Set model.source to the SD1.x checkpoint it was made for."
        )
    if family == "no_unet":
        raise UserError(f"{path} has no UNet weights ({UNET_PREFIX}*): it is not a full SD1.x checkpoint.")
    if family != "sd1":
        raise UserError(f"{path} has no CLIP text encoder (cond_stage_model.transformer.*); it cannot be trained here.")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise UserError(f"{path} has no VAE weights ({VAE_PREFIX}*); use a checkpoint with a baked-in VAE.")
    if len(conv_in_shape) == 4 and conv_in_shape[1] != 4:
        raise UserError(
            f"{path} is an inpainting/instruct model (its UNet takes {conv_in_shape[1]} input channels, not 4); "
            "use a txt2img SD1.x model."
        )


# ---- hub ---------------------------------------------------------------------------------------------------------


def _hub_cache_dir() -> str:
    """Read at call time (huggingface_hub reads its environment only at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_hub(repo_id: str, dtype: torch.dtype, allow_pickle: bool, revision: str | None) -> SDComponents:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _hub_offline()
    patterns = _HUB_PATTERNS + (_HUB_PICKLE_PATTERNS if allow_pickle else [])
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=_hub_cache_dir(), local_files_only=offline, allow_patterns=patterns
        )
    except GatedRepoError as err:
        raise UserError(
            f"model.source: {repo_id!r} is gated. Accept its licence on huggingface.co, then run `hf auth login`."
        ) from err
    except RepositoryNotFoundError as err:
        raise UserError(
            f"model.source: {repo_id!r} is neither a local path nor a model on the Hugging Face hub (check the "
            "spelling; private repos need `hf auth login`)."
        ) from err
    except RevisionNotFoundError as err:
        raise UserError(f"model.revision: {revision!r} does not exist in {repo_id!r}.") from err
    except LocalEntryNotFoundError as err:
        how = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "it could not be downloaded"
        raise UserError(
            f"model.source: {repo_id!r} is not a local path, and {how} ({_hub_cache_dir()}). Download it once with "
            f"`{download}` (or run once with network access), or point model.source at a local folder or file."
        ) from err
    return _load_folder(Path(folder), dtype, allow_pickle, label=f"{repo_id} ({folder})")
