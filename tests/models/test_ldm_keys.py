"""Our diffusers -> LDM names must be exactly what diffusers' single-file converter maps back, for SD1.5 itself."""

from __future__ import annotations

import json

import pytest

from tc_lite.models.components import SDComponents
from tc_lite.models.ldm_keys import checkpoint_family, ldm_state_dict
from tc_lite.models.loading import sd15_config_dir


@pytest.fixture(scope="module")
def sd15_meta() -> SDComponents:
    """SD1.5's architecture from the bundled configs, on the meta device (no memory, ~1 s)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = sd15_config_dir()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    return SDComponents(tokenizer=None, text_encoder=te, unet=unet, vae=vae, scheduler=None)


@pytest.mark.parametrize("model", ["sd15", "tiny"])
def test_diffusers_converter_inverts_our_names(model, request):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    c = request.getfixturevalue("sd15_meta" if model == "sd15" else "tiny")
    ldm = ldm_state_dict(c)
    for module, back in (
        (c.unet, convert_ldm_unet_checkpoint(ldm, c.unet.config)),
        (c.vae, convert_ldm_vae_checkpoint(ldm, c.vae.config)),
        (c.text_encoder, {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()}),
    ):
        ours = module.state_dict()
        assert set(back) == set(ours)
        assert all(back[k].shape == ours[k].shape for k in ours)
    assert len(ldm) == len(c.unet.state_dict()) + len(c.vae.state_dict()) + len(c.text_encoder.state_dict())


def test_sd15_names_match_the_original_checkpoint(sd15_meta):
    ldm = ldm_state_dict(sd15_meta)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    # Keys and shapes as they appear in v1-5-pruned(-emaonly).safetensors.
    assert shapes["model.diffusion_model.output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes["model.diffusion_model.input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    key = "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight"
    assert shapes[key] == (768, 768)


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y", "first_stage_model.z"], "sd1"),
        (["model.diffusion_model.x", "cond_stage_model.model.token_embedding.weight"], "sd2"),
        (["model.diffusion_model.x", "conditioner.embedders.1.model.positional_embedding"], "sdxl"),
        (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "lora"),
        (["first_stage_model.encoder.conv_in.weight"], "no_unet"),
    ],
)
def test_checkpoint_family(keys, family):
    assert checkpoint_family(keys) == family
