"""Precision resolution, the attention fallback, and the optimizers/schedules the presets can name."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tc_lite.config import MemoryConfig, OptimConfig
from tc_lite.errors import UserError
from tc_lite.optim import build_optimizer, build_schedule
from tc_lite.precision import resolve_precision, set_attention


def test_cpu_auto_is_fp32_with_a_disabled_scaler_and_no_autocast():
    p = resolve_precision(MemoryConfig(device="cpu"))
    assert (p.name, p.weight_dtype, p.scaler.is_enabled()) == ("fp32", torch.float32, False)
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")
    b = resolve_precision(MemoryConfig(device="cpu", precision="bf16"))
    with b.autocast():
        assert torch.is_autocast_enabled("cpu")


def test_impossible_device_requests_are_user_errors():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision(MemoryConfig(device="cpu", precision="fp16"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="memory.device: cuda was asked for"):
            resolve_precision(MemoryConfig(device="cuda"))


def test_xformers_request_off_cuda_falls_back_to_sdpa_with_a_message(tiny_components):
    said: list[str] = []
    assert set_attention(tiny_components.unet, "xformers", torch.device("cpu"), warn=said.append) == "sdpa"
    assert len(said) == 1 and "falling back to PyTorch SDPA" in said[0]
    assert set_attention(tiny_components.unet, "auto", torch.device("cpu"), warn=said.append) == "sdpa"
    assert len(said) == 1  # auto falls back silently


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizers_take_a_step(name):
    pytest.importorskip("bitsandbytes") if name == "adamw8bit" else None
    w = torch.nn.Parameter(torch.ones(4096))
    opt = build_optimizer([w], OptimConfig(name=name, lr=1e-2))
    (w ** 2).sum().backward()
    opt.step()
    assert torch.all(w < 1.0)
    if name == "adamw8bit":
        assert type(opt).__module__.startswith("bitsandbytes")


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),  # reaches 0 at train.steps
    ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25]),
])
def test_warmup_then_schedule(schedule, expected):
    w = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([w], OptimConfig(lr=1.0, schedule=schedule, warmup_steps=2))
    sched = build_schedule(opt, OptimConfig(lr=1.0, schedule=schedule, warmup_steps=2), total_steps=5)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------- the VAE's dtype


def _vae(**config):
    from diffusers import AutoencoderKL

    from tc_lite.models.tiny import TINY_VAE

    return AutoencoderKL.from_config({**TINY_VAE, **config}).requires_grad_(False)


@pytest.mark.parametrize("choice,weights,expected", [
    ("auto", torch.float16, torch.float32),  # SDXL's VAE on an fp16-only card: upcast, as the SDXL pipeline does
    ("auto", torch.bfloat16, torch.bfloat16),  # bf16 has fp32's range: never upcast
    ("auto", torch.float32, torch.float32),
    ("weights", torch.float16, torch.float16), ("weights", torch.bfloat16, torch.bfloat16),
    ("fp32", torch.float16, torch.float32), ("fp32", torch.bfloat16, torch.float32),
])
def test_vae_dtype_of_a_vae_that_says_force_upcast(choice, weights, expected):
    from tc_lite.precision import vae_dtype

    assert vae_dtype(MemoryConfig(vae_precision=choice), _vae(force_upcast=True), weights) == expected


def test_vae_dtype_auto_keeps_fp16_for_an_fp16_safe_vae_and_for_sd15s_config():
    """madebyollin/sdxl-vae-fp16-fix states force_upcast: false; SD1.5's config predates the key (diffusers then
    defaults it to true, but its SD1 pipeline never upcasts): both decode in fp16."""
    from diffusers import AutoencoderKL

    from tc_lite.models.loading import bundled_config_dir
    from tc_lite.precision import vae_dtype

    auto = MemoryConfig(vae_precision="auto")
    assert vae_dtype(auto, _vae(force_upcast=False), torch.float16) == torch.float16
    with torch.device("meta"):
        sd15 = AutoencoderKL.from_config(AutoencoderKL.load_config(str(bundled_config_dir("sd1") / "vae")))
        sdxl = AutoencoderKL.from_config(AutoencoderKL.load_config(str(bundled_config_dir("sdxl") / "vae")))
    assert sd15.config.force_upcast  # diffusers' default...
    assert vae_dtype(auto, sd15, torch.float16) == torch.float16  # ...which the SD1 pipeline ignores, as we do
    assert vae_dtype(auto, sdxl, torch.float16) == torch.float32


def test_a_frozen_fp32_vae_decodes_in_fp32_under_half_autocast():
    """The run's autocast (CPU bf16 standing in for CUDA fp16) must not cast a frozen fp32 VAE's convolutions back
    down: the decoder's conv outputs stay fp32, and the image keeps its gradient."""
    from tc_lite.decode import decode
    from tc_lite.precision import autocast_for

    vae = _vae(force_upcast=True)
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
             for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    half = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    images = decode(vae, latents, half)
    assert seen == {torch.float32}
    images.mean().backward()
    assert latents.grad is not None and torch.isfinite(latents.grad).all()
    # the rule's edges: a bf16 frozen VAE runs natively too; a module with a trainable weight keeps the autocast
    seen.clear()
    decode(vae.to(torch.bfloat16), latents.detach(), half)
    assert seen == {torch.bfloat16}
    lin = torch.nn.Linear(2, 2)
    assert autocast_for(lin, half) is half
    assert autocast_for(lin.requires_grad_(False), half) is not half


def test_a_half_unet_with_an_fp32_lora_runs_natively_and_its_lora_gradients_match_autocast():
    """A UNet LoRA (fp32 factors, trainable) on a frozen half UNet runs natively (`autocast_for`): peft computes the
    LoRA branch in fp32 and casts the sum back. Its LoRA gradients (bf16 on the CPU standing in for fp16 on CUDA)
    are finite and as close to the fp32 ones as autocast's are, and within 3% of autocast's."""
    import copy

    from tc_lite.models.tiny import build_tiny_components
    from tc_lite.precision import autocast_for
    from tc_lite.unet_lora import add_unet_lora, unet_lora_parameters

    unet = build_tiny_components(pretrain=False).unet
    add_unet_lora(unet, rank=4, alpha=4.0, init_seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
        for p in unet_lora_parameters(unet):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    half = copy.deepcopy(unet)
    for p in half.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert autocast_for(half, bf16) is not bf16  # native
    assert autocast_for(unet, bf16) is not bf16  # an fp32 UNet with its LoRA too (nothing to cast)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)

    def lora_grads(model: torch.nn.Module, dtype: torch.dtype, autocast) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(x.to(dtype), 500, encoder_hidden_states=hidden.to(dtype)).sample
        assert out.dtype == dtype
        out.float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in unet_lora_parameters(model)])

    exact = lora_grads(unet, torch.float32, contextlib.nullcontext)
    native = lora_grads(half, torch.bfloat16, contextlib.nullcontext)
    autocast = lora_grads(half, torch.bfloat16, bf16)
    assert all(p.grad.dtype == torch.float32 for p in unet_lora_parameters(half))
    assert torch.isfinite(native).all()
    err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert err(native, exact) < 1.5 * err(autocast, exact) + 1e-3, (err(native, exact), err(autocast, exact))
    assert err(native, autocast) < 0.03, err(native, autocast)
    # a fully trainable module (not LoRA factors) keeps the autocast
    full = torch.nn.Linear(2, 2).bfloat16()
    assert autocast_for(full, bf16) is bf16
