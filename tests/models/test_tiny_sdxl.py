"""The tiny SDXL model: SDXL-shaped (two encoders, added conditioning, real module names) and run by the family."""

from __future__ import annotations

import pytest
import torch

from tc_lite.families.sdxl import SDXL
from tc_lite.models.components import SDComponents
from tc_lite.models.tiny import TINY_RESOLUTION
from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components


@pytest.fixture(scope="module")
def random_sdxl() -> SDComponents:
    return build_tiny_sdxl_components(pretrain=False)


def test_sdxl_structure(random_sdxl):
    c = random_sdxl
    assert c.family == "sdxl" and c.source == "tiny-sdxl" and c.extra["force_zeros_for_empty_prompt"] is True
    assert type(c.text_encoder).__name__ == "CLIPTextModel"
    assert type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(c.scheduler).__name__ == "EulerDiscreteScheduler"
    assert c.vae_scale_factor * c.unet.config.sample_size == TINY_RESOLUTION and c.vae.config.force_upcast is False
    te1, te2, unet = c.text_encoder.config, c.text_encoder_2.config, c.unet.config
    assert min(te1.num_hidden_layers, te2.num_hidden_layers) >= 2  # SDXL conditions on hidden_states[-2]
    assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert c.tokenizer.pad_token == "<|endoftext|>" and c.tokenizer_2.pad_token == "!"
    unet_names = {n for n, _ in c.unet.named_modules()}
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k" in unet_names
    assert "mid_block.attentions.0.transformer_blocks.1.attn2.to_k" in unet_names
    assert not any(n.startswith("down_blocks.0.attentions") for n in unet_names)
    for encoder in (c.text_encoder, c.text_encoder_2):  # the names LoRA targets and kohya keys use
        names = {n for n, _ in encoder.named_modules()}
        for layer in range(encoder.config.num_hidden_layers):
            for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                        "mlp.fc1", "mlp.fc2"):
                assert any(n.endswith(f"encoder.layers.{layer}.{mod}") for n in names)


def test_family_encode_feeds_the_unet(random_sdxl):
    c = random_sdxl
    width = c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    with torch.no_grad():
        cond = SDXL().encode(c, ["a red square"], size=(16, 16))
        uncond = SDXL().uncond(c, "", size=(16, 16))
        assert cond.hidden.shape == (1, 77, width) == uncond.hidden.shape
        assert cond.added["text_embeds"].shape == (1, c.text_encoder_2.config.projection_dim)
        assert cond.added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
        assert not uncond.hidden.any() and not uncond.added["text_embeds"].any()
        z = torch.randn(2, 4, 8, 8)
        both = cond.cat(cond, uncond)
        out = c.unet(z, torch.tensor([500, 500]), both.hidden, added_cond_kwargs=both.added).sample
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_random_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_tiny_sdxl_components(seed=3, pretrain=False), build_tiny_sdxl_components(seed=3, pretrain=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    for m in ("text_encoder_2", "unet"):
        sa, sb = getattr(a, m).state_dict(), getattr(b, m).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
