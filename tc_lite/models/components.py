"""The pieces of a diffusion pipeline that training touches, independent of where they were loaded from.

One dataclass for every model family: SD1.x has one text encoder; SDXL (next) adds a second tokenizer/encoder
pair and pooled/time embeddings, which slot in as the optional fields below without changing SD1 callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SDComponents:
    tokenizer: Any  # transformers.CLIPTokenizer
    text_encoder: torch.nn.Module  # transformers.CLIPTextModel
    unet: torch.nn.Module  # diffusers.UNet2DConditionModel
    vae: torch.nn.Module  # diffusers.AutoencoderKL
    scheduler: Any  # a diffusers scheduler (its config is reused to build DDIM/Euler/DPM++)
    family: str = "sd1"  # "sd1" now; "sdxl" later
    source: str = ""  # what the user asked for (hub id, folder, file, or "tiny")
    # SDXL slots (unused for sd1)
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)
