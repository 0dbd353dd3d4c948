"""A tiny, deterministic SDXL-shaped pipeline: two text encoders, a UNet with SDXL's added (pooled + time) conditioning.

It is the SDXL counterpart of `tc_lite.models.tiny` and learns the same synthetic task ("a {colour} {object}",
16 px images, latents 4x8x8). What makes it SDXL-shaped, so that conditioning, LoRA targets, kohya names and the SGM
single-file layout are exercised as on the real model:
- `te1` a `CLIPTextModel` (quick_gelu, as CLIP ViT-L), `te2` a `CLIPTextModelWithProjection` (gelu, as OpenCLIP
  bigG), each with >= 2 layers because SDXL conditions on the penultimate hidden states;
- the UNet has `addition_embed_type="text_time"` (pooled te2 embedding + six size ids), linear projections, no
  attention in the first level and two transformer blocks per attention in the second, like SDXL's [1, 2, 10];
- the scheduler is SDXL's EulerDiscrete; the VAE does not ask for fp32 upcasting (`force_upcast` false).

Pretraining is the tiny SD1's recipe (`tiny.load_or_pretrain`) with the conditioning made by `SDXL().encode` and
`SDXL().uncond` (zeros for the empty prompt, as diffusers samples SDXL), so what the UNet learns is what tc-lite
samples with. The VAE is the tiny SD1's, already pretrained (see `_VAE`); the UNet and both encoders train in about
45 s on one CPU core, cached on disk like the tiny SD1 (version + spec hash).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tc_lite.models.components import SDComponents
from tc_lite.models.tiny import (
    TINY_COLOURS,
    TINY_OBJECTS,
    TINY_RESOLUTION,
    TINY_VAE,
    build_tiny_components,
    load_or_pretrain,
    spec_cache_path,
    tiny_cache_path,
    write_pipeline,
)
from tc_lite.models.tokenizer import clip_tokenizer

TINY_SDXL_VERSION = "tiny-sdxl-v1"  # bump when the task, architecture or recipe changes in a way the spec misses
TINY_SDXL_SOURCE = "tiny-sdxl"

# SDXL base's scheduler_config.json (EulerDiscrete, scaled_linear 0.00085-0.012, epsilon, "leading" spacing), with
# the keys Euler itself ignores: a DDIM made from this config (sampling.scheduler: ddim) reads clip_sample and
# set_alpha_to_one from it, and DDIM's default clip_sample=True would clip the unit-variance latents (measured: the
# samples' distance to the data doubled).
_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "sample_max_value": 1.0,
    "trained_betas": None,
}
# Token ids as in SDXL's text encoder configs (bos 0, eos 2: transformers then pools at the highest id, <|endoftext|>).
_CLIP_COMMON = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 2,
                "pad_token_id": 1, "layer_norm_eps": 1e-5}
_TEXT_ENCODER = {**_CLIP_COMMON, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "projection_dim": 32, "hidden_act": "quick_gelu"}
_TEXT_ENCODER_2 = {**_CLIP_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                   "num_attention_heads": 4, "projection_dim": 32, "hidden_act": "gelu"}
_TIME_EMBED_DIM = 8
_UNET = {
    "sample_size": TINY_RESOLUTION // 2,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],  # SDXL: no attention at the first level
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],  # the mid block takes the last entry, as in SDXL
    "attention_head_dim": [2, 2],  # diffusers' (mis)name for the head count, as in SDXL's config
    "cross_attention_dim": _TEXT_ENCODER["hidden_size"] + _TEXT_ENCODER_2["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * _TIME_EMBED_DIM + _TEXT_ENCODER_2["projection_dim"],
    "norm_num_groups": 8,
}
# SDXL's VAE has SD1's architecture (retrained, scaling factor 0.13025); likewise the tiny SDXL takes the tiny SD1's
# pretrained VAE, only marked fp16-safe. Training a VAE anew cost as much as the whole UNet budget and, in a minute,
# reached SD1's reconstruction quality for some seeds only (measured: the decoded colours were greyed out).
_VAE = {**TINY_VAE, "force_upcast": False}
# The tiny SD1 recipe (tc_lite.models.tiny._TRAIN) for the UNet and encoders, shortened to fit a minute: 200 steps of
# 32 with a one-cycle rate (peak 5e-3) sampled as cleanly as 400 steps of 16 at a constant rate (~45 s vs ~75 s).
_TRAIN = {
    "vae_steps": 0,  # the VAE comes pretrained from the tiny SD1
    "unet_steps": 200,
    "unet_lr": 5e-3,
    "unet_schedule": "onecycle",
    "timestep_power": 0.5,
    "train_text_encoder": True,
    "batch_size": 32,
    "empty_prompt_fraction": 0.1,
}


def tiny_sdxl_spec(seed: int = 0) -> dict[str, Any]:
    """Everything that determines the pretrained weights; its hash names the cache file."""
    return {
        "version": TINY_SDXL_VERSION,
        "seed": seed,
        "resolution": TINY_RESOLUTION,
        "colours": dict(TINY_COLOURS),
        "objects": list(TINY_OBJECTS),
        "scheduler": _SCHEDULER,
        "text_encoder": _TEXT_ENCODER,
        "text_encoder_2": _TEXT_ENCODER_2,
        "unet": _UNET,
        "vae": {"config": _VAE, "weights": tiny_cache_path(seed).name},
        "train": _TRAIN,
    }


def tiny_sdxl_cache_path(seed: int = 0) -> Path:
    return spec_cache_path(TINY_SDXL_VERSION, tiny_sdxl_spec(seed))


def build_tiny_sdxl_components(seed: int = 0, pretrain: bool = True) -> SDComponents:
    """The tiny SDXL pipeline; with `pretrain` its images follow the prompt (trained once, then loaded from cache).

    Deterministic for a given seed; leaves the caller's global RNG state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = _build_random()
    if pretrain:
        from tc_lite.families.sdxl import SDXL

        if not tiny_sdxl_cache_path(seed).is_file():
            _take_tiny_vae(components, seed)
        load_or_pretrain(components, tiny_sdxl_cache_path(seed), seed, SDXL(), _TRAIN)
    for module in (components.text_encoder, components.text_encoder_2, components.unet, components.vae):
        module.eval()
    return components


def _take_tiny_vae(components: SDComponents, seed: int) -> None:
    """The tiny SD1's pretrained VAE weights and scaling factor (building, or loading, the tiny SD1 model)."""
    sd1 = build_tiny_components(seed=seed)
    components.vae.load_state_dict(sd1.vae.state_dict())
    components.vae.register_to_config(scaling_factor=sd1.vae.config.scaling_factor)


def _build_random() -> SDComponents:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return SDComponents(
        tokenizer=clip_tokenizer(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_TEXT_ENCODER)),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_ENCODER_2)),
        unet=UNet2DConditionModel(**_UNET),
        vae=AutoencoderKL(**_VAE),
        scheduler=EulerDiscreteScheduler.from_config(_SCHEDULER),
        family="sdxl",
        source=TINY_SDXL_SOURCE,
        extra={"force_zeros_for_empty_prompt": True},
    )


def save_tiny_sdxl_model(out_dir: Path, single_file: Path | None = None, *,
                         components: SDComponents | None = None) -> None:
    """Write the tiny SDXL as a diffusers folder (`StableDiffusionXLPipeline`, `force_zeros_for_empty_prompt`) and,
    optionally, as an SGM single-file checkpoint (A1111/ComfyUI layout).

    `components` lets a caller save a model it already built (default: `build_tiny_sdxl_components()`).
    """
    from tc_lite.families.sdxl import SDXL
    from tc_lite.models.ldm_keys import sdxl_ldm_state_dict

    c = components or build_tiny_sdxl_components()
    write_pipeline(c, SDXL(), out_dir, single_file, sdxl_ldm_state_dict, TINY_SDXL_VERSION)
