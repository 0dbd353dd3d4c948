"""Every way of pointing at a model gives the same weights, and every user mistake a clear UserError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tc_lite.errors import UserError
from tc_lite.models import freeze_and_cast, load_components, sd15_config_dir
from tc_lite.models.components import SDComponents

REVISION = "0123456789abcdef0123456789abcdef01234567"


@torch.no_grad()
def outputs(c: SDComponents) -> dict[str, torch.Tensor]:
    """Text embedding, one UNet prediction and one decode, from fixed inputs."""
    ids = c.tokenizer(["a red square", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    emb = c.text_encoder(ids)[0]
    g = torch.Generator().manual_seed(0)
    size = c.unet.config.sample_size
    z = torch.randn((2, 4, size, size), generator=g)
    return {
        "ids": ids,
        "emb": emb,
        "eps": c.unet(z, torch.tensor([500, 20]), emb).sample,
        "image": c.vae.decode(z / c.vae.config.scaling_factor).sample,
    }


def assert_same_model(a: SDComponents, b: SDComponents) -> None:
    out_a, out_b = outputs(a), outputs(b)
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key
    assert type(b.scheduler).__name__ == "DDIMScheduler"
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(b.scheduler.config) == public(a.scheduler.config)
    assert b.vae.config.scaling_factor == a.vae.config.scaling_factor
    assert b.tokenizer.model_max_length == 77


def test_tiny_source(tiny):
    c = load_components("tiny")
    assert c.source == "tiny" and c.family == "sd1"
    assert_same_model(tiny, c)


def test_diffusers_folder_round_trip(tiny, tiny_saved):
    folder, _ = tiny_saved
    assert not (folder / "safety_checker").exists()
    c = load_components(str(folder))
    assert c.source == str(folder)
    assert_same_model(tiny, c)


def test_single_file_round_trip(tiny, tiny_saved):
    folder, single = tiny_saved
    c = load_components(str(single), config_dir=str(folder))
    assert c.source == str(single)
    assert_same_model(tiny, c)


def test_single_file_dtype(tiny_saved):
    folder, single = tiny_saved
    c = load_components(str(single), config_dir=str(folder), dtype=torch.bfloat16)
    assert {p.dtype for p in c.unet.parameters()} == {torch.bfloat16}


def fake_hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


def test_hub_id_from_offline_cache(tiny, tiny_saved, tmp_path, monkeypatch):
    cache = fake_hub_cache(tmp_path / "hub", "tc-lite/tiny-sd", tiny_saved[0])
    # Set after huggingface_hub was imported: the loader must read both at call time.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = load_components("tc-lite/tiny-sd")
    assert c.source == "tc-lite/tiny-sd"
    assert_same_model(tiny, c)
    assert_same_model(tiny, load_components("tc-lite/tiny-sd", revision=REVISION))


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_components("someone/not-downloaded")
    assert "someone/not-downloaded" in str(err.value)
    assert "hf download someone/not-downloaded" in str(err.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(UserError, match=r"model\.allow_pickle: true") as err:
        load_components(str(path))
    assert str(path) in str(err.value) and "arbitrary code" in str(err.value)


def test_pickle_weights_in_a_folder_are_refused(tiny_saved, tmp_path):
    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_saved[0], folder)
    vae = folder / "vae"
    (vae / "diffusion_pytorch_model.safetensors").rename(vae / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"model\.allow_pickle: true"):
        load_components(str(folder))


def _fake_checkpoint(path: Path, keys: list[str]) -> Path:
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


@pytest.mark.parametrize(
    ("text_key", "message"),
    [
        ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
         r"looks like an SDXL checkpoint but model\.family is sd1; set model\.family: auto"),
        ("cond_stage_model.model.token_embedding.weight", r"looks like an SD2 model .*trains SD1\.x and SDXL"),
    ],
)
def test_sdxl_and_sd2_files_are_named(tmp_path, text_key, message):
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight", text_key]
    path = _fake_checkpoint(tmp_path / "other.safetensors", keys)
    with pytest.raises(UserError, match=rf"{path}.* {message}"):
        load_components(str(path))


def test_lora_file_is_not_a_model(tmp_path):
    path = _fake_checkpoint(tmp_path / "style.safetensors", ["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"])
    with pytest.raises(UserError, match="is a LoRA, not a base model"):
        load_components(str(path))


def test_inpainting_file_is_named(tmp_path):
    path = tmp_path / "inpaint.safetensors"
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}
    tensors |= {k: torch.zeros(1) for k in ("first_stage_model.x", "cond_stage_model.transformer.text_model.y")}
    save_file(tensors, str(path))
    with pytest.raises(UserError, match="inpainting/instruct model .*9 input channels"):
        load_components(str(path))


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="not a readable .safetensors file"):
        load_components(str(path))


@pytest.mark.parametrize("source", ["./missing/model.safetensors", "missing.safetensors", "/no/such/folder", "a/b/c"])
def test_missing_paths_are_named(source):
    with pytest.raises(UserError, match="does not exist") as err:
        load_components(source)
    assert source in str(err.value)


def test_architecture_mismatch_points_at_config_dir(tiny_saved):
    """The tiny file against the default (SD1.5) configs: shapes differ, the message says what to set."""
    with pytest.raises(UserError, match=r"does not fit the SD1\.x architecture .*set model\.config_dir"):
        load_components(str(tiny_saved[1]))


def test_config_dir_must_be_a_diffusers_folder(tiny_saved, tmp_path):
    with pytest.raises(UserError, match="model.config_dir"):
        load_components(str(tiny_saved[1]), config_dir=str(tmp_path))


def test_sd15_config_dir_is_complete_offline():
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = sd15_config_dir()
    index = DiffusionPipeline.load_config(str(folder))
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    unet = UNet2DConditionModel.load_config(str(folder), subfolder="unet")
    assert unet["cross_attention_dim"] == 768 and unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert CLIPTextConfig.from_pretrained(str(folder / "text_encoder")).hidden_size == 768
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"]) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_freeze_and_cast():
    from tc_lite.models.tiny import build_tiny_components

    c = build_tiny_components()
    freeze_and_cast(c, torch.bfloat16)
    for module in (c.text_encoder, c.unet, c.vae):
        assert not any(p.requires_grad for p in module.parameters())
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
