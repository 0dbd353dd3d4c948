"""The settings line of a memory estimate: what was estimated, in words (`MemoryEstimate.setting`)."""

from __future__ import annotations

from typing import Any

import torch

from tc_lite.config import Config

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def describe_adapters(cfg: Config, family: Any) -> str:
    """'LoRA r=8' (one encoder), 'LoRA r=8 on te1, te2' or per encoder ('LoRA r=4 on te1 + LoRA r=16 on te2'),
    from the adapters package's own reading of `lora.encoders`/`lora.per_encoder`; then ' + UNet LoRA r=4'
    (`unet.mode: lora`), or 'UNet LoRA r=4' alone when no encoder trains."""
    from tc_lite.adapters import encoder_settings, selected_slots

    parts = []
    for slot in selected_slots(cfg.lora, family):
        e = encoder_settings(cfg.lora, slot.name)
        parts.append((f"LoRA r={e['rank']}" if e["mode"] == "lora" else "full encoder", slot.name))
    if not parts:
        text = ""
    elif len(family.slots) == 1:
        text = parts[0][0]
    elif len({what for what, _ in parts}) == 1:
        text = f"{parts[0][0]} on {', '.join(name for _, name in parts)}"
    else:
        text = " + ".join(f"{what} on {name}" for what, name in parts)
    if cfg.unet.mode == "lora":
        unet = f"UNet LoRA r={cfg.unet.rank}" + (f", drift {cfg.unet.drift_weight:g}" if cfg.unet.drift_weight else "")
        text = f"{text} + {unet}" if text else unet
    return text or "nothing trained"


def describe_setting(cfg: Config, family: Any, precision: str, cuda: bool, vae_dtype: torch.dtype) -> dict[str, Any]:
    """The configuration an estimate is of, as `bench memory` prints it and the planner reports it."""
    s = cfg.sampling
    return {
        "height": s.height, "width": s.width, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
        "steps": s.steps, "grad_steps": s.grad_steps, "guidance_scale": s.guidance_scale,
        "precision": precision + ("" if cuda else " (cpu)"),
        "lora": describe_adapters(cfg, family),
        "optimizer": cfg.optim.name, "attention": cfg.memory.attention,
        "checkpoint_unet": cfg.memory.checkpoint_unet, "checkpoint_vae": cfg.memory.checkpoint_vae,
        "checkpoint_unet_blocks": cfg.memory.checkpoint_unet_blocks, "vae_dtype": DTYPE_NAMES[vae_dtype],
        "prefix_cache": s.prefix_cache, "offload": cfg.rewards.offload,
        "rewards": [f"{label}" for label, t in cfg.rewards.terms.items() if t.weight != 0],
    }
