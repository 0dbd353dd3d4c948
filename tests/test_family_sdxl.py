"""The SDXL family conditions the UNet exactly as diffusers' `StableDiffusionXLPipeline` does: prompt embeddings
(both encoders' penultimate states), pooled embedding, time ids, the zeroed empty negative prompt, and whole
sampled latents. Built on the tiny SDXL (random weights suffice: parity does not need a trained model)."""

from __future__ import annotations

import pytest
import torch

from tc_lite.conditioning import PromptEncoder
from tc_lite.families import FAMILIES, family_of
from tc_lite.render import RenderPlan, Renderer

SDXL = FAMILIES["sdxl"]


@pytest.fixture(scope="module")
def comps():
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    c = build_tiny_sdxl_components(pretrain=False)
    for m in (c.text_encoder, c.text_encoder_2, c.unet, c.vae):
        m.requires_grad_(False).eval()
    return c


@pytest.fixture(scope="module")
def pipe(comps):
    pipe = SDXL.pipeline(comps)
    assert pipe.config.force_zeros_for_empty_prompt is True
    return pipe


PROMPTS = ["a red square", "a blue circle on grey"]


@pytest.mark.parametrize("negative", ["", "blurry, ugly"])
def test_conditioning_equals_the_pipelines(comps, pipe, negative):
    # diffusers zeroes the negative side only when negative_prompt is None; tc-lite's "" means that default
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt=negative or None)
    ours = SDXL.encode(comps, PROMPTS, size=(16, 24))
    torch.testing.assert_close(ours.hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.added["text_embeds"], pooled, rtol=0, atol=0)
    uncond = SDXL.uncond(comps, negative, size=(16, 24))
    # diffusers encodes the negative prompt once per prompt row: batch 2 vs 1 differs by matmul rounding only
    torch.testing.assert_close(uncond.hidden, neg_embeds[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond.added["text_embeds"], neg_pooled[:1], rtol=1e-5, atol=1e-6)
    assert bool(uncond.hidden.abs().sum() == 0) == (negative == "")
    ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), dtype=pooled.dtype,
                                 text_encoder_projection_dim=comps.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(ours.added["time_ids"], ids.expand(2, 6))
    torch.testing.assert_close(uncond.added["time_ids"], ids)  # not zeroed: diffusers keeps the size ids


def test_an_empty_negative_prompt_is_encoded_without_force_zeros(comps):
    comps.extra["force_zeros_for_empty_prompt"] = False
    try:
        uncond = SDXL.uncond(comps, "")
    finally:
        comps.extra["force_zeros_for_empty_prompt"] = True
    torch.testing.assert_close(uncond.hidden, SDXL.encode(comps, [""]).hidden)
    assert uncond.hidden.abs().sum() > 0


def test_time_ids_default_to_the_models_native_size(comps):
    side = comps.unet.config.sample_size * comps.vae_scale_factor
    ids = SDXL.encode(comps, ["x"]).added["time_ids"]
    assert ids.tolist() == [[side, side, 0, 0, side, side]]


@pytest.mark.parametrize("negative", ["", "grey"])
def test_sampled_latents_equal_the_pipelines(comps, pipe, negative):
    """The whole render path (Euler, CFG, noise from the seed) gives the pipeline's latents."""
    pipe.scheduler = type(comps.scheduler).from_config(comps.scheduler.config)
    expected = pipe(PROMPTS[0], negative_prompt=negative or None, num_inference_steps=4, guidance_scale=5.0,
                    height=16, width=16, generator=torch.Generator().manual_seed(3), output_type="latent").images
    plan = RenderPlan(steps=4, guidance_scale=5.0, scheduler="euler", height=16, width=16)
    enc = PromptEncoder(SDXL, comps, size=(16, 16))
    ours = Renderer(comps, plan).latents([3], early=enc.tuned([PROMPTS[0]]), uncond_early=enc.uncond_tuned(negative))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_encoders_but_not_te1s_last_layer(comps):
    """hidden_states[-2]: te1's last layer never reaches the UNet; te2's feeds the pooled embedding."""
    from tc_lite.lora import ADAPTER_NAME, add_lora, lora_layers

    import copy

    c = copy.copy(comps)
    c.text_encoder, c.text_encoder_2 = copy.deepcopy(comps.text_encoder), copy.deepcopy(comps.text_encoder_2)
    for enc in (c.text_encoder, c.text_encoder_2):
        add_lora(enc, rank=2, alpha=2, targets=["q_proj", "fc2"], init_seed=0)
        for _, layer in lora_layers(enc):
            torch.nn.init.normal_(layer.lora_B[ADAPTER_NAME].weight, std=0.1)  # nonzero B: A gets gradients too
    cond = SDXL.encode(c, PROMPTS)
    (cond.hidden.square().sum() + cond.added["text_embeds"].square().sum()).backward()
    last1 = c.text_encoder.config.num_hidden_layers - 1
    for name, p in c.text_encoder.named_parameters():
        if "lora_" in name:
            assert (p.grad is None or p.grad.abs().sum() == 0) == (f"layers.{last1}." in name), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in c.text_encoder_2.named_parameters() if "lora_" in n)


def test_family_of_loaded_components(comps):
    assert family_of(comps) is SDXL and [s.kohya_prefix for s in SDXL.slots] == ["lora_te1", "lora_te2"]
