"""Shapes of the models a preset names, without their weights: what the memory estimator builds on 'meta'.

The diffusion model comes from the configs the user's source already carries (a diffusers folder, a hub snapshot
in the local cache, `model.config_dir`) or, failing that, from the SD1.5 configs bundled with tc-lite -- so the
estimate needs no download. Reward models are described by their published architectures (CLIP ViT-L/14 for the
aesthetic predictor and CLIP score, OpenCLIP ViT-H/14 for PickScore and HPSv2); their weights never matter here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tc_lite.config import Config, RewardTerm

# CLIP towers as transformers CLIPConfig keyword arguments. ViT-H/14 is LAION's OpenCLIP model (PickScore is a
# transformers CLIPModel of exactly this shape; HPSv2 is the same network in open_clip's module layout).
VIT_L_14: dict[str, Any] = {
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "patch_size": 14, "image_size": 224, "hidden_act": "quick_gelu"},
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu"},
    "projection_dim": 768,
}
VIT_H_14: dict[str, Any] = {
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                          "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu"},
    "projection_dim": 1024,
}
CLIP_ARCHITECTURES = {"ViT-L/14": VIT_L_14, "ViT-H/14": VIT_H_14}


@dataclass(frozen=True)
class RewardShape:
    """What a reward puts on the device while it scores.

    `clip`: the CLIP architecture name, or None for a weight-free reward. `text_tower`: whether the text tower is
    part of the offloaded module (CLIP score, PickScore, HPSv2) or dropped (aesthetic). `head`: the aesthetic MLP.
    `preprocess`: "crop" (CLIP/PickScore/aesthetic) or "pad" (HPSv2). `share_key`: rewards with the same key hold
    one vision tower (aesthetic and clip on the same OpenAI CLIP, as `rewards.loading.share_vision` arranges).
    """

    label: str
    kind: str
    clip: str | None
    text_tower: bool = True
    head: bool = False
    preprocess: str = "crop"
    share_key: str | None = None


_BUILTIN_REWARDS = {
    "aesthetic": {"clip": "ViT-L/14", "text_tower": False, "head": True},
    "clip": {"clip": "ViT-L/14"},
    "pickscore": {"clip": "ViT-H/14"},
    "hpsv2": {"clip": "ViT-H/14", "preprocess": "pad"},
    "hpsv21": {"clip": "ViT-H/14", "preprocess": "pad"},
    "color": {"clip": None},
}


def reward_shape(label: str, term: RewardTerm) -> RewardShape | None:
    """The shape of a configured reward, or None when it cannot be known (a custom reward class)."""
    kind = (term.type or label).strip()
    known = _BUILTIN_REWARDS.get(kind.lower())
    if known is None:
        return None
    spec = dict(known)
    model = term.args.get("clip_model", term.args.get("model"))  # a user-chosen CLIP
    named = str(model or "").lower()
    if spec["clip"] is not None and ("vit-h" in named or "h-14" in named):
        spec["clip"] = "ViT-H/14"
    elif spec["clip"] is not None and ("vit-l" in named or "l-14" in named):
        spec["clip"] = "ViT-L/14"
    if kind.lower() in ("aesthetic", "clip"):
        spec["share_key"] = str(model or "openai/clip-vit-large-patch14")
    return RewardShape(label=label, kind=kind, **spec)


@dataclass
class Architecture:
    """Configs of the diffusion model's parts, and where they came from (printed with every estimate).

    `text_encoders` maps the family's encoder slot names ("te"; SDXL "te1", "te2") to their configs."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: dict[str, dict[str, Any]]
    source: str
    notes: list[str] = field(default_factory=list)


def _read_folder(folder: Path, encoders: dict[str, str]) -> tuple[dict, dict, dict] | None:
    try:
        unet, vae = (json.loads((folder / sub / "config.json").read_text()) for sub in ("unet", "vae"))
        tes = {slot: json.loads((folder / sub / "config.json").read_text()) for slot, sub in encoders.items()}
    except (OSError, ValueError):
        return None
    return unet, vae, tes


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a cached hub model (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "unet/config.json", revision=revision)
    return Path(found).parent.parent if isinstance(found, str) else None


def read_architecture(cfg: Config, encoders: dict[str, str], bundled: Path, label: str) -> Architecture:
    """Configs for `model.source` (a folder, a cached hub snapshot, `model.config_dir`); the `bundled` configs of
    the family (`label`) when the source does not carry its own offline. `encoders`: slot name -> subfolder."""
    source = cfg.model.source
    path = Path(source).expanduser()
    notes: list[str] = []
    folder: Path | None = None
    if path.is_dir():
        folder = path
    elif path.is_file() and cfg.model.config_dir:
        folder = Path(cfg.model.config_dir).expanduser()
    elif not path.exists() and source.count("/") == 1:
        folder = _hub_snapshot(source, cfg.model.revision)
        if folder is None:
            notes.append(f"{source} is not in the local hub cache: assumed the {label} architecture")
    if folder is not None:
        parts = _read_folder(folder, encoders)
        if parts is not None:
            return _with_vae(cfg, Architecture(*parts, source=str(folder), notes=notes))
        notes.append(f"{folder} has no readable unet/vae/text encoder configs: assumed the {label} architecture")
    parts = _read_folder(bundled, encoders)
    assert parts is not None, f"the bundled {label} configs are part of the package"
    return _with_vae(cfg, Architecture(*parts, source=f"bundled {label} configs", notes=notes))


# Published VAE configs' differences from the model's own VAE, for replacements not in the local cache: the
# fp16-fix VAE is SDXL's architecture with `force_upcast: false` (it was finetuned to stay finite in fp16).
KNOWN_VAES: dict[str, dict[str, Any]] = {"madebyollin/sdxl-vae-fp16-fix": {"force_upcast": False}}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _with_vae(cfg: Config, arch: Architecture) -> Architecture:
    """`model.vae`'s config in place of the model's (what decides `memory.vae_precision: auto`): from a VAE folder
    or a cached hub snapshot; a single file carries none and keeps the model's (as `models.vae` loads it)."""
    source = getattr(cfg.model, "vae", None)
    if not source:
        return arch
    path = Path(str(source)).expanduser()
    found: dict[str, Any] | None = None
    if path.is_dir():
        found = _json(path / "config.json") or _json(path / "vae" / "config.json")
    elif not path.exists() and str(source).count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(source), "config.json")
        except ImportError:
            cached = None
        found = _json(Path(cached)) if isinstance(cached, str) else None
        if found is None and source in KNOWN_VAES:
            found = {**arch.vae, **KNOWN_VAES[source]}
            arch.notes.append(f"model.vae={source} is not in the local hub cache: its published config assumed")
    if found is None:
        arch.notes.append(f"model.vae={source}: no config readable offline; the model's own VAE config assumed")
        return arch
    arch.vae = found
    return arch


def resolve_architecture(cfg: Config) -> Architecture:
    """The architecture of `model.source`, as its family reads it (no weights, no download)."""
    from tc_lite.families import family_for

    return family_for(cfg.model).architecture(cfg)
