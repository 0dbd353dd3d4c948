"""The UNet LoRA adapter on the tiny SD1: where gradients flow, what the prefix depends on, the drift penalty, and
which adapters train in which stage."""

from __future__ import annotations

import copy

import pytest
import torch

from tc_lite.adapters import active_adapters, build_adapters
from tc_lite.conditioning import PromptEncoder
from tc_lite.config import load_config
from tc_lite.errors import UserError
from tc_lite.families import FAMILIES
from tc_lite.lora import lora_layers
from tc_lite.models import freeze_and_cast
from tc_lite.prefix_rules import prefix_cache_problems
from tc_lite.sampling import DenoisePlan, Denoiser, DriftPenalty, make_scheduler
from tc_lite.unet_lora import unet_lora_modules

PROMPTS = ["a red square", "a blue circle"]
SD1 = FAMILIES["sd1"]


def make(tiny_components, *overrides: str, nonzero: bool = True):
    """Tiny SD1 components with the adapters `overrides` ask for; LoRA up weights random so they matter."""
    cfg = load_config(None, ["lora.rank=4", "lora.alpha=4", "unet.mode=lora", *overrides])
    comps = copy.deepcopy(tiny_components)
    freeze_and_cast(comps, torch.float32)
    adapters = build_adapters(cfg, SD1, comps)
    if nonzero:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for a in adapters:
                for _, layer in lora_layers(a.module()):
                    w = layer.lora_B["tc_lite"].weight
                    w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return cfg, comps, adapters, PromptEncoder(SD1, comps, adapters)


def denoise(comps, enc, *, steps=5, grad_steps=2, start=0, latents=None, drift=None):
    den = Denoiser(comps.unet, make_scheduler("ddim", comps.scheduler), drift=drift)
    if latents is None:
        latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    plan = DenoisePlan(steps, grad_steps, 4.0, checkpoint=True)
    return den.run(latents, plan, early=enc.base(PROMPTS), uncond_early=enc.uncond_base(""),
                   late=enc.tuned(PROMPTS), uncond_late=enc.uncond_tuned(""), start=start)


def grads(adapters, out) -> torch.Tensor:
    params = adapters.parameters()
    for p in params:
        p.grad = None
    (out ** 2).mean().backward()
    return torch.cat([p.grad.flatten() for p in params])


def test_the_unet_lora_adapts_every_transformer_projection_and_starts_as_the_base(tiny_components):
    _, comps, adapters, _ = make(tiny_components, nonzero=False)
    unet = adapters.adapters[-1]
    assert unet.key == "unet" and unet.affects_prefix and adapters.keys("unet") == {"unet"}
    names = unet_lora_modules(tiny_components.unet)
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
    blocks = {n.rsplit(".transformer_blocks.", 1)[0] for n in names if ".transformer_blocks." in n}
    assert len(names) == len(blocks) * (len(per_block) + 2)  # + proj_in, proj_out of each transformer
    assert {n for n, _ in lora_layers(comps.unet)} == set(names)
    x = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, comps.unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = tiny_components.unet(x, 10, encoder_hidden_states=hidden).sample
        out = comps.unet(x, 10, encoder_hidden_states=hidden).sample
    assert torch.equal(out, ref)  # lora_B starts at zero
    assert all(p.dtype == torch.float32 and p.requires_grad for p in unet.parameters())
    assert not any(p.requires_grad for n, p in comps.unet.named_parameters() if "lora_" not in n)


def test_gradients_reach_only_the_adapters(tiny_components):
    _, comps, adapters, enc = make(tiny_components)
    grads(adapters, denoise(comps, enc))
    ids = {id(p) for p in adapters.parameters()}
    for module in (comps.unet, comps.text_encoder, comps.vae):
        for n, p in module.named_parameters():
            assert (p.grad is not None) == (id(p) in ids), n
    for a in adapters:
        assert all(p.grad.abs().sum() > 0 for p in a.parameters()), a.key


def test_unet_gradients_come_only_through_the_last_k_steps(tiny_components):
    """Starting the grad tail from the detached latent the prefix reached gives the same gradients: nothing flows
    into the T−K no-grad steps, although (unlike a text-encoder LoRA) the UNet LoRA shapes them."""
    _, comps, adapters, enc = make(tiny_components)
    full = grads(adapters, denoise(comps, enc, steps=6, grad_steps=2))
    with torch.no_grad():
        prefix = _prefix(comps, enc, 4)
    torch.testing.assert_close(grads(adapters, denoise(comps, enc, steps=6, grad_steps=2, start=4, latents=prefix)),
                               full, rtol=1e-5, atol=1e-8)
    # The prefix does depend on the UNet LoRA (why the cache is refused): without it, the tail goes elsewhere.
    with torch.no_grad(), adapters.original(only={"unet"}):
        stale = _prefix(comps, enc, 4)
    assert not torch.allclose(stale, prefix, atol=1e-4)


def _prefix(comps, enc, upto: int) -> torch.Tensor:
    """The latent after `upto` of 6 DDIM steps, as the two-encoder schedule runs them: original text encoder,
    the UNet as it is (LoRA on)."""
    den = Denoiser(comps.unet, make_scheduler("ddim", comps.scheduler))
    return den.run(torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)), DenoisePlan(6, 2, 4.0),
                   early=enc.base(PROMPTS), uncond_early=enc.uncond_base(""), late=enc.tuned(PROMPTS),
                   uncond_late=enc.uncond_tuned(""), stop=upto)


def test_the_two_encoder_schedule_switches_only_the_text_encoders(tiny_components):
    _, comps, adapters, enc = make(tiny_components)
    with torch.no_grad():
        base = enc.base(PROMPTS).hidden
        with adapters.original():
            everything_off = enc.tuned(PROMPTS).hidden
        assert torch.equal(base, everything_off) and not torch.allclose(base, enc.tuned(PROMPTS).hidden)
    assert not lora_layers(comps.unet)[0][1].disable_adapters  # base() left the UNet LoRA on


def test_the_prefix_cache_is_refused_with_a_unet_lora(tiny_components):
    cfg, _, adapters, _ = make(tiny_components, nonzero=False)
    assert any("unet" in p for p in prefix_cache_problems(cfg.sampling, adapters))
    with pytest.raises(UserError, match="sampling.prefix_cache: a UNet LoRA"):
        load_config(None, ["unet.mode=lora", "sampling.prefix_cache=lazy"])


def test_drift_penalty_is_the_squared_distance_to_the_base_unet_and_pulls_back(tiny_components):
    _, comps, adapters, enc = make(tiny_components)
    drift = DriftPenalty(1.0, lambda: adapters.original(only={"unet"}))
    denoise(comps, enc, steps=5, grad_steps=2, drift=drift)
    assert len(drift.terms) == 2  # one per grad step, none in the no-grad prefix
    value = drift.take()
    assert value is not None and value.item() > 0 and drift.take() is None
    # Gradient descent on the penalty alone brings the UNet back toward the base.
    unet_params = adapters.adapters[-1].parameters()
    opt = torch.optim.SGD(unet_params, lr=0.5)
    for _ in range(3):
        denoise(comps, enc, steps=5, grad_steps=2, drift=drift)
        opt.zero_grad()
        drift.take().backward()
        opt.step()
    denoise(comps, enc, steps=5, grad_steps=2, drift=drift)
    assert drift.take().item() < 0.7 * value.item()
    # With the LoRA at zero the tuned UNet is the base: no drift.
    _, comps0, adapters0, enc0 = make(tiny_components, nonzero=False)
    d0 = DriftPenalty(1.0, lambda: adapters0.original(only={"unet"}))
    denoise(comps0, enc0, drift=d0)
    assert d0.take().item() == 0.0


@pytest.mark.parametrize("overrides, want", [
    ([], [{"te", "unet"}] * 6),
    (["unet.start_step=2"], [{"te"}] * 2 + [{"te", "unet"}] * 4),
    (["unet.stage=after_te", "unet.start_step=3"], [{"te"}] * 3 + [{"unet"}] * 3),
    (["lora.encoders=[]"], [{"unet"}] * 6),
])
def test_which_adapters_train_at_each_step(tiny_components, overrides, want):
    cfg, _, adapters, _ = make(tiny_components, "train.steps=6", *overrides, nonzero=False)
    assert [active_adapters(cfg, adapters, step) for step in range(6)] == want


def test_unet_settings_without_a_unet_lora_and_impossible_stages_are_reported(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(None, ["unet.rank=8", "unet.lr=1e-3"])
    assert "unet.lr: applies to the UNet LoRA, which is off" in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(None, ["unet.mode=lora", "unet.stage=after_te", "unet.targets=[to_q, attn]", "train.steps=10",
                           "unet.start_step=0"])
    assert "unet.targets[1]: 'attn'" in str(e.value) and "unet.stage: after_te" in str(e.value)
    with pytest.raises(UserError, match="lora.encoders is empty"):
        load_config(None, ["unet.mode=lora", "unet.stage=after_te", "unet.start_step=2", "lora.encoders=[]"])
    with pytest.raises(UserError, match="unet.start_step: 10 >= train.steps"):
        load_config(None, ["unet.mode=lora", "train.steps=10", "unet.start_step=10"])
