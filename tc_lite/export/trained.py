"""What a finished (or best-so-far) run writes: one kohya file holding every LoRA adapter's modules under the
family's prefixes (SDXL: ``lora_te1_`` and ``lora_te2_``; a UNet LoRA: ``lora_unet_``), and, for encoders trained in
full, each whole encoder with canonical names (``<name>_text_encoder.safetensors``; SDXL's te2
``<name>_text_encoder_2.safetensors``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from tc_lite.export.kohya import a1111_warning, kohya_dims, kohya_metadata, save_dtype_of, write_kohya
from tc_lite.export.slots import split_parts


def run_lora_metadata(cfg: Any, lora: Mapping[str, torch.Tensor], *, output_name: str, steps: int, precision: str,
                      base_model_version: str | None = None, started_at: float | None = None,
                      extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """kohya metadata for the LoRA ``lora`` of the run configured by ``cfg``.

    ``ss_network_dim``/``ss_network_alpha`` come from the weights (``"Dynamic"`` when modules differ: SDXL's
    encoders, or the UNet beside them), ``ss_text_encoder_lr`` is each trained encoder's learning rate
    (``lora.per_encoder.<slot>.lr`` or optim.lr) and ``ss_unet_lr`` the UNet LoRA's (``unet.lr`` or optim.lr);
    ``tc_lite_encoders`` says per encoder what it holds (modules, rank, alpha, lr) and ``tc_lite_unet`` the same for
    the UNet. ``base_model_version`` is required for a UNet-only LoRA (its names alone do not say SD1 or SDXL).
    """
    from tc_lite.adapters import encoder_settings
    from tc_lite.unet_lora import KOHYA_UNET_PREFIX, unet_lora_groups

    parts, unet = split_parts(lora, output_name)
    per_encoder: dict[str, dict[str, Any]] = {}
    for fmt, part in parts.items():
        rank, alpha = kohya_dims(part)
        lr = encoder_settings(cfg.lora, fmt.slot)["lr"] or cfg.optim.lr
        per_encoder[fmt.slot] = {"prefix": fmt.prefix, "modules": sum(k.endswith(".lora_down.weight") for k in part),
                                 "rank": rank, "alpha": alpha, "lr": lr}
    more: dict[str, Any] = {}
    if unet:
        rank, alpha = kohya_dims(unet)
        more["tc_lite_unet"] = {"prefix": KOHYA_UNET_PREFIX, "modules": len(unet_lora_groups(unet, output_name)),
                                "rank": rank, "alpha": alpha, "lr": cfg.unet.lr or cfg.optim.lr}
    version = base_model_version or (next(iter(parts)).base_model_version if parts else None)
    if version is None:
        raise ValueError("run_lora_metadata: a UNet-only LoRA needs base_model_version (sd_v1 or sdxl_base_v1-0)")
    rank, alpha = kohya_dims(lora)
    return kohya_metadata(
        output_name=output_name, rank=rank, alpha=alpha, lr=cfg.optim.lr,
        text_encoder_lr=[e["lr"] for e in per_encoder.values()] or None,
        unet_lr=more["tc_lite_unet"]["lr"] if unet else None,
        parts=[p for p, present in (("text_encoder", parts), ("unet", unet)) if present],
        seed=cfg.train.seed, steps=steps, mixed_precision=precision, optimizer=cfg.optim.name,
        base_model=cfg.model.source, base_model_version=version,
        resolution=(cfg.sampling.width, cfg.sampling.height), training_started_at=started_at,
        extra={"tc_lite_config": json.dumps(cfg.to_dict()), "tc_lite_encoders": per_encoder, **more, **(extra or {})})


def result_paths(cfg: Any, family: Any, out_dir: str | Path | None = None,
                 path: Path | None = None) -> tuple[Path | None, dict[str, Path]]:
    """Where `export_trained` writes a run's result: (the kohya file, None when neither a slot nor the UNet trains
    as a LoRA; {slot: encoder file} of the slots trained in full), from the `lora` and `unet` sections. `out_dir`
    replaces `output.dir` (a moved run folder); `path` the first file (the held-out best), as in `export_trained`."""
    from tc_lite.adapters import encoder_settings, selected_slots
    from tc_lite.export.encoder import encoder_path

    modes = {s: encoder_settings(cfg.lora, s.name)["mode"] for s in selected_slots(cfg.lora, family)}
    loras = "lora" in modes.values() or cfg.unet.mode == "lora"
    kohya = path or Path(out_dir or cfg.output.dir) / f"{cfg.output.name}.safetensors"
    first = path if path is not None and not loras else kohya.with_name(f"{kohya.stem}_text_encoder.safetensors")
    return (kohya if loras else None), {s.name: encoder_path(first, s.encoder_attr)
                                        for s, mode in modes.items() if mode == "full"}


def batch_metadata(cfg: Any, processes: int = 1) -> dict[str, Any]:
    """How many prompts made one optimizer step, as kohya writes it (``ss_batch_size_per_device``,
    ``ss_total_batch_size`` = per device × processes × accumulation) and how many processes shared it."""
    b, accum = cfg.train.batch_size, cfg.train.grad_accum
    return {"ss_batch_size_per_device": b, "ss_gradient_accumulation_steps": accum,
            "ss_total_batch_size": b * processes * accum, "tc_lite_processes": processes}


def export_trained(adapters: Any, family: Any, cfg: Any, *, steps: int, precision: str, started_at: float | None,
                   path: Path | None = None, log: Callable[[str], None] = print, processes: int = 1) -> Path:
    """Write the run's result (see `result_paths`) and return its path: `<output.dir>/<output.name>.safetensors`
    when anything trained as a LoRA, else the (first) full encoder's file. `path` replaces that first file's path;
    full encoders beside a LoRA then go to `<path stem>_text_encoder[_2].safetensors`."""
    dtype = save_dtype_of(cfg.output.save_precision)
    kohya_dest, full_dests = result_paths(cfg, family, path=path)
    loras = [a for a in adapters if a.kind == "lora"]
    if {a.key for a in adapters if a.kind == "full"} != set(full_dests) or bool(loras) != (kohya_dest is not None):
        raise ValueError(f"export: the adapters ({adapters.describe()}) are not the ones the lora and unet sections ask for")
    written: list[Path] = []
    if kohya_dest is not None:
        tensors = {k: v for a in loras for k, v in a.kohya_tensors().items()}
        meta = run_lora_metadata(cfg, tensors, output_name=cfg.output.name, steps=steps, precision=precision,
                                 base_model_version=family.kohya_base_model_version, started_at=started_at,
                                 extra=batch_metadata(cfg, processes))
        written.append(write_kohya(tensors, kohya_dest, metadata=meta, save_dtype=dtype))
        if warning := a1111_warning(tensors):
            log(warning)
    for a in adapters:
        if a.kind == "full":
            written.append(_export_full(a, cfg, steps, dtype, full_dests[a.key], log))
    return written[0]


def _export_full(adapter: Any, cfg: Any, steps: int, dtype: torch.dtype, dest: Path,
                 log: Callable[[str], None]) -> Path:
    """The full encoder with `text_model.…` names whatever transformers builds (the §3 trap), and in fp32 when
    `output.save_precision` would round away more than 1% of the weight change (a full fine-tune at lr 1e-6 moves
    weights below fp16's resolution, so an fp16 file could silently be the base model)."""
    from tc_lite.export.encoder import encoder_state_dict, export_encoder, update_retention

    module = adapter.module()
    tuned = encoder_state_dict(module)
    lost = update_retention(tuned, encoder_state_dict(adapter.frozen), dtype)
    if lost > 0.01 and dtype != torch.float32:
        log(f"output.save_precision={cfg.output.save_precision} would lose {lost:.1%} of {adapter.key}'s weight "
            "change to rounding; writing fp32 instead")
        dtype = torch.float32
    return export_encoder(tuned, dest, save_dtype=dtype, config=module.config, architecture=type(module).__name__,
                          component=adapter.slot.encoder_attr,
                          metadata={"tc_lite_config": json.dumps(cfg.to_dict()), "tc_lite_base_model": cfg.model.source,
                                    "tc_lite_steps": steps, "tc_lite_slot": adapter.key})
