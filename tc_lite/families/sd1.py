"""Stable Diffusion 1.x: one CLIP ViT-L/14 text encoder (kohya prefix `lora_te`), last hidden state as conditioning.

Loading (hub id, diffusers folder, single-file checkpoint with the bundled SD1.5 configs, the tiny model, pickle
refusal) is `tc_lite.models.loading`; this module is what the rest of tc-lite asks about SD1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tc_lite.conditioning import Cond
from tc_lite.families.base import EncoderSlot, ModelFamily, module_device, tokenize

# kohya's six linears per encoder layer (12 layers x 6 = 72 modules for SD1).
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class SD1(ModelFamily):
    name = "sd1"
    label = "SD1.x"
    kohya_base_model_version = "sd_v1"
    slots = (EncoderSlot("te", "text_encoder", "tokenizer", "lora_te", "CLIP ViT-L/14 text encoder"),)
    lora_targets = TEXT_LORA_TARGETS

    def pipeline(self, components: Any, **replace: Any) -> Any:
        from diffusers import StableDiffusionPipeline

        parts = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                     unet=components.unet, scheduler=components.scheduler)
        return StableDiffusionPipeline(**{**parts, **replace}, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def encode(self, components: Any, prompts: list[str], *, encoders: Mapping[str, torch.nn.Module] | None = None,
               size: tuple[int, int] | None = None) -> Cond:
        slot = self.slots[0]
        encoder = (encoders or {}).get(slot.name) or slot.encoder(components)
        ids = tokenize(slot.tokenizer(components), prompts, module_device(encoder))
        return Cond(encoder(ids)[0])

    # ------------------------------------------------------------------------------------------ estimator

    def architecture(self, cfg: Any) -> Any:
        from tc_lite.memory.architectures import Architecture, read_architecture

        if cfg.model.source == "tiny":
            from tc_lite.models.tiny import build_tiny_components

            comps = build_tiny_components(pretrain=False)
            return Architecture(dict(comps.unet.config), dict(comps.vae.config),
                                {"te": comps.text_encoder.config.to_dict()}, "tiny (built in code)")
        bundled = Path(__file__).resolve().parent.parent / "assets" / "sd15"
        return read_architecture(cfg, {"te": "text_encoder"}, bundled, "SD1.5")

    def meta_components(self, architecture: Any) -> Any:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from tc_lite.memory.fake_models import _StubTokenizer
        from tc_lite.models.components import SDComponents

        te_config = {k: v for k, v in architecture.text_encoders["te"].items() if not k.startswith("_")}
        with torch.device("meta"):
            comps = SDComponents(tokenizer=_StubTokenizer(), text_encoder=CLIPTextModel(CLIPTextConfig(**te_config)),
                                 unet=UNet2DConditionModel.from_config(architecture.unet),
                                 vae=AutoencoderKL.from_config(architecture.vae), scheduler=None)
        for m in (comps.unet, comps.vae, comps.text_encoder):
            m.requires_grad_(False)
        return comps
