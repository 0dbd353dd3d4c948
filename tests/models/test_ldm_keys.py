"""Our diffusers -> LDM names must be exactly what diffusers' single-file converter maps back, for SD1.5 and SDXL."""

from __future__ import annotations

import json

import pytest

from tc_lite.models.components import SDComponents
from tc_lite.models.ldm_keys import (
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    checkpoint_family,
    ldm_state_dict,
    open_clip_state_dict,
    sdxl_ldm_state_dict,
)
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


# ---- SDXL (SGM layout) ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_meta() -> SDComponents:
    """SDXL base's architecture from the bundled configs, on the meta device."""
    from pathlib import Path

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import tc_lite

    folder = Path(tc_lite.__file__).parent / "assets" / "sdxl"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2")))
    return SDComponents(tokenizer=None, text_encoder=te1, unet=unet, vae=vae, scheduler=None, family="sdxl",
                        text_encoder_2=te2)


@pytest.fixture(scope="module")
def tiny_sdxl_random() -> SDComponents:
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    return build_tiny_sdxl_components(pretrain=False)


@pytest.mark.parametrize("model", ["sdxl_meta", "tiny_sdxl_random"])
def test_diffusers_converter_inverts_our_sdxl_names(model, request):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    c = request.getfixturevalue(model)
    ldm = sdxl_ldm_state_dict(c)
    te1 = {k: v for k, v in ldm.items() if k.startswith(SDXL_CLIP_PREFIX)}
    te2_back = convert_open_clip_checkpoint(c.text_encoder_2, ldm, prefix=SDXL_OPEN_CLIP_PREFIX)
    for module, back in (
        (c.unet, convert_ldm_unet_checkpoint(ldm, c.unet.config)),
        (c.vae, convert_ldm_vae_checkpoint(ldm, c.vae.config)),
        (c.text_encoder, {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(te1).items()}),
        (c.text_encoder_2, te2_back),
    ):
        ours = module.state_dict()
        assert set(back) == set(ours)
        assert all(back[k].shape == ours[k].shape for k in ours)
    n_te2 = len(c.text_encoder_2.state_dict()) - 4 * c.text_encoder_2.config.num_hidden_layers  # q,k,v -> in_proj
    assert len(ldm) == len(c.unet.state_dict()) + len(c.vae.state_dict()) + len(c.text_encoder.state_dict()) + n_te2
    assert checkpoint_family(ldm) == "sdxl"


def test_sdxl_names_match_the_original_checkpoint(sdxl_meta):
    shapes = {k: tuple(v.shape) for k, v in sdxl_ldm_state_dict(sdxl_meta).items()}
    # Keys and shapes as they appear in sd_xl_base_1.0.safetensors.
    unet = "model.diffusion_model."
    assert shapes[unet + "label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[unet + "label_emb.0.2.weight"] == (1280, 1280)
    assert shapes[unet + "input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes[unet + "input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert shapes[unet + "input_blocks.4.1.proj_in.weight"] == (640, 640)  # linear projections
    assert shapes[unet + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    assert shapes[unet + "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight"] == (1280, 5120)
    assert shapes[unet + "middle_block.1.transformer_blocks.9.attn1.to_q.weight"] == (1280, 1280)
    assert shapes[unet + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[unet + "output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes[unet + "output_blocks.6.0.skip_connection.weight"] == (320, 960, 1, 1)
    assert not any(k.startswith(unet + "input_blocks.1.1.") or k.startswith(unet + "output_blocks.6.1.")
                   for k in shapes)  # the first level has no attention
    assert shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    g = "conditioner.embedders.1.model."
    assert shapes[g + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes[g + "transformer.resblocks.31.attn.in_proj_bias"] == (3840,)
    assert shapes[g + "transformer.resblocks.0.attn.out_proj.weight"] == (1280, 1280)
    assert shapes[g + "transformer.resblocks.0.mlp.c_fc.weight"] == (5120, 1280)
    assert shapes[g + "transformer.resblocks.0.ln_2.bias"] == (1280,)
    assert shapes[g + "positional_embedding"] == (77, 1280)
    assert shapes[g + "token_embedding.weight"] == (49408, 1280)
    assert shapes[g + "ln_final.weight"] == (1280,)
    assert shapes[g + "text_projection"] == (1280, 1280)
    assert shapes["first_stage_model.decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)


def test_open_clip_layout_stacks_qkv_and_transposes_the_projection(tiny_sdxl_random):
    import torch

    te2 = tiny_sdxl_random.text_encoder_2
    sd = {k.removeprefix("text_model."): v for k, v in te2.state_dict().items()}
    out = open_clip_state_dict(te2)
    layer = "encoder.layers.1.self_attn."
    fused = out["transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([sd[layer + f"{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(out["transformer.resblocks.1.attn.in_proj_bias"],
                       torch.cat([sd[layer + f"{p}_proj.bias"] for p in "qkv"]))
    assert torch.equal(out["text_projection"], sd["text_projection.weight"].T)
    x = torch.randn(2, te2.config.hidden_size)  # OpenCLIP's x @ P is transformers' Linear
    assert torch.allclose(x @ out["text_projection"], te2.text_projection(x), atol=1e-6)
