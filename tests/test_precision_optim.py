"""Precision resolution, the attention fallback, and the optimizers/schedules the presets can name."""

from __future__ import annotations

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
