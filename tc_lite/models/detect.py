"""Which model family `model.source` is, from configs and key names alone (no weights loaded, no download).

Answers "sd1", "sdxl", or a kind tc-lite cannot train ("sd2", "sdxl_refiner", "sd3", "flux", ...) with a
message naming what was found, so `model.family: auto` either picks the family or fails with one clear line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TRAINABLE = ("sd1", "sdxl")

# kind -> why it cannot be trained (completes "<source> looks like ...")
UNSUPPORTED = {
    "sd2": "an SD2 model (one OpenCLIP ViT-H text encoder); tc-lite trains SD1.x and SDXL base models",
    "sdxl_refiner": ("the SDXL refiner (only the OpenCLIP text encoder, aesthetic-score conditioning); train the SDXL "
                     "base model instead (stabilityai/stable-diffusion-xl-base-1.0 or an SDXL base fine-tune)"),
    "sd3": "a Stable Diffusion 3 model (MMDiT with three text encoders); tc-lite trains SD1.x and SDXL",
    "flux": "a FLUX model (a transformer with T5 + CLIP encoders); tc-lite trains SD1.x and SDXL",
}


@dataclass(frozen=True)
class Detection:
    family: str | None  # "sd1" | "sdxl", or None when nothing trainable was recognised
    kind: str  # what was found: a family, one of UNSUPPORTED, or "unknown"
    evidence: str = ""  # for messages: which config or key decided

    def message(self, source: str) -> str:
        return f"model.source: {source} looks like {UNSUPPORTED[self.kind]} ({self.evidence})."


def detect_family(source: str, revision: str | None = None) -> Detection:
    source = str(source).strip()
    if source == "tiny":
        return Detection("sd1", "sd1", "the built-in tiny model")
    if source == "tiny-sdxl":
        return Detection("sdxl", "sdxl", "the built-in tiny SDXL model")
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_family(path)
    if path.is_file():
        return file_family(path)
    return hub_family(source, revision)


def _found(kind: str, evidence: str) -> Detection:
    return Detection(kind if kind in TRAINABLE else None, kind, evidence)


def folder_family(folder: Path) -> Detection:
    index = read_json(folder / "model_index.json")
    cls = str(index.get("_class_name", ""))
    if "StableDiffusion3" in cls or (folder / "text_encoder_3").is_dir():
        return _found("sd3", f"model_index.json: {cls or 'text_encoder_3'}")
    if "Flux" in cls:
        return _found("flux", f"model_index.json: {cls}")
    if (folder / "text_encoder_2").is_dir():
        if not (folder / "text_encoder").is_dir() or index.get("requires_aesthetics_score"):
            return _found("sdxl_refiner", "text_encoder_2 without text_encoder" if not (folder / "text_encoder").is_dir()
                          else "model_index.json: requires_aesthetics_score")
        return _found("sdxl", "it has text_encoder and text_encoder_2")
    unet = read_json(folder / "unet" / "config.json")
    if unet.get("addition_embed_type") == "text_time":
        return _found("sdxl", "unet/config.json: addition_embed_type text_time")
    if unet.get("cross_attention_dim") == 1024:
        return _found("sd2", "unet/config.json: cross_attention_dim 1024")
    return Detection("sd1", "sd1" if unet else "unknown", "diffusers folder")


def file_family(path: Path) -> Detection:
    if path.suffix.lower() != ".safetensors":
        return Detection("sd1", "unknown", "not a safetensors file")  # the SD1 loader explains pickles
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - an unreadable file is the loader's message to give
        return Detection("sd1", "unknown", "unreadable")
    return keys_family(keys)


def keys_family(keys: list[str]) -> Detection:
    """A single file's family from its key names (`ldm_keys.checkpoint_family`), with the keys that decided."""
    from tc_lite.models.ldm_keys import checkpoint_family

    kind = checkpoint_family(keys)
    evidence = {"sdxl": "conditioner.embedders.* keys", "sdxl_refiner": "only conditioner.embedders.0.model.* keys",
                "sd3": "joint_blocks.* keys", "flux": "double_blocks.* keys",
                "sd2": "cond_stage_model.model.* keys"}.get(kind, "its keys")
    if kind in TRAINABLE or kind in UNSUPPORTED:
        return _found(kind, evidence)
    return Detection("sd1", kind, evidence)  # lora / no_unet / unknown: the SD1 loader names the problem


def hub_family(repo_id: str, revision: str | None = None) -> Detection:
    """A hub id: its cached configs when the snapshot is local, else its name (the loader checks again once the
    configs are downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a valid repo id: the loader explains
        found = None
    if isinstance(found, str):
        return folder_family(Path(found).parent)
    name = repo_id.lower()
    for needle, kind in (("refiner", "sdxl_refiner"), ("stable-diffusion-3", "sd3"), ("flux", "flux"),
                         ("xl", "sdxl"), ("stable-diffusion-2", "sd2")):
        if needle in name:
            return _found(kind, f"its name contains {needle!r}; set model.family if that is wrong")
    return Detection("sd1", "sd1", "hub id")


def read_json(path: Path) -> dict:
    """A JSON config as a dict; {} when it is missing or unreadable (the caller decides what that means)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
