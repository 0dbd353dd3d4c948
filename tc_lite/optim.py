"""Optimizer and learning-rate schedule from the `optim` section."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig
from .errors import UserError


def build_optimizer(params: list[torch.nn.Parameter] | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) over `params`: parameters, or parameter groups with their own `lr`."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError or a broken native library
        raise UserError(
            f"optim.name: adamw8bit needs bitsandbytes ({type(e).__name__}: {e}). "
            "Install it with `pip install bitsandbytes`, or set optim.name=adamw (a LoRA's optimizer state is tiny anyway)."
        ) from None
    return bnb.optim.AdamW8bit(params, **kwargs)


def build_schedule(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear decay to 0, or cosine decay to 0."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
