"""The memory estimator with a UNet LoRA (issue 13): its fp32 factors, gradients and AdamW state to the byte, the
activations its backward keeps and the drift penalty's extra call (traced, extrapolated exactly), and
`memory.plan: auto` on presets/aesthetic-te-unet.yaml. The estimate against a real tiny-model step with a UNet LoRA
is in tests/test_memory.py (`test_estimate_matches_a_real_training_step_of_the_tiny_model`)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from tc_lite.config import load_config
from tc_lite.config.checks import check_combinations
from tc_lite.memory import estimate_memory, plan_memory
from tc_lite.memory.plan import budget_bytes, ladder
from tests.test_memory import ROOT, _bytes, estimate_once, tiny_cfg

PRESET = ROOT / "presets" / "aesthetic-te-unet.yaml"


def test_a_unet_lora_is_counted_to_the_byte(tmp_path):
    """A CUDA fp16 target: the UNet's frozen weights apart from its fp32 LoRA, each LoRA in its own row, and the
    gradients and AdamW state of both LoRAs, equal to the real ones."""
    from tc_lite.lora import add_lora
    from tc_lite.models import freeze_and_cast
    from tc_lite.models.tiny import build_tiny_components
    from tc_lite.unet_lora import add_unet_lora, unet_lora_parameters

    est = estimate_memory(tiny_cfg(tmp_path, "memory.device=auto", "memory.precision=fp16", "unet.mode=lora"))
    comps = build_tiny_components(pretrain=False)
    freeze_and_cast(comps, torch.float16)
    te = [p for p in add_lora(comps.text_encoder, rank=4, alpha=4.0).parameters() if p.requires_grad]
    unet = unet_lora_parameters(add_unet_lora(comps.unet, rank=4, alpha=4.0))
    module_bytes = _bytes([*comps.unet.parameters(), *comps.unet.buffers()])
    assert est.resident["unet"] == module_bytes - _bytes(unet)
    assert est.resident["lora unet (fp32)"] == _bytes(unet) and {p.dtype for p in unet} == {torch.float32}
    assert est.resident["lora te (fp32)"] == _bytes(te) and "lora (fp32)" not in est.resident
    assert est.gradients == _bytes(te) + _bytes(unet)
    opt = torch.optim.AdamW([*te, *unet], lr=1e-3)
    for p in [*te, *unet]:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert est.optimizer_state == _bytes([t for s in opt.state.values() for n, t in s.items() if n != "step"])
    assert est.setting["lora"] == "LoRA r=4 + UNet LoRA r=4"
    unet_only = estimate_memory(tiny_cfg(tmp_path, "unet.mode=lora", "unet.drift_weight=0.5", "lora.encoders=[]"))
    assert unet_only.setting["lora"] == "UNet LoRA r=4, drift 0.5"


def test_the_estimate_runs_a_unet_lora_natively(tmp_path, monkeypatch):
    """The estimate's UNet takes the run's precision rule (`autocast_for`): a half UNet with a LoRA, natively."""
    import tc_lite.sampling as sampling

    real, seen = sampling.autocast_for, []
    monkeypatch.setattr(sampling, "autocast_for", lambda m, autocast: seen.append(real(m, autocast)) or seen[-1])
    estimate_memory(tiny_cfg(tmp_path, "memory.device=auto", "memory.precision=fp16", "unet.mode=lora"))
    assert seen == [contextlib.nullcontext]


def test_unet_lora_phases_and_drift_call_extrapolate_exactly(tmp_path):
    """Without UNet checkpointing (each grad step keeps its graph, the LoRA inputs included) and with the drift
    penalty's no-grad call after every grad step: three traced steps plus extrapolation equal tracing all K. The
    drift call counts in 'grad steps', not in 'sampling'; the UNet's calls are not the encoder's ('encode')."""
    base = ["sampling.steps=8", "sampling.grad_steps=5"]
    cfg = tiny_cfg(tmp_path, *base, "unet.mode=lora", "unet.drift_weight=0.1")
    fast, exact = estimate_memory(cfg), estimate_memory(cfg, exact=True)
    assert fast.peak == exact.peak
    assert {p.name: p.peak for p in fast.phases} == {p.name: p.peak for p in exact.phases}
    plain = estimate_memory(tiny_cfg(tmp_path, *base, "unet.mode=lora"))
    te_only = estimate_memory(tiny_cfg(tmp_path, *base))
    assert fast.phase("sampling").peak == plain.phase("sampling").peak
    assert fast.phase("grad steps").peak > plain.phase("grad steps").peak  # the drift call's activations
    assert plain.phase("encode").kinds["activations"] == te_only.phase("encode").kinds["activations"]
    assert plain.phase("grad steps backward").peak > te_only.phase("grad steps backward").peak  # the LoRA inputs
    assert any("drift_weight" in n for n in fast.notes)


@pytest.mark.parametrize("vram,blocks", [(6, True), (8, False)])
def test_plan_auto_fits_the_te_unet_preset_at_6_and_8_gb(vram, blocks):
    """`memory.plan: auto` on aesthetic-te-unet: at 8 GB the preset's own switches fit; at 6 GB (budget 4.77 GiB,
    the preset needs 4.80) UNet block checkpointing. Every rung keeps the UNet LoRA and no prefix cache, and the
    chosen config passes the config checks."""
    cfg = load_config(PRESET, ["memory.plan=auto", f"memory.vram_gb={vram}"])
    for rung in ladder(cfg):
        problems: list[str] = []
        check_combinations(rung.apply(cfg), problems)
        assert not problems and rung.apply(cfg).sampling.prefix_cache == "none"
    plan = plan_memory(cfg, estimator=estimate_once, use_cache=False)
    c = plan.config
    assert plan.fits and plan.peak <= plan.budget == budget_bytes(vram)
    assert estimate_once(c).peak == plan.peak
    assert c.unet == cfg.unet and c.sampling == cfg.sampling and c.lora == cfg.lora
    assert c.memory.checkpoint_unet and c.memory.checkpoint_vae and c.memory.checkpoint_unet_blocks is blocks
    problems = []
    check_combinations(c, problems)
    assert not problems
    if not blocks:  # the preset's own switches
        preset = load_config(PRESET)
        assert dataclasses.replace(c.memory, plan="manual", vram_gb=None) == preset.memory
