"""Export what training made, in every format people load: kohya, peft, diffusers, and a merged text encoder.

- kohya ``.safetensors`` (the main output): what A1111 (``<lora:name:w>``), ComfyUI (``LoraLoader``, strength_clip)
  and diffusers (``pipe.load_lora_weights``) all load. Names are canonical ``lora_te_text_model_encoder_layers_…``
  whatever transformers is installed, alpha is the real alpha (not the rank), and the metadata carries the ``ss_*``
  keys A1111 reads to file the LoRA under SD1 with the right alias (DESIGN §3).
- peft adapter folder and diffusers ``pytorch_lora_weights.safetensors``: for Python users of those libraries.
- a merged encoder (``text_model.…`` names): for tools that swap text encoders, and the natural output of a full
  fine-tune, which can also be turned into a LoRA by truncated SVD (:func:`extract_lora`, error reported).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tc_lite import __version__
from tc_lite.errors import UserError
from tc_lite.io import save_json_atomic, save_safetensors_atomic
from tc_lite.lora import (
    DEFAULT_TARGETS,
    KOHYA_TE_PREFIX,
    _parse_kohya,
    kohya_state_dict,
)

__all__ = [
    "Extraction",
    "canonical_encoder_key",
    "encoder_state_dict",
    "export_diffusers",
    "export_encoder",
    "export_kohya",
    "export_peft",
    "extract_lora",
    "kohya_metadata",
    "load_encoder_weights",
    "lora_groups",
    "merge_lora",
    "read_kohya",
    "read_tuned",
    "safetensors_hashes",
    "update_retention",
    "write_kohya",
]

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
    rank: int,
    alpha: float,
    lr: float,
    seed: int,
    steps: int,
    mixed_precision: str,
    optimizer: str,
    base_model_version: str = "sd_v1",
    base_model: str | None = None,
    dropout: float | None = None,
    resolution: int | None = 512,
    title: str | None = None,
    description: str | None = None,
    comment: str | None = None,
    timestamp: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` + ModelSpec metadata for a text-encoder LoRA; every value a string.

    A1111 reads ``ss_base_model_version``/``ss_v2`` to decide SD1/SD2/SDXL (no metadata = "Unknown", hidden by its
    version filter) and ``ss_output_name`` for the alias. ``extra`` keys without a known prefix get ``tc_lite_``
    so they can never shadow a kohya/ModelSpec key; dict/list values are stored as JSON.
    """
    if base_model_version not in _ARCHITECTURES:
        raise UserError(
            f"export: base_model_version {base_model_version!r} is not supported; use one of {sorted(_ARCHITECTURES)}"
        )
    arch, implementation = _ARCHITECTURES[base_model_version]
    ts = time.time() if timestamp is None else float(timestamp)
    date = _dt.datetime.fromtimestamp(int(ts), tz=_dt.timezone.utc).isoformat()
    meta: dict[str, str] = {
        # kohya / A1111
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": base_model_version,
        "ss_v2": "False",
        "ss_output_name": output_name,
        "ss_learning_rate": str(float(lr)),
        "ss_text_encoder_lr": str(float(lr)),
        "ss_seed": str(int(seed)),
        "ss_steps": str(int(steps)),
        "ss_mixed_precision": str(mixed_precision),
        "ss_optimizer": str(optimizer),
        "ss_training_finished_at": str(ts),
        "ss_training_comment": comment
        or "TextCraftor-style reward fine-tuning of the text encoder only (tc-lite); the UNet is unchanged.",
        # ModelSpec, as sd-scripts writes it for a LoRA
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title or output_name,
        "modelspec.date": date,
        "modelspec.prediction_type": "epsilon",
        "modelspec.implementation_version": f"tc-lite/{__version__}",
        "modelspec.usage_hint": USAGE_HINT.format(name=output_name),
        # ours
        "tc_lite_version": __version__,
        "tc_lite_method": "textcraftor",
        "tc_lite_component": "text_encoder",
    }
    if resolution is not None:
        meta["ss_resolution"] = f"({int(resolution)}, {int(resolution)})"
        meta["modelspec.resolution"] = f"{int(resolution)}x{int(resolution)}"
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
    ranks = {int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v.item()) for k, v in sd.items() if k.endswith(".alpha")}
    if "ss_network_dim" in meta and len(ranks) == 1 and int(meta["ss_network_dim"]) != next(iter(ranks)):
        raise ValueError(f"metadata ss_network_dim={meta['ss_network_dim']} but the LoRA has rank {ranks}")
    if "ss_network_alpha" in meta and len(alphas) == 1 and not math.isclose(
        float(meta["ss_network_alpha"]), next(iter(alphas)), rel_tol=1e-6
    ):
        raise ValueError(f"metadata ss_network_alpha={meta['ss_network_alpha']} but the LoRA has alpha {alphas}")
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
# Other formats. Everything goes through one intermediate per kind, so any source exports to any target:
#   a LoRA      -> a kohya state dict (canonical names, real alpha), as kohya_state_dict() makes it;
#   an encoder  -> a state dict with canonical ``text_model.…`` names (the layout of every SD1 checkpoint and of
#                  transformers < 5.6), whatever module tree the installed transformers builds.
# =================================================================================================================

CANONICAL_PREFIX = "text_model."
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
_DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_TARGET_ORDER = {t: i for i, t in enumerate(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))}
# peft / diffusers LoRA keys, with or without their prefixes and an adapter name, old or new module tree.
_PEFT_KEY_RE = re.compile(
    r"^(?:text_encoder\.|base_model\.model\.)?(?:text_model\.)?encoder\.layers\.(?P<layer>\d+)\."
    r"(?P<block>self_attn|mlp)\.(?P<proj>\w+)\.lora_(?P<ab>A|B)(?:\.[\w-]+)?\.weight$"
)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UserError(f"save precision {name!r} is unknown; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _kohya_module(layer: int, block: str, proj: str) -> str:
    return f"{KOHYA_TE_PREFIX}_text_model_encoder_layers_{layer}_{block}_{proj}"


def _canonical_module(layer: int, block: str, proj: str) -> str:
    return f"{CANONICAL_PREFIX}encoder.layers.{layer}.{block}.{proj}"


def lora_groups(sd: Mapping[str, torch.Tensor], source: str = "LoRA") -> list[tuple[tuple[int, str, str], torch.Tensor, torch.Tensor, float]]:
    """[((layer, block, proj), down [r,in], up [out,r], alpha)] of a kohya state dict, in layer/module order.

    Validates the keys (``UserError`` naming ``source``); a missing alpha means alpha = rank, as A1111/ComfyUI read it.
    """
    groups = _parse_kohya(sd, source)
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


# --------------------------------------------------------------------------------------------------- encoder names


def canonical_encoder_key(name: str) -> str:
    """``encoder.layers.0…`` / ``base_model.model.encoder…`` / ``text_encoder.text_model…`` -> ``text_model.…``."""
    for prefix in ("text_encoder.", "base_model.model."):
        name = name.removeprefix(prefix)
    name = name.replace(".base_layer.", ".")
    return name if name.startswith(CANONICAL_PREFIX) else CANONICAL_PREFIX + name


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


# --------------------------------------------------------------------------------------------------- reading


def read_tuned(source: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """Read any tc-lite output as ("lora", kohya state dict) or ("encoder", canonical encoder state dict).

    Accepts a kohya ``.safetensors``, a diffusers LoRA (file, or folder holding ``pytorch_lora_weights.safetensors``),
    a peft adapter folder (or its ``adapter_model.safetensors``), a merged / full fine-tuned encoder file or folder,
    or an in-memory state dict of any of these. Anything else is a ``UserError`` naming the file.
    """
    if isinstance(source, Mapping):
        return _classify(dict(source), {}, None, "state dict")
    p = Path(source)
    if p.is_dir():
        for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME, "model.safetensors"):
            if (p / name).is_file():
                return read_tuned(p / name)
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
    keys = list(tensors)
    if keys and all(k.startswith("lora_") for k in keys):
        lora_groups(tensors, source)  # validate now, with the file's name in the message
        return "lora", tensors
    if keys and any(".lora_A" in k or ".lora_B" in k for k in keys):
        return "lora", _peft_to_kohya(tensors, metadata, peft_cfg, source)
    if any(k.endswith("self_attn.q_proj.weight") for k in keys) and not any("lora" in k for k in keys):
        if any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")) for k in keys):
            raise UserError(f"{source}: is a whole Stable Diffusion checkpoint; pass it as the base model instead")
        return "encoder", {canonical_encoder_key(k): v for k, v in tensors.items()}
    raise UserError(
        f"{source}: not a text-encoder LoRA or text encoder (first keys: {', '.join(keys[:3]) or 'none'}); "
        "pass a file written by `tc_lite export` or by training"
    )


def _peft_alpha(metadata: Mapping[str, str], peft_cfg: Mapping[str, Any] | None, rank: int) -> tuple[float, dict]:
    """(default alpha, alpha_pattern) from a peft adapter_config or diffusers' lora_adapter_metadata."""
    if peft_cfg is not None:
        return float(peft_cfg.get("lora_alpha", rank)), dict(peft_cfg.get("alpha_pattern") or {})
    raw = metadata.get(_DIFFUSERS_META_KEY)
    if raw:
        meta = json.loads(raw)
        return float(meta.get("text_encoder.lora_alpha", rank)), dict(meta.get("text_encoder.alpha_pattern") or {})
    return float(rank), {}  # no config: diffusers then uses alpha = rank


def _peft_to_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   peft_cfg: Mapping[str, Any] | None, source: str) -> dict[str, torch.Tensor]:
    parts: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in tensors.items():
        m = _PEFT_KEY_RE.match(k)
        if m is None:
            unknown.append(k)
            continue
        parts.setdefault((int(m["layer"]), m["block"], m["proj"]), {})[m["ab"]] = v
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} key(s) are not SD1 text-encoder LoRA keys (first: {unknown[0]}); "
            "UNet and SDXL LoRAs are not supported here"
        )
    incomplete = [k for k, ab in parts.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise UserError(f"{source}: lora_A/lora_B missing for layer {incomplete[0]}; the file is truncated")
    rank = int(next(iter(parts.values()))["A"].shape[0])
    alpha, pattern = _peft_alpha(metadata, peft_cfg, rank)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(parts, key=lambda k: (k[0], _TARGET_ORDER.get(k[2], 9))):
        name = _kohya_module(*key)
        module_path = f"encoder.layers.{key[0]}.{key[1]}.{key[2]}"
        a = next((float(v) for pat, v in pattern.items() if re.fullmatch(rf"(.*\.)?{pat}", module_path)), alpha)
        out[f"{name}.lora_down.weight"] = parts[key]["A"]
        out[f"{name}.lora_up.weight"] = parts[key]["B"]
        out[f"{name}.alpha"] = torch.tensor(a, dtype=torch.float32)
    lora_groups(out, source)
    return out


# --------------------------------------------------------------------------------------------------- peft


@functools.lru_cache(maxsize=1)
def encoder_has_text_model() -> bool:
    """Whether the installed transformers' CLIPTextModel keeps the ``text_model`` submodule (< 5.6) or not."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=4)
    with torch.device("meta"):
        return hasattr(CLIPTextModel(cfg), "text_model")


def _lora_config_kwargs(groups: list, rank: int, module_prefix: str) -> dict[str, Any]:
    """LoraConfig arguments reproducing ``groups``: target names, rank, the common alpha and any exceptions."""
    alphas = [alpha for *_, alpha in groups]
    common = max(set(alphas), key=alphas.count)
    layers = sorted({k[0] for k, *_ in groups})
    projs = sorted({k[2] for k, *_ in groups}, key=_TARGET_ORDER.get)
    every = {(layer, p) for layer in layers for p in projs} == {(k[0], k[2]) for k, *_ in groups}
    # proj names match every layer; exact paths only when the LoRA covers some layers but not others
    targets = projs if every else [f"{module_prefix}encoder.layers.{k[0]}.{k[1]}.{k[2]}" for k, *_ in groups]
    pattern = {f"{module_prefix}encoder.layers.{k[0]}.{k[1]}.{k[2]}": a for k, _, _, a in groups if a != common}
    return {"r": rank, "lora_alpha": common, "target_modules": targets, "alpha_pattern": pattern,
            "lora_dropout": 0.0, "bias": "none"}


def export_peft(lora: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], *,
                save_dtype: torch.dtype = torch.float16, base_model: str | None = None,
                source: str = "LoRA") -> Path:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) as ``save_pretrained`` writes it.

    Loads with ``PeftModel.from_pretrained(CLIPTextModel…, folder)`` and ``text_encoder.load_adapter(folder)``.
    peft matches parameter names exactly, so the names follow the module tree of the INSTALLED transformers
    (``base_model.model.encoder.layers…`` on >= 5.6, ``…text_model.encoder.layers…`` before); export again after
    switching across that version (the kohya and diffusers files do not have this limitation).
    """
    from peft import LoraConfig

    _check_dtype(save_dtype)
    groups = lora_groups(lora, source)
    rank = _uniform_rank(groups, source)
    prefix = CANONICAL_PREFIX if encoder_has_text_model() else ""
    tensors: dict[str, torch.Tensor] = {}
    for (layer, block, proj), down, up, _ in groups:
        path = f"base_model.model.{prefix}encoder.layers.{layer}.{block}.{proj}"
        tensors[f"{path}.lora_A.weight"] = down
        tensors[f"{path}.lora_B.weight"] = up
    out = _cast_lora(tensors, save_dtype, PEFT_WEIGHT_NAME)
    config = LoraConfig(**_lora_config_kwargs(groups, rank, prefix), base_model_name_or_path=base_model).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["auto_mapping"] = {"base_model_class": "CLIPTextModel",
                              "parent_library": "transformers.models.clip.modeling_clip"}
    dest = Path(folder)
    save_safetensors_atomic(out, dest / PEFT_WEIGHT_NAME, {"format": "pt"})
    save_json_atomic(config, dest / PEFT_CONFIG_NAME)
    return dest


# --------------------------------------------------------------------------------------------------- diffusers


def export_diffusers(lora: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], *,
                     save_dtype: torch.dtype = torch.float16, source: str = "LoRA") -> Path:
    """``folder/pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(folder)`` loads it.

    Keys are ``text_encoder.text_model.encoder.layers.N.<module>.lora_A/B.weight`` (diffusers strips
    ``text_model.`` itself when the installed transformers has no such submodule). alpha/r is folded into lora_B
    and the metadata says alpha = r: diffusers versions that ignore the metadata assume exactly that, so every
    version applies the same scale. Returns the file's path.
    """
    _check_dtype(save_dtype)
    groups = lora_groups(lora, source)
    rank = _uniform_rank(groups, source)
    tensors: dict[str, torch.Tensor] = {}
    for (layer, block, proj), down, up, alpha in groups:
        path = f"text_encoder.{_canonical_module(layer, block, proj)}"
        tensors[f"{path}.lora_A.weight"] = down
        tensors[f"{path}.lora_B.weight"] = up * (alpha / down.shape[0])
    out = _cast_lora(tensors, save_dtype, DIFFUSERS_WEIGHT_NAME)
    kwargs = _lora_config_kwargs([(k, d, u, float(rank)) for k, d, u, _ in groups], rank, CANONICAL_PREFIX)
    kwargs.pop("alpha_pattern")
    meta = {"format": "pt", _DIFFUSERS_META_KEY: json.dumps({f"text_encoder.{k}": v for k, v in kwargs.items()},
                                                            sort_keys=True)}
    return save_safetensors_atomic(out, Path(folder) / DIFFUSERS_WEIGHT_NAME, meta)


# --------------------------------------------------------------------------------------------------- merged encoder


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
                   config: Any = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a full text encoder (canonical ``text_model.…`` names) to ``path``.

    A path ending in ``.safetensors`` gets one file (ComfyUI's CLIPLoader, A1111 extensions, or
    ``load_encoder_weights``); any other path becomes a transformers folder (``config.json`` + ``model.safetensors``)
    for ``CLIPTextModel.from_pretrained(path)``. ``config`` is the CLIPTextConfig (needed for the folder form).
    """
    _check_dtype(save_dtype)
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"export: refusing to write the encoder: {len(bad)} tensor(s) contain NaN/inf (first: {bad[0]})")
    out = {canonical_encoder_key(k): v.detach().to("cpu", save_dtype) for k, v in sd.items()}
    over = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if over:
        raise UserError(f"export: {len(over)} encoder tensor(s) overflow {save_dtype} (first: {over[0]}); use fp32")
    meta = {"format": "pt", "tc_lite_version": __version__, "tc_lite_component": "text_encoder"}
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
    cfg["architectures"] = ["CLIPTextModel"]
    cfg["torch_dtype"] = cfg["dtype"] = str(save_dtype).removeprefix("torch.")
    save_json_atomic(cfg, dest / "config.json")
    save_safetensors_atomic(out, dest / "model.safetensors", meta)
    return dest


# --------------------------------------------------------------------------------------------------- SVD extraction


@dataclass
class Extraction:
    """How well a rank-r LoRA reproduces a full fine-tune's weight change (errors relative to ‖ΔW‖_F)."""

    rank: int
    rel_error: float  # over all adapted linears together
    worst_module: str
    worst_error: float
    untargeted_change: float  # ‖Δ of biases, LayerNorms, embeddings‖ / ‖Δ of everything‖: what no LoRA carries

    def __str__(self) -> str:
        return (f"rank {self.rank}: relative error {self.rel_error:.3%} of the weight change over the adapted "
                f"linears (worst {self.worst_module}: {self.worst_error:.3%}); {self.untargeted_change:.3%} of the "
                "change is in biases/LayerNorms/embeddings, which a LoRA cannot carry")


def extract_lora(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], rank: int,
                 targets: Sequence[str] = DEFAULT_TARGETS) -> tuple[dict[str, torch.Tensor], Extraction]:
    """A kohya LoRA of ``rank`` approximating tuned − base on the target linears, by truncated SVD, and its error.

    ΔW = U S Vᴴ; up = U_r·√S_r, down = √S_r·Vᴴ_r (balanced, so fp16 stores both well), alpha = rank (scale 1).
    At full rank (min(out, in)) the reconstruction is exact up to float rounding.
    """
    base = {canonical_encoder_key(k): v for k, v in base.items()}
    tuned = {canonical_encoder_key(k): v for k, v in tuned.items()}
    pat = re.compile(rf"^{re.escape(CANONICAL_PREFIX)}encoder\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
    mods = sorted(((int(m[1]), m[2], m[3]) for k in tuned if (m := pat.match(k)) and m[3] in targets),
                  key=lambda x: (x[0], _TARGET_ORDER[x[2]]))
    if not mods:
        raise UserError("export: the tuned encoder has none of the LoRA target linears; is it a CLIP text encoder?")
    max_rank = min(min(tuned[_canonical_module(*m) + ".weight"].shape) for m in mods)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise UserError(f"--rank must be an integer from 1 to {max_rank} (full rank of this encoder's linears), "
                        f"got {rank!r}")
    out: dict[str, torch.Tensor] = {}
    err2 = ref2 = 0.0
    worst = ("", -1.0)
    for m in mods:
        key = _canonical_module(*m) + ".weight"
        d = tuned[key].double() - base[key].double()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        sq = s[:rank].sqrt()
        up, down = u[:, :rank] * sq, sq[:, None] * vh[:rank]
        e2, r2 = float((d - up @ down).square().sum()), float(d.square().sum())
        err2, ref2 = err2 + e2, ref2 + r2
        rel = math.sqrt(e2 / r2) if r2 > 0 else 0.0
        if rel > worst[1]:
            worst = (_canonical_module(*m).removeprefix(CANONICAL_PREFIX), rel)
        name = _kohya_module(*m)
        out[f"{name}.lora_down.weight"] = down.float().contiguous()
        out[f"{name}.lora_up.weight"] = up.float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)
    covered = {_canonical_module(*m) + ".weight" for m in mods}
    other2 = sum(float((tuned[k].double() - base[k].double()).square().sum())
                 for k in tuned if k not in covered and k in base)
    report = Extraction(rank=rank, rel_error=math.sqrt(err2 / ref2) if ref2 > 0 else 0.0, worst_module=worst[0],
                        worst_error=max(worst[1], 0.0),
                        untargeted_change=math.sqrt(other2 / (other2 + ref2)) if other2 + ref2 > 0 else 0.0)
    return out, report
