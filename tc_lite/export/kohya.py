"""The kohya ``.safetensors`` LoRA (the main output, what A1111/ComfyUI/diffusers load) and the kohya state dict
every other export goes through: its metadata, writing, reading, dtype checks and module grouping."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tc_lite import __version__
from tc_lite.errors import UserError
from tc_lite.io import save_safetensors_atomic
from tc_lite.lora import KOHYA_TE_PREFIX, _parse_kohya, kohya_state_dict

# kohya's ss_base_model_version -> ModelSpec architecture (sd-scripts library/sai_model_spec.py) and the
# implementation string kohya writes for a LoRA of that family.
_ARCHITECTURES = {
    "sd_v1": ("stable-diffusion-v1", "diffusers"),
    "sdxl_base_v1-0": ("stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"),
}
_KNOWN_PREFIXES = ("ss_", "sshs_", "modelspec.", "tc_lite_")
USAGE_HINT = (
    "Text-encoder-only LoRA. A1111: <lora:{name}:1> in the prompt. ComfyUI: LoraLoader with strength_clip "
    "(LoraLoaderModelOnly ignores text-encoder LoRAs)."
)
# What the file changes -> (usage hint, training comment, tc_lite_component). A1111's <lora:name:w> sets both its
# multipliers (te and unet; <lora:name:te:unet> sets each); ComfyUI's LoraLoader applies strength_clip to text-encoder
# keys and strength_model to UNet keys, LoraLoaderModelOnly the UNet keys only.
PARTS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("text_encoder",): (
        USAGE_HINT,
        "TextCraftor-style reward fine-tuning of the text encoder only (tc-lite); the UNet is unchanged.",
        "text_encoder"),
    ("unet",): (
        "UNet-only LoRA. A1111: <lora:{name}:1> in the prompt. ComfyUI: LoraLoaderModelOnly, or LoraLoader with "
        "strength_model (it has no text-encoder part).",
        "Reward fine-tuning of a UNet LoRA (tc-lite); the text encoder is unchanged.",
        "unet"),
    ("text_encoder", "unet"): (
        "Text-encoder and UNet LoRA. A1111: <lora:{name}:1> in the prompt applies both (<lora:{name}:TE:UNET> "
        "weighs each). ComfyUI: LoraLoader, strength_clip for the text encoder and strength_model for the UNet "
        "(LoraLoaderModelOnly applies only the UNet part).",
        "TextCraftor-style reward fine-tuning of the text encoder and a UNet LoRA (the paper's Text+UNet; tc-lite).",
        "text_encoder+unet"),
}


DYNAMIC = "Dynamic"  # kohya's ss_network_dim/alpha when modules differ (networks/resize_lora.py)


def _lr_str(lr: float | Sequence[float]) -> str:
    if isinstance(lr, int | float):
        return str(float(lr))
    values = [float(x) for x in lr]
    return str(values[0]) if len(set(values)) == 1 else str(values)


def kohya_dims(sd: Mapping[str, torch.Tensor]) -> tuple[int | str, float | str]:
    """(ss_network_dim, ss_network_alpha) of a kohya state dict: the common rank and alpha, or ``"Dynamic"``."""
    downs = {k.removesuffix(".lora_down.weight"): v for k, v in sd.items() if k.endswith(".lora_down.weight")}
    ranks = {int(v.shape[0]) for v in downs.values()}
    # a module without .alpha has alpha = rank, as A1111/ComfyUI/diffusers read it
    alphas = {float(sd[m + ".alpha"].item()) if m + ".alpha" in sd else float(v.shape[0]) for m, v in downs.items()}
    return (next(iter(ranks)) if len(ranks) == 1 else DYNAMIC, next(iter(alphas)) if len(alphas) == 1 else DYNAMIC)


def _str(value: Any) -> str:
    """Metadata values must be strings; containers go in as JSON so other tools can parse them back."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def kohya_metadata(
    *,
    output_name: str,
    rank: int | str,
    alpha: float | str,
    lr: float,
    seed: int,
    steps: int,
    mixed_precision: str,
    optimizer: str,
    base_model_version: str = "sd_v1",
    base_model: str | None = None,
    text_encoder_lr: float | Sequence[float] | None = None,
    unet_lr: float | None = None,
    parts: Sequence[str] = ("text_encoder",),
    dropout: float | None = None,
    resolution: int | tuple[int, int] | None = 512,
    training_started_at: float | None = None,
    title: str | None = None,
    description: str | None = None,
    comment: str | None = None,
    timestamp: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` + ModelSpec metadata for a LoRA on ``parts`` (``text_encoder``, ``unet`` or both); every
    value a string.

    ``rank``/``alpha`` may be ``"Dynamic"`` when modules differ (SDXL's te1 and te2 at different ranks), as
    sd-scripts' ``networks/resize_lora.py`` writes them; :func:`kohya_dims` computes both from the weights.
    ``text_encoder_lr`` (default ``lr``): one value, or one per trained encoder, written as kohya's
    ``train_network.py`` writes ``args.text_encoder_lr`` (``str`` of the list) for networks with several.
    With a UNet part, ``ss_unet_lr`` is ``unet_lr`` (default ``lr``), as kohya writes ``args.unet_lr``; without a
    text-encoder part ``ss_text_encoder_lr`` is ``"None"``, what kohya writes when none was set. kohya keeps no key
    saying which parts it trained (``--network_train_unet_only`` is not in its metadata): the keys say it, and our
    ``tc_lite_component`` repeats it.
    A1111 reads ``ss_base_model_version``/``ss_v2`` to decide SD1/SD2/SDXL (no metadata = "Unknown", hidden by its
    version filter) and ``ss_output_name`` for the alias. ``extra`` keys without a known prefix get ``tc_lite_``
    so they can never shadow a kohya/ModelSpec key; dict/list values are stored as JSON.
    """
    if base_model_version not in _ARCHITECTURES:
        raise UserError(
            f"export: base_model_version {base_model_version!r} is not supported; use one of {sorted(_ARCHITECTURES)}"
        )
    key = tuple(p for p in ("text_encoder", "unet") if p in parts)
    if key not in PARTS or len(key) != len(parts):
        raise ValueError(f"parts {list(parts)}: name text_encoder and/or unet")
    hint, default_comment, component = PARTS[key]
    arch, implementation = _ARCHITECTURES[base_model_version]
    ts = time.time() if timestamp is None else float(timestamp)
    date = _dt.datetime.fromtimestamp(int(ts), tz=_dt.timezone.utc).isoformat()
    meta: dict[str, str] = {
        # kohya / A1111
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank if rank == DYNAMIC else str(int(rank)),
        "ss_network_alpha": alpha if alpha == DYNAMIC else str(float(alpha)),
        "ss_base_model_version": base_model_version,
        "ss_v2": "False",
        "ss_output_name": output_name,
        "ss_learning_rate": str(float(lr)),
        "ss_text_encoder_lr": (_lr_str(lr if text_encoder_lr is None else text_encoder_lr) if "text_encoder" in key
                               else "None"),
        **({"ss_unet_lr": _lr_str(lr if unet_lr is None else unet_lr)} if "unet" in key else {}),
        "ss_seed": str(int(seed)),
        "ss_steps": str(int(steps)),
        "ss_mixed_precision": str(mixed_precision),
        "ss_optimizer": str(optimizer),
        "ss_training_finished_at": str(ts),
        "ss_training_comment": comment or default_comment,
        # ModelSpec, as sd-scripts writes it for a LoRA
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title or output_name,
        "modelspec.date": date,
        "modelspec.prediction_type": "epsilon",
        "modelspec.implementation_version": f"tc-lite/{__version__}",
        "modelspec.usage_hint": hint.format(name=output_name),
        # ours
        "tc_lite_version": __version__,
        "tc_lite_method": "textcraftor",
        "tc_lite_component": component,
    }
    if resolution is not None:  # (width, height), as kohya writes it; a single number is square
        w, h = (resolution, resolution) if isinstance(resolution, int | float) else resolution
        meta["ss_resolution"] = f"({int(w)}, {int(h)})"
        meta["modelspec.resolution"] = f"{int(w)}x{int(h)}"
    if training_started_at is not None:  # A1111 shows it as "date trained"
        meta["ss_training_started_at"] = str(float(training_started_at))
    if dropout is not None:
        meta["ss_network_dropout"] = str(float(dropout))
    if base_model:
        meta["ss_sd_model_name"] = str(base_model)
    if description:
        meta["modelspec.description"] = description
    for key, value in (extra or {}).items():
        k = str(key)
        meta[k if k.startswith(_KNOWN_PREFIXES) else f"tc_lite_{k}"] = _str(value)
    return meta


_TE2_ATTENTION = re.compile(r"^lora_te2_text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj\.")


def a1111_skipped_layers(sd: Mapping[str, torch.Tensor]) -> list[int]:
    """SDXL te2 layers whose attention LoRA A1111 silently skips: its OpenCLIP embedder fuses q/k/v into one
    ``in_proj`` and ``networks.network_apply_weights`` patches it only when q, k, v AND out_proj are all in the file
    (ComfyUI and diffusers apply any subset)."""
    have: dict[int, set[str]] = {}
    for key in sd:
        if m := _TE2_ATTENTION.match(key):
            have.setdefault(int(m[1]), set()).add(m[2])
    return sorted(layer for layer, projs in have.items() if projs != {"q", "k", "v", "out"})


def a1111_warning(sd: Mapping[str, torch.Tensor]) -> str | None:
    skipped = a1111_skipped_layers(sd)
    if not skipped:
        return None
    return (f"warning: A1111 ignores te2's attention LoRA in {len(skipped)} layer(s) (first: {skipped[0]}): it "
            "patches OpenCLIP's fused attention only when q_proj, k_proj, v_proj and out_proj are all trained. "
            "ComfyUI and diffusers apply it; for A1111 train with all four in lora.targets")


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precomputes them, so A1111 need not hash the file itself.

    The model hash is SHA-256 of the tensor data section, which does not depend on the metadata; the legacy hash
    follows kohya in hashing a fixed window of the file serialised with only the ``ss_*`` metadata.
    """
    from safetensors.torch import save

    blob = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def export_kohya(
    text_encoder: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str],
    save_dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the encoder's LoRA to ``path`` (kohya format, atomic) and return the path; see :func:`write_kohya`."""
    sd = kohya_state_dict(text_encoder)
    if not sd:
        raise UserError(
            "export: the text encoder has no LoRA to export (full fine-tuning runs save the whole encoder instead)"
        )
    return write_kohya(sd, path, metadata=metadata, save_dtype=save_dtype)


def write_kohya(
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str],
    save_dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a kohya state dict (as :func:`tc_lite.lora.kohya_state_dict` makes it) to ``path``, atomically.

    Weights are saved in ``save_dtype`` (fp16 like kohya: half the size, and the loaders upcast); alpha stays an
    fp32 scalar so a non-integer alpha is not rounded. Refuses to write NaN/inf, including values that only
    overflow when cast to fp16, and metadata whose dim/alpha contradict the weights.
    """
    dest = Path(path)
    if dest.suffix != ".safetensors":
        raise UserError(
            f"export path {str(dest)!r} must end in .safetensors (A1111 and ComfyUI only list .safetensors LoRAs)"
        )
    _check_dtype(save_dtype)
    if not sd:
        raise UserError("export: no LoRA weights to write")
    out = _cast_lora(sd, save_dtype, dest.name)

    meta = {str(k): _str(v) for k, v in metadata.items()}
    dim, alpha = kohya_dims(sd)
    if "ss_network_dim" in meta and meta["ss_network_dim"] != str(dim):
        raise ValueError(f"metadata ss_network_dim={meta['ss_network_dim']} but the LoRA's rank is {dim}")
    said = meta.get("ss_network_alpha", str(alpha))
    if (said == DYNAMIC) != (alpha == DYNAMIC) or (alpha != DYNAMIC and not math.isclose(float(said), float(alpha),
                                                                                         rel_tol=1e-6)):
        raise ValueError(f"metadata ss_network_alpha={said} but the LoRA's alpha is {alpha}")
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(out, meta)
    return save_safetensors_atomic(out, dest, meta)


def _check_dtype(save_dtype: torch.dtype) -> None:
    if save_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UserError(f"export: save_dtype {save_dtype} is not supported; use float16, bfloat16 or float32")


def _cast_lora(sd: Mapping[str, torch.Tensor], save_dtype: torch.dtype, name: str) -> dict[str, torch.Tensor]:
    """Cast weights (not alphas) to ``save_dtype``; refuse NaN/inf before and after the cast."""
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(
            f"export: refusing to write {name}: {len(bad)} LoRA tensor(s) contain NaN/inf (first: {bad[0]}). "
            "Training diverged; resume from an earlier checkpoint or lower the learning rate."
        )
    out = {k: (v.float() if k.endswith(".alpha") else v.to(save_dtype)).contiguous() for k, v in sd.items()}
    overflow = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if overflow:
        raise UserError(
            f"export: {len(overflow)} LoRA tensor(s) overflow {save_dtype} (first: {overflow[0]}); "
            "save with save_dtype=float32."
        )
    return out


def read_kohya(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file (tensors on CPU, metadata) with a clear error for missing or corrupt files."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"LoRA file {str(p)!r} does not exist; pass the path of a .safetensors LoRA")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own error types for truncated/non-safetensors files
        raise UserError(f"LoRA file {str(p)!r} is not a readable .safetensors file ({e}); re-export it") from e
    return tensors, metadata


# =================================================================================================================
# The intermediates. Every format goes through one per kind, so any source exports to any target:
#   a LoRA      -> a kohya state dict (canonical names, real alpha), as kohya_state_dict() makes it;
#   an encoder  -> a state dict with canonical ``text_model.…`` names (the layout of every SD1 checkpoint and of
#                  transformers < 5.6), whatever module tree the installed transformers builds.
# =================================================================================================================

CANONICAL_PREFIX = "text_model."
_TARGET_ORDER = {t: i for i, t in enumerate(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UserError(f"save precision {name!r} is unknown; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _kohya_module(layer: int, block: str, proj: str, prefix: str = KOHYA_TE_PREFIX) -> str:
    return f"{prefix}_text_model_encoder_layers_{layer}_{block}_{proj}"


def _canonical_module(layer: int, block: str, proj: str) -> str:
    return f"{CANONICAL_PREFIX}encoder.layers.{layer}.{block}.{proj}"


def lora_groups(sd: Mapping[str, torch.Tensor], source: str = "LoRA") -> list[tuple[tuple[int, str, str], torch.Tensor, torch.Tensor, float]]:
    """[((layer, block, proj), down [r,in], up [out,r], alpha)] of a kohya state dict of ONE text encoder (any
    prefix; :func:`tc_lite.export.slots.split_lora` splits an SDXL file by encoder), in layer/module order.

    Validates the keys (``UserError`` naming ``source``); a missing alpha means alpha = rank, as A1111/ComfyUI read it.
    """
    from tc_lite.export.slots import split_lora

    encoders = split_lora(sd, source)
    if len(encoders) != 1:
        raise UserError(f"{source}: holds the LoRAs of {len(encoders)} text encoders "
                        f"({', '.join(f.prefix for f in encoders)}); this step takes one encoder's")
    groups = _parse_kohya(sd, source, next(iter(encoders)).prefix)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], _TARGET_ORDER[k[2]])):
        parts = groups[key]
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        out.append((key, down, up, alpha))
    return out


def _uniform_rank(groups: list, source: str) -> int:
    ranks = sorted({int(down.shape[0]) for _, down, _, _ in groups})
    if len(ranks) != 1:
        raise UserError(f"{source}: modules have different ranks {ranks}; peft/diffusers exports need one rank")
    return ranks[0]
