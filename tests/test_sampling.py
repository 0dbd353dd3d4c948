"""Truncated backprop through the sampler: where gradients flow, and that the loop matches diffusers' own."""

from __future__ import annotations

import copy

import pytest
import torch

from tc_lite.models import freeze_and_cast
from tc_lite.memory.tracker import cuda_autocast_policy
from tc_lite.lora import add_lora, trainable_parameters
from tc_lite.sampling import DenoisePlan, Denoiser, make_scheduler
from tests.conftest import prompt_encoder

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture()
def setup(tiny_components):
    comps = copy.deepcopy(tiny_components)
    freeze_and_cast(comps, torch.float32)  # as the recipe does: everything frozen, then the LoRA
    te = add_lora(comps.text_encoder, rank=4, alpha=4.0, targets=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    with torch.no_grad():  # non-zero LoRA so the tuned and original encoders differ
        for n, p in te.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    cond = prompt_encoder(comps, te)
    return comps, te, cond


def run(comps, cond, *, steps=4, grad_steps=2, schedule="two_encoder", checkpoint=True, scheduler="ddim", seed=0, start=0,
        latents=None, blocks=False):
    den = Denoiser(comps.unet, make_scheduler(scheduler, comps.scheduler))
    late = cond.tuned(PROMPTS)
    unc = cond.tuned([""])
    early, unc_early = (cond.base(PROMPTS), cond.base([""])) if schedule == "two_encoder" else (late, unc)
    if latents is None:
        latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    plan = DenoisePlan(steps, grad_steps, 4.0, checkpoint, checkpoint_blocks=blocks)
    return den.run(latents, plan, early=early, late=late, uncond_early=unc_early, uncond_late=unc, start=start)


def grads(te, out) -> torch.Tensor:
    for p in trainable_parameters(te):
        p.grad = None
    (out ** 2).mean().backward()
    return torch.cat([p.grad.flatten() for p in trainable_parameters(te)])


def test_gradients_reach_only_the_lora(setup):
    comps, te, cond = setup
    grads(te, run(comps, cond))
    for module in (comps.unet, comps.vae):
        assert all(p.grad is None for p in module.parameters())
    for n, p in te.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    assert all(p.grad.abs().sum() > 0 for p in trainable_parameters(te))


def test_only_the_last_k_unet_calls_build_a_graph(setup):
    comps, te, cond = setup
    calls = []
    h = comps.unet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    try:
        out = run(comps, cond, steps=5, grad_steps=2, checkpoint=False)
        assert calls == [False, False, False, True, True]
        calls.clear()
        grads(te, run(comps, cond, steps=5, grad_steps=2, checkpoint=True))
        assert calls == [False, False, False, True, True, True, True]  # + recompute of the 2 checkpointed calls
    finally:
        h.remove()
    assert out.requires_grad


def _prefix(comps, cond, encode, steps, upto):
    """The latent after `upto` no-grad steps, computed independently of Denoiser.run."""
    den = Denoiser(comps.unet, make_scheduler("ddim", comps.scheduler))
    sched = den.scheduler
    sched.set_timesteps(steps)
    lat = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    with torch.no_grad():
        c, u = encode(PROMPTS), encode([""])
        for t in sched.timesteps[:upto]:
            lat = sched.step(den._eps(lat, t, c, u, 4.0, False), t, lat, return_dict=False)[0]
    return lat


def test_two_encoder_prefix_contributes_nothing(setup):
    """With the two-encoder schedule the latent after T-K steps comes from the original encoder alone: starting
    the grad tail from a separately computed (cacheable) prefix gives the same gradients."""
    comps, te, cond = setup
    assert not torch.allclose(cond.base(PROMPTS).hidden, cond.tuned(PROMPTS).hidden)
    g_full = grads(te, run(comps, cond, steps=6, grad_steps=2))
    g_cached = grads(te, run(comps, cond, steps=6, grad_steps=2, start=4, latents=_prefix(comps, cond, cond.base, 6, 4)))
    torch.testing.assert_close(g_cached, g_full, rtol=1e-5, atol=1e-8)
    # ...and the test can fail: a prefix from the tuned encoder leads elsewhere.
    with torch.no_grad():
        wrong = _prefix(comps, cond, cond.tuned, 6, 4)
    g_wrong = grads(te, run(comps, cond, steps=6, grad_steps=2, start=4, latents=wrong))
    assert not torch.allclose(g_wrong, g_full, rtol=1e-3, atol=1e-8)


def test_k_equals_t_is_full_backprop(setup):
    comps, te, cond = setup
    g_trunc = grads(te, run(comps, cond, steps=3, grad_steps=3, schedule="tuned", checkpoint=False))
    # Reference: a plain loop with every step under autograd, written independently of Denoiser.
    sched = make_scheduler("ddim", comps.scheduler)
    sched.set_timesteps(3)
    lat = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    hidden = torch.cat([cond.tuned([""]).hidden.expand(2, -1, -1), cond.tuned(PROMPTS).hidden])
    for t in sched.timesteps:
        e_u, e_c = comps.unet(torch.cat([lat, lat]), t, encoder_hidden_states=hidden).sample.chunk(2)
        lat = sched.step(e_u + 4.0 * (e_c - e_u), t, lat).prev_sample
    torch.testing.assert_close(g_trunc, grads(te, lat), rtol=1e-5, atol=1e-7)  # float reassociation only


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_checkpointed_and_plain_steps_give_the_same_gradients(setup, scheduler):
    comps, te, cond = setup
    g_plain = grads(te, run(comps, cond, steps=4, grad_steps=3, checkpoint=False, scheduler=scheduler))
    g_ckpt = grads(te, run(comps, cond, steps=4, grad_steps=3, checkpoint=True, scheduler=scheduler))
    assert torch.isfinite(g_plain).all() and g_plain.abs().sum() > 0
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_block_checkpointing_gives_the_same_loss_and_gradients(setup, checkpoint):
    """memory.checkpoint_unet_blocks changes what is kept for backward, never what is computed."""
    comps, te, cond = setup
    outs, gs = [], []
    for blocks in (False, True):
        out = run(comps, cond, steps=4, grad_steps=2, checkpoint=checkpoint, blocks=blocks)
        outs.append((out ** 2).mean().detach())
        gs.append(grads(te, out))
    assert gs[0].abs().sum() > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(gs[1], gs[0], rtol=1e-6, atol=1e-9)


def test_block_checkpointing_recomputes_every_block_once_more_and_only_in_grad_steps(setup):
    """Counting a UNet block's forward calls: a checkpointed grad call runs each block twice (forward, the call's
    recompute), with block checkpointing three times (+ the block's own recompute inside the call's backward);
    the no-grad steps once either way. The switch is scoped to the grad calls: the UNet is left as it was."""
    comps, te, cond = setup
    # blocks diffusers checkpoints whose input depends on the prompt in every grad call (the first down ResNet sees
    # only the latent, which needs no gradient in the first grad call; the mid block's first ResNet is never
    # checkpointed by diffusers)
    unet = comps.unet
    blocks = [unet.down_blocks[0].attentions[0].transformer_blocks[0], unet.mid_block.resnets[1],
              unet.up_blocks[-1].resnets[-1]]
    calls: list[int] = [0] * len(blocks)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(blocks)]
    try:
        counts = {}
        for flag in (False, True):
            calls[:] = [0] * len(blocks)
            grads(te, run(comps, cond, steps=5, grad_steps=2, checkpoint=True, blocks=flag))
            counts[flag] = list(calls)
            assert not comps.unet.is_gradient_checkpointing
    finally:
        for h in hooks:
            h.remove()
    assert counts[False] == [3 + 2 * 2] * len(blocks)  # 3 no-grad calls + (forward, recompute) x 2 grad calls
    assert counts[True] == [3 + 2 * 3] * len(blocks)  # + each block's own recompute in the 2 grad calls


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_no_grad_sampling_matches_diffusers_pipeline(tiny_components, scheduler):
    """Our loop (CFG, input scaling, scheduler stepping) reproduces StableDiffusionPipeline on the same latents."""
    from diffusers import StableDiffusionPipeline

    comps = tiny_components
    sched = make_scheduler(scheduler, comps.scheduler)
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond = prompt_encoder(comps)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond.tuned(["a red square"]).hidden, negative_prompt_embeds=cond.tuned([""]).hidden,
                   latents=noise.clone(), num_inference_steps=6, guidance_scale=4.0, output_type="latent").images
        c, u = cond.tuned(["a red square"]), cond.tuned([""])
        ours = Denoiser(comps.unet, make_scheduler(scheduler, comps.scheduler)).run(
            noise.clone(), DenoisePlan(6, 0, 4.0, False), early=c, late=c, uncond_early=u, uncond_late=u)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_frozen_half_unet_runs_natively_and_passes_gradients_to_the_lora(tiny_components):
    """A frozen bf16 UNet ignores the recipe's autocast (no fp32 norm outputs kept for backward: DESIGN §4's
    +1.1 GiB at 512²), takes the fp32 LoRA encoder's output cast to bf16, and the gradient still reaches the LoRA."""
    comps = copy.deepcopy(tiny_components)
    freeze_and_cast(comps, torch.bfloat16)
    te = add_lora(comps.text_encoder, rank=4, alpha=4.0, targets=["q_proj", "v_proj"])
    cond = prompt_encoder(comps, te)
    norm_dtypes: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda m, a, out: norm_dtypes.add(out.dtype))
             for m in comps.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    den = Denoiser(comps.unet, make_scheduler("ddim", comps.scheduler),
                   lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    with den.autocast():
        assert not torch.is_autocast_enabled("cpu")
    late, unc = cond.tuned(PROMPTS), cond.tuned([""])  # bf16 base, peft runs the fp32 LoRA branch
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with cuda_autocast_policy():  # autocast as on CUDA, where norms would come out fp32
        out = den.run(latents, DenoisePlan(3, 1, 4.0, True), early=late, late=late, uncond_early=unc, uncond_late=unc)
    for h in hooks:
        h.remove()
    assert norm_dtypes == {torch.bfloat16}
    assert out.dtype == torch.float32
    g = grads(te, out)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
