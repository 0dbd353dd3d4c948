"""The tiny model is what every learning test trains on: it must be deterministic, SD1-shaped, and listen to text."""

from __future__ import annotations

import pytest
import torch

from tc_lite.models import TINY_COLOURS, TINY_OBJECTS, TINY_RESOLUTION, build_tiny_components, tiny_prompts
from tc_lite.models.tiny import synthetic_dataset, tiny_cache_path

# Sampled mean colours must differ by at least this much (the data's own difference is 0.25: a quarter-area square).
COLOUR_MARGIN = 0.10


def test_prompts_cover_colours_and_objects():
    prompts = tiny_prompts()
    assert len(prompts) == len(TINY_COLOURS) * len(TINY_OBJECTS) == len(set(prompts))
    assert "a red square" in prompts and "a blue square" in prompts


def test_shapes_and_sd1_structure(tiny):
    assert tiny.family == "sd1" and tiny.source == "tiny"
    assert tiny.vae_scale_factor * tiny.unet.config.sample_size == TINY_RESOLUTION
    assert tiny.latent_channels == 4 == tiny.vae.config.latent_channels
    assert tiny.text_encoder.config.vocab_size == 49408 and tiny.text_encoder.config.max_position_embeddings == 77
    assert tiny.unet.config.cross_attention_dim == tiny.text_encoder.config.hidden_size
    names = {n for n, _ in tiny.text_encoder.named_modules()}
    targets = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    for layer in range(tiny.text_encoder.config.num_hidden_layers):  # the names LoRA targets and kohya keys use
        for mod in targets:
            assert f"encoder.layers.{layer}.{mod}" in names
    sched = tiny.scheduler.config
    assert type(tiny.scheduler).__name__ == "DDIMScheduler"
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sched.num_train_timesteps, sched.prediction_type) == (1000, "epsilon")


def test_deterministic_and_cached(tiny):
    assert tiny_cache_path(0).is_file()
    again = build_tiny_components()
    for a, b in ((tiny.text_encoder, again.text_encoder), (tiny.unet, again.unet), (tiny.vae, again.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert again.vae.config.scaling_factor == tiny.vae.config.scaling_factor


def test_random_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_tiny_components(seed=3, pretrain=False), build_tiny_components(seed=3, pretrain=False)
    c = build_tiny_components(seed=4, pretrain=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    w = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.text_encoder.state_dict()[w], b.text_encoder.state_dict()[w])
    assert not torch.equal(a.text_encoder.state_dict()[w], c.text_encoder.state_dict()[w])


def test_synthetic_data_mean_colours():
    images, pid = synthetic_dataset()
    assert images.shape[1:] == (3, TINY_RESOLUTION, TINY_RESOLUTION) and images.min() >= -1 and images.max() <= 1
    red = images[pid == tiny_prompts().index("a red square")]
    rgb = ((red + 1) / 2).mean((0, 2, 3))
    assert rgb.tolist() == pytest.approx([0.625, 0.375, 0.375])  # grey 0.5, a quarter of the area pure red


def test_prompts_change_the_image_colour(tiny, sample):
    """DDIM 10 steps, CFG 4, eight seeds: red vs blue (and green) squares decode to clearly different colours."""
    assert_follows_the_colour(lambda prompts: sample(tiny, prompts, seed=11))


def assert_follows_the_colour(sample) -> None:
    """`sample(prompts)` -> images: eight of each of red, green and blue squares (the same noise for every prompt)
    decode to images whose mean colour is clearly the one asked for."""
    means = {c: sample([f"a {c} square"] * 8).mean((0, 2, 3)) for c in ("red", "green", "blue")}
    r, g, b = means["red"], means["green"], means["blue"]
    assert r[0] - b[0] > COLOUR_MARGIN and b[2] - r[2] > COLOUR_MARGIN, (r, b)
    assert g[1] - r[1] > COLOUR_MARGIN and g[1] - b[1] > COLOUR_MARGIN, (r, g, b)
    for colour, channel in (("red", 0), ("green", 1), ("blue", 2)):
        assert int(means[colour].argmax()) == channel, (colour, means[colour])


def test_text_embedding_carries_the_colour(tiny, encode_prompts):
    """The conditioning path a text-encoder LoRA pushes on: swapping only the embedding must change the output."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, tiny.unet.config.sample_size, tiny.unet.config.sample_size)
    with torch.no_grad():
        red, blue = encode_prompts(tiny, ["a red square", "a blue square"]).chunk(2)
        t = torch.tensor([800])
        eps_red, eps_blue = tiny.unet(z, t, red).sample, tiny.unet(z, t, blue).sample
    assert (eps_red - eps_blue).norm() / eps_red.norm() > 0.05


def test_pretraining_is_reproducible_and_cached(tmp_path, monkeypatch):
    """A few steps of the real recipe, twice: identical weights; then the cache file is used instead of training."""
    import tc_lite.models.tiny as tiny_module

    monkeypatch.setenv("TC_LITE_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_module, "_TRAIN", {**tiny_module._TRAIN, "vae_steps": 2, "unet_steps": 2, "batch_size": 4})
    first = build_tiny_components(seed=5)
    path = tiny_cache_path(5)
    assert path.is_file() and path.parent.parent == tmp_path
    assert set(first.extra["tiny_stats"]) >= {"vae_loss", "unet_loss", "seconds"}
    path.unlink()
    second = build_tiny_components(seed=5)
    for a, b in ((first.unet, second.unet), (first.text_encoder, second.text_encoder), (first.vae, second.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(tiny_module, "_pretrain", no_training)
    third = build_tiny_components(seed=5)
    assert torch.equal(third.unet.conv_in.weight, first.unet.conv_in.weight)
    assert third.vae.config.scaling_factor == first.vae.config.scaling_factor
