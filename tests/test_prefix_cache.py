"""The prefix cache: exact tails, keys that notice every setting, stale entries never reused, learning still works."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tc_lite.config import load_config
from tc_lite.decode import decode
from tc_lite.errors import UserError
from tc_lite.lora import add_lora
from tc_lite.families import FAMILIES
from tc_lite.prefix_cache import (
    PrefixCache,
    build_prefix_cache,
    noise_seed,
    prefix_identity,
    weights_fingerprint,
)
from tc_lite.render import RenderPlan, Renderer
from tc_lite.sampling import DenoisePlan, Denoiser, make_scheduler
from tests.conftest import prompt_encoder
from tc_lite.train import Recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "presets" / "tiny-cpu.yaml"


def tiny_cfg(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"output.dir={tmp_path / 'run'}", "logging.progress=false", *overrides])


@pytest.fixture
def setup(tiny_components):
    """A LoRA'd tiny pipeline whose LoRA is already non-zero (so gradients reach both LoRA matrices)."""
    comps = copy.deepcopy(tiny_components)
    comps.text_encoder.requires_grad_(False)
    te = add_lora(comps.text_encoder, rank=4, alpha=4.0, init_seed=0)
    with torch.no_grad():
        for name, p in te.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    conditioner = prompt_encoder(comps, te)
    return comps, te, conditioner


SD1 = FAMILIES["sd1"]


def _cache(tmp_path, comps, conditioner, cfg, dtype=torch.float16) -> PrefixCache:
    identity = prefix_identity(cfg, SD1, comps, precision="fp32", device=torch.device("cpu"))
    uncond = conditioner.base([cfg.sampling.negative_prompt])
    renderer = Renderer(comps, RenderPlan.from_sampling(cfg.sampling, tuned_steps=0),
                        lambda: torch.autocast("cpu", enabled=False))
    return PrefixCache(tmp_path / "cache", identity, renderer=renderer,
                       compute_conditioning=lambda ps: (conditioner.base(ps), uncond), train_seed=cfg.train.seed,
                       dtype=dtype)


@pytest.mark.parametrize("scheduler,dtype", [("ddim", torch.float32), ("euler", torch.float32),
                                             ("ddim", torch.float16)])
def test_cached_tail_gives_the_same_gradients(tmp_path, setup, scheduler, dtype):
    comps, te, conditioner = setup
    cfg = tiny_cfg(tmp_path, f"sampling.scheduler={scheduler}", "sampling.steps=6", "sampling.grad_steps=2")
    cache = _cache(tmp_path, comps, conditioner, cfg, dtype)
    prompts = ["a red square", "a blue circle"]
    lora = [p for p in te.parameters() if p.requires_grad]
    plan = DenoisePlan(6, 2, 4.0, checkpoint=True)

    def grads(latents: torch.Tensor, start: int) -> list[torch.Tensor]:
        denoiser = Denoiser(comps.unet, make_scheduler(scheduler, comps.scheduler))
        cond = {"early": conditioner.base(prompts), "uncond_early": conditioner.base([""]),
                    "late": conditioner.tuned(prompts), "uncond_late": conditioner.tuned([""])}
        images = decode(comps.vae, denoiser.run(latents, plan, start=start, **cond))
        return list(torch.autograd.grad(images[:, 0].mean() - images[:, 1:].mean(), lora))

    noise = torch.cat([cache.noise(cache.seed_for(p)) for p in prompts])
    uncached = grads(noise, 0)
    first = cache.latents(prompts)  # computed and written
    again = cache.latents(prompts)  # read back from disk
    assert (cache.misses, cache.hits) == (2, 2) and torch.equal(first, again)
    cached = grads(again, cache.start)
    if dtype == torch.float32:
        assert all(torch.equal(a, b) for a, b in zip(uncached, cached))
    else:  # the fp16 file rounds the latent (|err| < 1e-3 of its scale): gradients agree to fp16 precision
        assert all(torch.allclose(a, b, rtol=2e-2, atol=1e-4 * a.abs().max()) for a, b in zip(uncached, cached))


def test_every_keyed_setting_changes_the_key(tmp_path, setup):
    comps, _, conditioner = setup
    base_cfg = tiny_cfg(tmp_path)

    def folder(*overrides: str, precision: str = "fp32", device: str = "cpu", components=comps) -> Path:
        cfg = tiny_cfg(tmp_path, *overrides)
        identity = prefix_identity(cfg, SD1, components, precision=precision, device=torch.device(device))
        renderer = Renderer(comps, RenderPlan.from_sampling(cfg.sampling))
        return PrefixCache(tmp_path, identity, renderer=renderer, compute_conditioning=lambda ps: None).folder

    changed = copy.deepcopy(comps)
    with torch.no_grad():
        next(changed.unet.parameters()).view(-1)[0] += 1e-3  # a different checkpoint behind the same name
    folders = [folder(), folder("sampling.scheduler=euler"), folder("sampling.steps=12"),
               folder("sampling.grad_steps=3"), folder("sampling.guidance_scale=5"), folder("sampling.eta=0.5"),
               folder("sampling.height=24"), folder("sampling.width=24"), folder("sampling.negative_prompt=blurry"),
               folder("model.revision=abc"), folder(precision="bf16"), folder(device="cuda"),
               folder(components=changed)]
    assert len(set(folders)) == len(folders)
    assert folder() == folder("optim.lr=0.5", "train.steps=3", "lora.rank=2")  # what the prefix ignores
    cache = _cache(tmp_path, comps, conditioner, base_cfg)
    keys = {json.dumps(cache.entry_key(p, s), sort_keys=True) for p in ("a", "b") for s in (0, 1)}
    assert len(keys) == 4
    assert noise_seed(0, "a red square") == noise_seed(0, "a red square") != noise_seed(1, "a red square")
    assert noise_seed(0, "a red square", variant=1) != noise_seed(0, "a red square")
    assert weights_fingerprint(comps.unet) != weights_fingerprint(changed.unet)


def test_stale_or_broken_entries_are_recomputed_never_reused(tmp_path, setup):
    from tc_lite.io import save_safetensors_atomic

    comps, _, conditioner = setup
    cache = _cache(tmp_path, comps, conditioner, tiny_cfg(tmp_path))
    good = cache.latents(["a red square"])
    key = cache.entry_key("a red square", cache.seed_for("a red square"))
    path = cache._path(key)
    wrong = dict(key, prompt="something else")  # a file at this path whose stored key is not ours
    save_safetensors_atomic({"latent": torch.zeros(1, 4, 8, 8, dtype=torch.float16)}, path,
                            metadata={"key": json.dumps(wrong, sort_keys=True)})
    assert torch.equal(cache.latents(["a red square"]), good) and cache.misses == 2
    path.write_bytes(b"truncated")
    assert torch.equal(cache.latents(["a red square"]), good) and cache.misses == 3
    assert cache.latents(["a red square"]) is not None and cache.hits == 1  # the rewrite is valid again
    assert not list(path.parent.glob("*.tmp"))


def test_reward_rises_with_the_prefix_cache_on(tmp_path, tiny_components):
    """The tiny preset, prefix cache lazy: same learning signal; the prefix is computed once per prompt."""
    cfg = tiny_cfg(tmp_path, "sampling.prefix_cache=lazy", "logging.sample_every=0")
    recipe = Recipe(cfg, log=lambda s: None).setup()
    rewards = [recipe.train_step()["reward"] for _ in range(cfg.train.steps)]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last - first > 0.02, (first, last)
    n_prompts = len(set(recipe.sampler.prompts))
    assert recipe.prefix_cache.misses == n_prompts  # every later visit of a prompt was a hit
    assert recipe.prefix_cache.hits == cfg.train.steps * cfg.train.batch_size - n_prompts


def test_prefill_fills_every_prompt_first(tmp_path, tiny_components):
    cfg = tiny_cfg(tmp_path, "sampling.prefix_cache=prefill", "logging.sample_every=0", "train.steps=1")
    recipe = Recipe(cfg, log=lambda s: None).setup()
    n = len(set(recipe.sampler.prompts))
    assert len(list(recipe.prefix_cache.folder.glob("*.safetensors"))) == n
    assert (recipe.prefix_cache.hits, recipe.prefix_cache.misses) == (0, n)
    recipe.train_step()
    assert (recipe.prefix_cache.hits, recipe.prefix_cache.misses) == (cfg.train.batch_size, n)
    again = build_prefix_cache(recipe.cfg, recipe.family, recipe.components, recipe.adapters, recipe.encoder,
                               recipe.precision, Path(cfg.output.dir))
    assert again.prefill(recipe.sampler.prompts, log=lambda s: None) == 0  # a second run reuses everything


def test_variants_and_a_shared_cache_dir(tmp_path, tiny_components):
    """prefix_variants=2 prefills two noises per prompt and steps draw from both; a second run pointed at the same
    prefix_cache_dir (another output.dir, another learning rate) computes nothing."""
    shared = tmp_path / "shared-prefix"
    common = ["sampling.prefix_cache=prefill", "sampling.prefix_variants=2", f"sampling.prefix_cache_dir={shared}",
              "logging.sample_every=0", "train.steps=6"]
    first = Recipe(tiny_cfg(tmp_path / "a", *common), log=lambda s: None).setup()
    n = len(set(first.sampler.prompts))
    assert first.prefix_cache.folder.parent == shared
    assert len(list(first.prefix_cache.folder.glob("*.safetensors"))) == 2 * n
    seen: set[int] = set()
    original = first.prefix_cache.latents

    def recording(prompts, variant=0):
        seen.update([variant] if isinstance(variant, int) else variant)
        return original(prompts, variant)

    first.prefix_cache.latents = recording
    for _ in range(6):
        first.train_step()
    assert seen == {0, 1}
    said: list[str] = []
    second = Recipe(tiny_cfg(tmp_path / "b", *common, "optim.lr=1e-3"), log=said.append).setup()
    assert second.prefix_cache.misses == 0 and not any("computing" in line for line in said)


def test_prefix_options_without_the_cache_are_config_errors(tmp_path):
    with pytest.raises(UserError, match="sampling.prefix_variants: applies to the prefix cache"):
        tiny_cfg(tmp_path, "sampling.prefix_variants=3")
    with pytest.raises(UserError) as both:  # every problem at once
        tiny_cfg(tmp_path, "sampling.prefix_variants=3", f"sampling.prefix_cache_dir={tmp_path}")
    assert "sampling.prefix_variants: applies" in str(both.value) and "sampling.prefix_cache_dir: applies" in str(both.value)


def test_one_place_decides_whether_the_cache_may_be_used(tmp_path):
    """`prefix_cache_problems` is what the config check and the cache ask: the schedule, the scheduler, random
    truncation, and any adapter that changes the no-grad prefix (a UNet LoRA) all refuse it, each by name."""
    from types import SimpleNamespace

    from tc_lite.prefix_rules import prefix_cache_problems

    ok = tiny_cfg(tmp_path, "sampling.prefix_cache=lazy").sampling
    assert prefix_cache_problems(ok) == []
    unet_lora = SimpleNamespace(key="unet", kind="lora", affects_prefix=True)
    text_lora = SimpleNamespace(key="te", kind="lora", affects_prefix=False)
    assert prefix_cache_problems(ok, [text_lora]) == []
    (msg,) = prefix_cache_problems(ok, [text_lora, unet_lora])
    assert "lora on unet changes the no-grad prefix" in msg
    bad = tiny_cfg(tmp_path, "sampling.encoder_schedule=tuned", "sampling.scheduler=dpm++",
                   "sampling.grad_steps_min=1").sampling
    assert len(prefix_cache_problems(bad)) == 3
    with pytest.raises(UserError) as err:  # the same rules, through the config check, all at once
        tiny_cfg(tmp_path, "sampling.prefix_cache=lazy", "sampling.encoder_schedule=tuned", "sampling.scheduler=dpm++")
    assert "two_encoder" in str(err.value) and "DPM++" in str(err.value)


def test_the_key_names_the_family_and_skips_trained_weights(tmp_path, setup):
    comps, te, _ = setup
    cfg = tiny_cfg(tmp_path)
    identity = prefix_identity(cfg, SD1, comps, precision="fp32", device=torch.device("cpu"))
    assert identity["model"]["family"] == "sd1"
    with torch.no_grad():
        for name, p in te.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)  # training moves the LoRA: the prefix (LoRA off) and its key do not change
    assert prefix_identity(cfg, SD1, comps, precision="fp32", device=torch.device("cpu")) == identity


def test_fingerprint_of_a_tensor_larger_than_fp32_can_index():
    """SD1.5's 1280x2560x3x3 UNet convs have 29,491,200 values: fp32 sample positions would round past the end."""
    big = torch.nn.Linear(1, 2**24 + 3, bias=False)
    assert len(weights_fingerprint(big)) == 64
