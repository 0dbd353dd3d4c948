"""The tiny SDXL model: SDXL-shaped (two encoders, added conditioning, real module names) and run by the family."""

from __future__ import annotations

import pytest
import torch

from tc_lite.families.sdxl import SDXL
from tc_lite.models.components import SDComponents
from tc_lite.models.tiny import TINY_RESOLUTION
from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

from .test_tiny import assert_follows_the_colour


@pytest.fixture(scope="module")
def random_sdxl() -> SDComponents:
    return build_tiny_sdxl_components(pretrain=False)


def test_sdxl_structure(random_sdxl):
    c = random_sdxl
    assert c.family == "sdxl" and c.source == "tiny-sdxl" and c.extra["force_zeros_for_empty_prompt"] is True
    assert type(c.text_encoder).__name__ == "CLIPTextModel"
    assert type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(c.scheduler).__name__ == "EulerDiscreteScheduler"
    from diffusers import DDIMScheduler

    assert DDIMScheduler.from_config(c.scheduler.config).config.clip_sample is False  # as from SDXL's own config
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


# ---- pretrained: the model follows the prompt ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl() -> SDComponents:
    return build_tiny_sdxl_components()


@torch.no_grad()
def euler_sample(c: SDComponents, prompts: list[str], steps: int = 10, guidance: float = 4.0, seed: int = 0):
    """Images in [0, 1]: SDXL's Euler sampler with classifier-free guidance against the family's unconditional
    embedding (zeros for the empty negative prompt), as `StableDiffusionXLPipeline` samples."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(c.scheduler.config)
    scheduler.set_timesteps(steps)
    family = SDXL()
    cond = family.encode(c, prompts)
    both = cond.cat(family.uncond(c, "").expand(len(prompts)), cond)
    size = c.unet.config.sample_size
    shape = (len(prompts), c.latent_channels, size, size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = c.unet(x, t, both.hidden, added_cond_kwargs=both.added).sample.chunk(2)
        latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
    images = c.vae.decode(latents / c.vae.config.scaling_factor).sample
    return ((images + 1) / 2).clamp(0, 1)


def test_prompts_change_the_image_colour(tiny_sdxl):
    """Euler 10 steps, CFG 4, eight seeds (same noise for every prompt): the mean colour of the decoded images
    follows the colour word, for red, green and blue squares."""
    assert_follows_the_colour(lambda prompts: euler_sample(tiny_sdxl, prompts, seed=11))


def test_both_conditioning_paths_carry_the_colour(tiny_sdxl):
    """A te1 or te2 LoRA moves the hidden states, te2's also the pooled embedding: the UNet must listen to each."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8)
    t = torch.tensor([800])
    with torch.no_grad():
        red, blue = (SDXL().encode(tiny_sdxl, [p]) for p in ("a red square", "a blue square"))
        eps = lambda cond: tiny_sdxl.unet(z, t, cond.hidden, added_cond_kwargs=cond.added).sample  # noqa: E731
        base = eps(red)
        hidden_only = eps(type(red)(blue.hidden, red.added))
        pooled_only = eps(type(red)(red.hidden, {**red.added, "text_embeds": blue.added["text_embeds"]}))
    for other in (hidden_only, pooled_only):
        assert (base - other).norm() / base.norm() > 0.02


def test_cached_and_deterministic(tiny_sdxl):
    from tc_lite.models.tiny_sdxl import tiny_sdxl_cache_path

    assert tiny_sdxl_cache_path(0).is_file()
    again = build_tiny_sdxl_components()
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        sa, sb = getattr(tiny_sdxl, name).state_dict(), getattr(again, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert again.vae.config.scaling_factor == tiny_sdxl.vae.config.scaling_factor
    assert again.vae.config.force_upcast is False


def test_pretraining_conditions_through_the_family(tmp_path, monkeypatch):
    """A few steps of the real recipe, twice: identical weights, the unconditional rows made by `SDXL.uncond`
    (zeros, as diffusers samples); then the cache file is used instead of training."""
    import tc_lite.models.tiny as tiny_module
    import tc_lite.models.tiny_sdxl as sdxl_module
    from tc_lite.families import sdxl as sdxl_family

    monkeypatch.setenv("TC_LITE_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_module, "_TRAIN", {**tiny_module._TRAIN, "vae_steps": 2, "unet_steps": 2, "batch_size": 4})
    monkeypatch.setattr(sdxl_module, "_TRAIN", {**sdxl_module._TRAIN, "unet_steps": 2, "batch_size": 4})
    uncond_rows = []
    real_uncond = sdxl_family.SDXL.uncond

    def spy(self, *args, **kwargs):
        out = real_uncond(self, *args, **kwargs)
        uncond_rows.append(out)
        return out

    monkeypatch.setattr(sdxl_family.SDXL, "uncond", spy)
    first = build_tiny_sdxl_components(seed=5)
    assert uncond_rows and all(not row.hidden.any() and not row.added["text_embeds"].any() for row in uncond_rows)
    path = sdxl_module.tiny_sdxl_cache_path(5)
    assert path.is_file() and path.parent.parent == tmp_path
    assert set(first.extra["tiny_stats"]) >= {"unet_loss", "seconds"}
    path.unlink()
    second = build_tiny_sdxl_components(seed=5)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        sa, sb = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(tiny_module, "_pretrain", no_training)
    third = build_tiny_sdxl_components(seed=5)
    assert torch.equal(third.unet.add_embedding.linear_1.weight, first.unet.add_embedding.linear_1.weight)


# ---- saving: a diffusers folder and an SGM single file that diffusers loads back -----------------------------------

_MODULES = ("text_encoder", "text_encoder_2", "unet", "vae")


@pytest.fixture(scope="module")
def tiny_sdxl_saved(tiny_sdxl, tmp_path_factory):
    from tc_lite.models.tiny_sdxl import save_tiny_sdxl_model

    root = tmp_path_factory.mktemp("tiny_sdxl_saved")
    folder, single = root / "tiny-sdxl", root / "tiny-sdxl.safetensors"
    save_tiny_sdxl_model(folder, single, components=tiny_sdxl)
    return folder, single


def _assert_same_weights(ours: SDComponents, pipe) -> None:
    for name in _MODULES:
        a, b = getattr(ours, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys(), name
        different = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].dtype))]
        assert not different, (name, different[:5])


def test_single_file_loads_back_through_diffusers(tiny_sdxl, tiny_sdxl_saved):
    """Every weight of the five modules survives the SGM layout: te2's q/k/v split from the fused in_proj at its
    hidden width and its [hidden, proj] projection transposed back (64 != 32 here, so either mistake would show)."""
    from diffusers import StableDiffusionXLPipeline

    folder, single = tiny_sdxl_saved
    pipe = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    _assert_same_weights(tiny_sdxl, pipe)
    assert pipe.vae.config.scaling_factor == tiny_sdxl.vae.config.scaling_factor
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.tokenizer_2.pad_token == "!" and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_folder_loads_through_from_pretrained(tiny_sdxl, tiny_sdxl_saved):
    import json

    from diffusers import StableDiffusionXLPipeline

    folder, _ = tiny_sdxl_saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    _assert_same_weights(tiny_sdxl, pipe)
    assert pipe.vae.config.force_upcast is False and pipe.tokenizer.pad_token == "<|endoftext|>"


def test_single_file_has_sgm_names(tiny_sdxl, tiny_sdxl_saved):
    from safetensors import safe_open

    from tc_lite.models.ldm_keys import checkpoint_family

    with safe_open(str(tiny_sdxl_saved[1]), "pt") as f:
        keys = set(f.keys())
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert checkpoint_family(keys) == "sdxl"
    te2 = tiny_sdxl.text_encoder_2.config
    assert tuple(projection.shape) == (te2.hidden_size, te2.projection_dim)
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.1.attn1.to_q.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",  # the upsampler after the level's attention
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
        "conditioner.embedders.1.model.positional_embedding",
        "first_stage_model.decoder.mid.attn_1.q.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)  # no first-level attention


def test_cli_tiny_model_family(tmp_path, tiny_sdxl, capsys):
    """`python -m tc_lite tiny-model OUT --single-file F --family sdxl` (the `tiny_sdxl` fixture has cached the
    weights); without --family it stays the SD1 model."""
    from tc_lite.cli import build_parser, main
    from tc_lite.models.ldm_keys import checkpoint_family

    assert build_parser().parse_args(["tiny-model", "out"]).family == "sd1"
    out, single = tmp_path / "folder", tmp_path / "tiny-sdxl.safetensors"
    assert main(["tiny-model", str(out), "--single-file", str(single), "--family", "sdxl"]) == 0
    assert "tiny sdxl model saved" in capsys.readouterr().out
    assert (out / "text_encoder_2" / "config.json").is_file() and (out / "tokenizer_2").is_dir()
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        assert checkpoint_family(f.keys()) == "sdxl"
