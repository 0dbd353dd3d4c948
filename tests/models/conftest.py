"""Fixtures for the model tests: one pretrained tiny model per session (from the on-disk cache after the first run),
saved once as a diffusers folder and as an LDM single file, and a plain DDIM + CFG sampler to look at its images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tc_lite.models.components import SDComponents


@pytest.fixture(scope="session")
def tiny(tiny_components: SDComponents) -> SDComponents:
    """The suite's pretrained tiny model (tests/conftest.py); read-only: tests that modify a model build their own."""
    return tiny_components


@pytest.fixture(scope="session")
def tiny_saved(tiny: SDComponents, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(diffusers folder, single .safetensors file) of the session's tiny model."""
    from tc_lite.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("tiny_saved")
    folder, single = root / "tiny-sd", root / "tiny-sd.safetensors"
    save_tiny_model(folder, single, components=tiny)
    return folder, single


def encode(c: SDComponents, prompts: list[str]) -> torch.Tensor:
    ids = c.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return c.text_encoder(ids)[0]


@torch.no_grad()
def ddim_sample(c: SDComponents, prompts: list[str], steps: int = 10, guidance: float = 4.0, seed: int = 0):
    """Images in [0, 1]: DDIM with classifier-free guidance against the empty prompt, as SD pipelines sample."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(c.scheduler.config)
    scheduler.set_timesteps(steps)
    cond, uncond = encode(c, prompts), encode(c, [""] * len(prompts))
    size = c.unet.config.sample_size
    latents = torch.randn((len(prompts), c.latent_channels, size, size), generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        eps_u, eps_c = c.unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).sample.chunk(2)
        latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
    images = c.vae.decode(latents / c.vae.config.scaling_factor).sample
    return ((images + 1) / 2).clamp(0, 1)


@pytest.fixture(scope="session")
def sample() -> Callable[..., torch.Tensor]:
    return ddim_sample


@pytest.fixture(scope="session")
def encode_prompts() -> Callable[[SDComponents, list[str]], torch.Tensor]:
    return encode
