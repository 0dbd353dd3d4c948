"""SDXL through every loader (diffusers folder, offline hub cache, bundled configs) gives the same model, `model.vae`
replaces the VAE, and models tc-lite cannot train (refiner, SD3, FLUX, a family mismatch) are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tc_lite.config import ModelConfig
from tc_lite.errors import UserError
from tc_lite.families import FAMILIES, family_for, load_model
from tc_lite.models.components import SDComponents
from tc_lite.models.loading import bundled_config_dir

from .test_loading import REVISION, fake_hub_cache

SDXL = FAMILIES["sdxl"]


@pytest.fixture(scope="module")
def tiny_xl() -> SDComponents:
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    return build_tiny_sdxl_components(pretrain=False)


@pytest.fixture(scope="module")
def xl_folder(tiny_xl, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("xl") / "tiny-sdxl"
    SDXL.pipeline(tiny_xl).save_pretrained(str(folder))
    return folder


@torch.no_grad()
def outputs(c: SDComponents) -> dict[str, torch.Tensor]:
    cond = SDXL.encode(c, ["a red square", ""], size=(16, 16))
    size = c.unet.config.sample_size
    z = torch.randn((2, 4, size, size), generator=torch.Generator().manual_seed(0))
    eps = c.unet(z, torch.tensor([500, 20]), cond.hidden, added_cond_kwargs=cond.added).sample
    return {"hidden": cond.hidden, "pooled": cond.added["text_embeds"], "eps": eps,
            "image": c.vae.decode(z / c.vae.config.scaling_factor).sample}


def assert_same(a: SDComponents, b: SDComponents) -> None:
    out_a, out_b = outputs(a), outputs(b)
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key
    assert b.family == "sdxl" and b.extra["force_zeros_for_empty_prompt"] is True
    assert b.tokenizer_2.pad_token == "!" and type(b.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_folder_is_recognised_and_loads(tiny_xl, xl_folder):
    family, c = load_model(ModelConfig(source=str(xl_folder)), torch.float32)
    assert family is SDXL
    assert_same(tiny_xl, c)


def test_hub_id_from_offline_cache(tiny_xl, xl_folder, tmp_path, monkeypatch):
    cache = fake_hub_cache(tmp_path / "hub", "tc-lite/tiny-sdxl", xl_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(source="tc-lite/tiny-sdxl", revision=REVISION)
    assert family_for(cfg) is SDXL  # from the cached model_index.json, not the name
    assert_same(tiny_xl, load_model(cfg, torch.float32)[1])


def test_family_mismatch_is_named(xl_folder):
    with pytest.raises(UserError, match=r"looks like an SDXL model .* model\.family is sd1; set model\.family: auto"):
        load_model(ModelConfig(source=str(xl_folder), family="sd1"), torch.float32)


@pytest.mark.parametrize(("change", "message"), [
    ("refiner", "looks like the SDXL refiner"),
    ("sd3", "looks like a Stable Diffusion 3 model"),
    ("flux", "looks like a FLUX model"),
])
def test_untrainable_folders_are_refused(xl_folder, tmp_path, change, message):
    folder = tmp_path / change
    shutil.copytree(xl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    if change == "refiner":
        shutil.rmtree(folder / "text_encoder")
    else:
        index["_class_name"] = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[change]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=message):
        load_model(ModelConfig(source=str(folder)), torch.float32)


@pytest.mark.parametrize(("key", "message"), [
    ("conditioner.embedders.0.model.ln_final.weight", "SDXL refiner"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "Stable Diffusion 3"),
    ("double_blocks.0.img_attn.qkv.weight", "FLUX"),
])
def test_untrainable_files_are_refused(tmp_path, key, message):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1), "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(UserError, match=message):
        family_for(ModelConfig(source=str(path)))


def test_hub_names_decide_when_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert family_for(ModelConfig(source="stabilityai/stable-diffusion-xl-base-1.0")) is SDXL
    assert family_for(ModelConfig(source="stable-diffusion-v1-5/stable-diffusion-v1-5")) is FAMILIES["sd1"]
    assert family_for(ModelConfig(source="someone/anything", family="sdxl")) is SDXL  # explicit wins
    with pytest.raises(UserError, match="refiner"):
        family_for(ModelConfig(source="stabilityai/stable-diffusion-xl-refiner-1.0"))


def test_bundled_sdxl_configs_are_complete_offline():
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = bundled_config_dir("sdxl")
    index = DiffusionPipeline.load_config(str(folder))
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    unet = UNet2DConditionModel.load_config(str(folder), subfolder="unet")
    assert unet["cross_attention_dim"] == 2048 and unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + 1280
    assert CLIPTextConfig.from_pretrained(str(folder / "text_encoder")).hidden_size == 768
    te2 = CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
    assert (te2.hidden_size, te2.num_hidden_layers, te2.projection_dim) == (1280, 32, 1280)
    tok, tok2 = (CLIPTokenizer.from_pretrained(str(folder / sub)) for sub in ("tokenizer", "tokenizer_2"))
    ids = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("a photo of a cat").input_ids == ids == tok2("a photo of a cat").input_ids
    padded = tok2("a cat", padding="max_length", max_length=77).input_ids  # SDXL's tokenizer_2 pads with "!" (0)
    assert padded[4:6] == [0, 0] and tok("a cat", padding="max_length", max_length=77).input_ids[4] == 49407


def test_model_vae_replaces_the_vae(tiny_xl, xl_folder, tmp_path):
    """A VAE folder and a single `.safetensors` VAE in original (LDM) names both replace the model's VAE."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from tc_lite.models.ldm_keys import vae_key
    from tc_lite.models.vae import load_vae

    other = AutoencoderKL.from_config(tiny_xl.vae.config)
    torch.nn.init.normal_(other.decoder.conv_out.weight)
    other.save_pretrained(str(tmp_path / "vae"))
    _, c = load_model(ModelConfig(source=str(xl_folder), vae=str(tmp_path / "vae")), torch.float32)
    assert torch.equal(c.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    ldm = {"first_stage_model." + vae_key(k, other.config): v for k, v in other.state_dict().items()}
    save_file(ldm, str(tmp_path / "vae.safetensors"))
    _, c = load_model(ModelConfig(source=str(xl_folder), vae=str(tmp_path / "vae.safetensors")), torch.float32)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in c.vae.state_dict().items())
    with pytest.raises(UserError, match="not a SDXL VAE"):
        load_vae(str(tmp_path / "vae.safetensors"), torch.float32, family="sdxl")  # bundled config: real SDXL size
    with pytest.raises(UserError, match="model.vae: './nope' does not exist"):
        load_vae("./nope", torch.float32)
    with pytest.raises(UserError, match="model.vae: 'nope/' is neither an existing local path nor a valid hub id"):
        load_vae("nope/", torch.float32)


def test_single_file_through_the_loader(tiny_xl, tmp_path):
    """An SGM (A1111/ComfyUI) file: recognised by its keys, read with a config folder, every output equal."""
    from tc_lite.models.tiny_sdxl import save_tiny_sdxl_model

    folder, single = tmp_path / "folder", tmp_path / "tiny_xl.safetensors"
    save_tiny_sdxl_model(folder, single, components=tiny_xl)
    cfg = ModelConfig(source=str(single), config_dir=str(folder))
    assert family_for(cfg) is SDXL
    family, c = load_model(cfg, torch.float32)
    assert family is SDXL and c.source == str(single)
    assert_same(tiny_xl, c)
    with pytest.raises(UserError, match=r"does not fit the SDXL architecture .*set model\.config_dir"):
        load_model(ModelConfig(source=str(single)), torch.float32)  # the bundled configs are real SDXL's
