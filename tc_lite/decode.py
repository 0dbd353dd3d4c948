"""Differentiable VAE decode: latents → images in [0, 1].

With `checkpoint=True` the decoder's mid and up blocks are recomputed in backward (diffusers' non-reentrant
per-block checkpointing): the decoder's activations at 512² are the single largest memory item of a step
(DESIGN.md §4: 5.51 → 4.08 GiB), and its recompute costs one more decoder forward.

The decode runs in the VAE's own dtype, natively (`precision.autocast_for`): half precision, or fp32 where
`memory.vae_precision` keeps the VAE in fp32 (SDXL's overflows in fp16), also under the run's half autocast.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from .precision import autocast_for


def configure_vae(vae: torch.nn.Module, checkpoint: bool) -> None:
    if checkpoint:
        vae.enable_gradient_checkpointing()
    else:
        vae.disable_gradient_checkpointing()


def decode(vae: torch.nn.Module, latents: torch.Tensor,
           autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    cfg = vae.config
    latents = latents / cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None)
    if shift:
        latents = latents + shift
    with autocast_for(vae, autocast)():  # a frozen VAE decodes natively in its dtype
        images = vae.decode(latents.to(next(vae.parameters()).dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)
