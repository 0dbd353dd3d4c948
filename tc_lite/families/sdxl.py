"""Stable Diffusion XL: two text encoders, CLIP ViT-L/14 (`te1`, kohya `lora_te1`) and OpenCLIP ViT-bigG/14 (`te2`,
`lora_te2`), whose penultimate hidden states are concatenated (768 + 1280 = 2048 per token), plus the UNet's
`added_cond_kwargs`: te2's projected pooled embedding (`text_embeds`) and six size ids (`time_ids`).

This is `StableDiffusionXLPipeline.encode_prompt` without clip skip, read from diffusers and checked against it by
a test. Two consequences worth knowing: te1's last layer never reaches the UNet (hidden_states[-2]), so its LoRA
there stays at zero (kohya trains it the same way); te2's last layer feeds only the pooled embedding. An empty
negative prompt is all zeros when the model says `force_zeros_for_empty_prompt` (SDXL base does), as in diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tc_lite.conditioning import Cond
from tc_lite.families.base import EncoderSlot, ModelFamily, module_device, tokenize
from tc_lite.families.sd1 import TEXT_LORA_TARGETS

_BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "sdxl"
_SUBFOLDERS = {"te1": "text_encoder", "te2": "text_encoder_2"}


class SDXL(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    kohya_base_model_version = "sdxl_base_v1-0"
    slots = (
        EncoderSlot("te1", "text_encoder", "tokenizer", "lora_te1", "CLIP ViT-L/14 text encoder"),
        EncoderSlot("te2", "text_encoder_2", "tokenizer_2", "lora_te2", "OpenCLIP ViT-bigG/14 text encoder"),
    )
    lora_targets = TEXT_LORA_TARGETS

    def pipeline(self, components: Any, **replace: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        parts = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                     text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2,
                     unet=components.unet, scheduler=components.scheduler)
        return StableDiffusionXLPipeline(
            **{**parts, **replace},
            force_zeros_for_empty_prompt=bool(components.extra.get("force_zeros_for_empty_prompt", True)),
            add_watermarker=False)  # needs the invisible-watermark package; SDXL base's model_index says null

    def encode(self, components: Any, prompts: list[str], *, encoders: Mapping[str, torch.nn.Module] | None = None,
               size: tuple[int, int] | None = None) -> Cond:
        hidden, pooled = [], None
        for slot in self.slots:
            encoder = (encoders or {}).get(slot.name) or slot.encoder(components)
            ids = tokenize(slot.tokenizer(components), prompts, module_device(encoder))
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # te2's projected pooled embedding (CLIPTextModelWithProjection.text_embeds)
        assert pooled is not None
        states = torch.cat([h.to(pooled.dtype) for h in hidden], dim=-1)
        return Cond(states, {"text_embeds": pooled, "time_ids": self.time_ids(components, len(prompts), size, pooled)})

    def uncond(self, components: Any, negative_prompt: str, *,
               encoders: Mapping[str, torch.nn.Module] | None = None, size: tuple[int, int] | None = None) -> Cond:
        if negative_prompt or not components.extra.get("force_zeros_for_empty_prompt", False):
            return self.encode(components, [negative_prompt], encoders=encoders, size=size)
        te1, te2 = ((encoders or {}).get(s.name) or s.encoder(components) for s in self.slots)
        ref = next(te2.parameters())
        length = self.slots[1].tokenizer(components).model_max_length
        width = te1.config.hidden_size + te2.config.hidden_size
        hidden = torch.zeros(1, length, width, dtype=ref.dtype, device=ref.device)
        pooled = torch.zeros(1, te2.config.projection_dim, dtype=ref.dtype, device=ref.device)
        return Cond(hidden, {"text_embeds": pooled, "time_ids": self.time_ids(components, 1, size, pooled)})

    @staticmethod
    def time_ids(components: Any, n: int, size: tuple[int, int] | None, like: torch.Tensor) -> torch.Tensor:
        """(original size, crop top-left, target size) = (h, w, 0, 0, h, w), diffusers' defaults for txt2img."""
        if size is None:
            side = int(components.unet.config.sample_size) * components.vae_scale_factor
            size = (side, side)
        h, w = (int(x) for x in size)
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=like.dtype, device=like.device)
        return ids.expand(n, 6)

    # ------------------------------------------------------------------------------------------ estimator

    def architecture(self, cfg: Any) -> Any:
        from tc_lite.memory.architectures import Architecture, read_architecture

        if cfg.model.source == "tiny-sdxl":
            from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

            comps = build_tiny_sdxl_components(pretrain=False)
            return Architecture(dict(comps.unet.config), dict(comps.vae.config),
                                {s.name: s.encoder(comps).config.to_dict() for s in self.slots},
                                "tiny SDXL (built in code)")
        return read_architecture(cfg, dict(_SUBFOLDERS), _BUNDLED, "SDXL base 1.0")

    def meta_components(self, architecture: Any) -> Any:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from tc_lite.memory.fake_models import _StubTokenizer
        from tc_lite.models.components import SDComponents

        def config(slot: str) -> Any:
            return CLIPTextConfig(**{k: v for k, v in architecture.text_encoders[slot].items() if not k.startswith("_")})

        with torch.device("meta"):
            comps = SDComponents(tokenizer=_StubTokenizer(), text_encoder=CLIPTextModel(config("te1")),
                                 tokenizer_2=_StubTokenizer(), text_encoder_2=CLIPTextModelWithProjection(config("te2")),
                                 unet=UNet2DConditionModel.from_config(architecture.unet),
                                 vae=AutoencoderKL.from_config(architecture.vae), scheduler=None, family=self.name,
                                 extra={"force_zeros_for_empty_prompt": True})
        for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
            m.requires_grad_(False)
        return comps
