"""What a finished (or best-so-far) run writes: one kohya file holding every LoRA adapter's modules under the
family's prefixes, or, for full fine-tuning, the whole encoder(s) with canonical names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from tc_lite.export.kohya import kohya_metadata, save_dtype_of, write_kohya


def export_trained(adapters: Any, family: Any, cfg: Any, *, steps: int, precision: str, started_at: float | None,
                   path: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Write the run's result and return its path (`<output.dir>/<output.name>.safetensors` for LoRAs)."""
    out, name = Path(cfg.output.dir), cfg.output.name
    dtype = save_dtype_of(cfg.output.save_precision)
    if adapters.kinds == {"lora"}:
        tensors: dict[str, torch.Tensor] = {}
        for a in adapters:
            tensors.update(a.kohya_tensors())
        meta = kohya_metadata(
            output_name=name, rank=cfg.lora.rank, alpha=cfg.lora.alpha, lr=cfg.optim.lr, seed=cfg.train.seed,
            steps=steps, mixed_precision=precision, optimizer=cfg.optim.name, base_model=cfg.model.source,
            base_model_version=family.kohya_base_model_version, resolution=(cfg.sampling.width, cfg.sampling.height),
            training_started_at=started_at, extra={"tc_lite_config": json.dumps(cfg.to_dict())})
        return write_kohya(tensors, path or out / f"{name}.safetensors", metadata=meta, save_dtype=dtype)
    written = [_export_full(a, cfg, steps, dtype, path if len(adapters) == 1 else None, len(adapters) > 1, log)
               for a in adapters]
    return written[0]


def _export_full(adapter: Any, cfg: Any, steps: int, dtype: torch.dtype, path: Path | None, several: bool,
                 log: Callable[[str], None]) -> Path:
    """The full encoder with `text_model.…` names whatever transformers builds (the §3 trap), and in fp32 when
    `output.save_precision` would round away more than 1% of the weight change (a full fine-tune at lr 1e-6 moves
    weights below fp16's resolution, so an fp16 file could silently be the base model)."""
    from tc_lite.export.encoder import encoder_state_dict, export_encoder, update_retention

    tuned = encoder_state_dict(adapter.module())
    lost = update_retention(tuned, encoder_state_dict(adapter.frozen), dtype)
    if lost > 0.01 and dtype != torch.float32:
        log(f"output.save_precision={cfg.output.save_precision} would lose {lost:.1%} of the encoder's weight change "
            "to rounding; writing fp32 instead")
        dtype = torch.float32
    suffix = f"_text_encoder_{adapter.key}" if several else "_text_encoder"
    dest = path or Path(cfg.output.dir) / f"{cfg.output.name}{suffix}.safetensors"
    return export_encoder(tuned, dest, save_dtype=dtype, config=adapter.module().config,
                          metadata={"tc_lite_config": json.dumps(cfg.to_dict()), "tc_lite_base_model": cfg.model.source,
                                    "tc_lite_steps": steps})
