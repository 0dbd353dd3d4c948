"""The memory estimator on SDXL: the tiny SDXL's estimate against its real training step, what a full-size SDXL
estimate counts (both encoders and their LoRAs, pooled and time-id conditioning, the fp32 VAE, block
checkpointing, reward preprocessing from 1024² images), the two SDXL presets' targets (issue 12) and
`memory.plan: auto` on SDXL at 12 and 24 GB.

No network: the presets' hub id is not in the test cache, so the estimator reads the SDXL configs bundled with
tc-lite. Full-size estimates take ~60 s each on two CPU cores; `estimate_once` shares them across tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tc_lite.config import load_config
from tc_lite.memory import estimate_memory, plan_memory
from tc_lite.memory.estimate import GiB
from tc_lite.memory.plan import budget_bytes
from tc_lite.memory.tracker import MemoryTracker
from tests.test_memory import ROOT, TINY, assert_estimate_matches_a_real_step, estimate_once, preset_estimate

SDXL_PRESETS = {"sdxl-aesthetic.yaml": 20.0, "sdxl-12gb.yaml": 10.5}  # issue 12's targets, GiB


def tiny_sdxl_cfg(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"output.dir={tmp_path / 'run'}", "logging.progress=false", "logging.sample_every=0",
                              "model.source=tiny-sdxl", "model.family=sdxl", *overrides])


@pytest.fixture
def untrained_tiny_sdxl(monkeypatch):
    """The Recipe loads the tiny SDXL without its pretraining: memory does not depend on weight values."""
    from tc_lite import train
    from tc_lite.families import FAMILIES
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    monkeypatch.setattr(train, "load_model",
                        lambda model_cfg, dtype: (FAMILIES["sdxl"], build_tiny_sdxl_components(pretrain=False)))


# --------------------------------------------------------------------------------------------------- tiny SDXL


@pytest.mark.parametrize("extra", [
    [],
    ["memory.checkpoint_unet=true", "memory.checkpoint_unet_blocks=true", "memory.checkpoint_vae=true"],
    ["lora.encoders=[te2]", "lora.per_encoder.te2.rank=8", "sampling.uncond=original"],
])
def test_estimate_matches_a_real_training_step_of_the_tiny_sdxl(tmp_path, untrained_tiny_sdxl, extra):
    """As the SD1 test: the estimate (meta-built SDXL through `SDXL.meta_components`, fake tensors) against the
    real Recipe step of the tiny SDXL on real tensors -- both encoders, pooled and time-id conditioning, the
    zeros unconditional embedding -- counted storage by storage: peak and activations within 10%."""
    from tc_lite.train import Recipe

    cfg = tiny_sdxl_cfg(tmp_path, "train.grad_accum=1", *extra)
    assert_estimate_matches_a_real_step(estimate_memory(cfg), Recipe(cfg, log=lambda s: None).setup())


def test_the_estimate_feeds_the_unet_pooled_and_time_id_conditioning(tmp_path, monkeypatch):
    """The traced UNet calls get SDXL's added conditioning for both CFG halves: te2's pooled projection and the six
    size ids of the training resolution."""
    from diffusers import UNet2DConditionModel

    seen: list[tuple] = []
    real = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        seen.append((tuple(encoder_hidden_states.shape),
                     {k: tuple(v.shape) for k, v in (added_cond_kwargs or {}).items()}))
        return real(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    estimate_memory(tiny_sdxl_cfg(tmp_path, "train.batch_size=2", "memory.device=auto"))
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    te2 = build_tiny_sdxl_components(pretrain=False).text_encoder_2.config
    assert seen and all(added == {"text_embeds": (4, te2.projection_dim), "time_ids": (4, 6)} for _, added in seen)
    assert all(hidden[0] == 4 for hidden, _ in seen)


def test_reward_preprocessing_is_traced_from_1024_pixel_images(tmp_path, monkeypatch):
    """The rewards' differentiable resize/crop runs on the decoded 1024² images in the trace (the real function),
    and the reward phase's activations grow with the image."""
    import tc_lite.rewards.preprocess as preprocess

    shapes: list[tuple] = []
    real = preprocess.clip_preprocess
    monkeypatch.setattr(preprocess, "clip_preprocess", lambda images, *a, **k: shapes.append(tuple(images.shape))
                        or real(images, *a, **k))
    aesthetic = ["rewards.terms.redness.weight=0", "rewards.terms.aes.type=aesthetic", "rewards.terms.aes.weight=1",
                 "memory.device=auto", "train.batch_size=1"]

    def reward_activations(side: int) -> int:
        est = estimate_memory(tiny_sdxl_cfg(tmp_path, f"sampling.height={side}", f"sampling.width={side}", *aesthetic))
        return est.phase("reward").kinds["activations"]

    small, large = reward_activations(512), reward_activations(1024)
    assert (1, 3, 1024, 1024) in shapes and (1, 3, 512, 512) in shapes
    assert large > small + 3 * 1024 * 1024 * 4  # at least one more fp32 1024² image


def test_the_vae_dtype_follows_memory_vae_precision(tmp_path):
    """An fp32 VAE on an fp16 target: its weights at fp32 bytes (exact) and a larger decode."""
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    vae = build_tiny_sdxl_components(pretrain=False).vae
    nbytes = sum(t.numel() for t in (*vae.parameters(), *vae.buffers()))
    fp16 = estimate_memory(tiny_sdxl_cfg(tmp_path, "memory.device=auto", "memory.precision=fp16"))
    fp32 = estimate_memory(tiny_sdxl_cfg(tmp_path, "memory.device=auto", "memory.precision=fp16",
                                         "memory.vae_precision=fp32"))
    assert fp16.resident["vae (encoder and decoder)"] == 2 * nbytes  # the tiny VAE does not ask for an upcast
    assert fp32.resident["vae (encoder and decoder), fp32"] == 4 * nbytes
    assert fp32.setting["vae_dtype"] == "fp32" and any("memory.vae_precision=fp32" in n for n in fp32.notes)
    grown = fp32.phase("decode").kinds["activations"] - fp16.phase("decode").kinds["activations"]
    assert grown > 0


def test_a_replacement_vae_config_decides_the_upcast(tmp_path):
    """`model.vae` is read for its config: a local folder's, else the published one of a known fp16-safe VAE."""
    from tc_lite.memory.architectures import resolve_architecture

    folder = tmp_path / "my-vae"
    folder.mkdir()
    bundled = json.loads((ROOT / "tc_lite" / "assets" / "sdxl" / "vae" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**bundled, "force_upcast": False}))
    sdxl = "model.source=stabilityai/stable-diffusion-xl-base-1.0"
    assert resolve_architecture(load_config(ROOT / "presets" / "base.yaml", [sdxl])).vae["force_upcast"] is True
    local = resolve_architecture(load_config(ROOT / "presets" / "base.yaml", [sdxl, f"model.vae={folder}"]))
    assert local.vae["force_upcast"] is False
    known = resolve_architecture(load_config(ROOT / "presets" / "sdxl-12gb.yaml"))
    assert known.vae["force_upcast"] is False and any("sdxl-vae-fp16-fix" in n for n in known.notes)


# --------------------------------------------------------------------------------------------------- full size


@pytest.mark.parametrize("name", sorted(SDXL_PRESETS))
def test_the_sdxl_presets_meet_the_issue_targets(name):
    est = preset_estimate(name)
    assert est.architecture == "bundled SDXL base 1.0 configs"  # offline: the hub id is not cached
    assert est.peak_gib <= SDXL_PRESETS[name], f"{name}: {est.peak_gib:.2f} GiB"


def _sdxl_resident(cfg, vae_bytes_per_value: int) -> dict[str, int]:
    """What a run keeps on the device for SDXL base, from the meta-built family components and the real adapters:
    frozen weights in fp16, LoRAs in fp32, the VAE at `vae_bytes_per_value`."""
    from tc_lite.adapters import build_adapters
    from tc_lite.families import FAMILIES
    from tc_lite.memory.architectures import resolve_architecture

    family = FAMILIES["sdxl"]
    arch_cfg = load_config(ROOT / "presets" / "sdxl-aesthetic.yaml")
    with torch.device("meta"):
        comps = family.meta_components(resolve_architecture(arch_cfg))
        adapters = {a.key: a for a in build_adapters(cfg, family, comps)}
    def nbytes(m: torch.nn.Module, per_float: int = 2) -> int:  # integer buffers (position ids) keep their dtype
        return sum(t.numel() * (per_float if t.is_floating_point() else t.element_size())
                   for t in (*m.parameters(), *m.buffers()))

    out = {"unet": nbytes(comps.unet), "vae": nbytes(comps.vae, vae_bytes_per_value)}
    for key, encoder in family.encoders(comps).items():
        lora = sum(p.numel() for p in adapters[key].parameters()) if key in adapters else 0
        out[f"te {key}"], out[f"lora {key}"] = nbytes(encoder) - 2 * lora, 4 * lora
    return out


def test_sdxl_estimate_counts_both_encoders_their_loras_and_the_fp32_vae():
    """sdxl-aesthetic on an fp16 target: UNet, both text encoders, both LoRAs (rank 8) and SDXL's VAE upcast to
    fp32 (it states force_upcast), to the byte, and the setting line says so."""
    est = preset_estimate("sdxl-aesthetic.yaml")
    want = _sdxl_resident(load_config(ROOT / "presets" / "sdxl-aesthetic.yaml"), 4)
    r = est.resident
    assert r["unet"] == want["unet"] and r["vae (encoder and decoder), fp32"] == want["vae"]
    for key in ("te1", "te2"):
        assert r[f"text encoder {key}"] == want[f"te {key}"] and r[f"lora {key} (fp32)"] == want[f"lora {key}"]
    assert est.setting["lora"] == "LoRA r=8 on te1, te2" and est.setting["vae_dtype"] == "fp32"
    assert est.peak_phase == "decode backward"
    assert est.gradients == want["lora te1"] + want["lora te2"]


def test_per_encoder_lora_settings_reach_the_estimate():
    """lora.encoders=[te2] with per_encoder rank 16: te1 frozen without a LoRA, te2's LoRA at rank 16, as
    `build_adapters` makes them. (Resident bytes only: computed before the step is traced.)"""
    from tc_lite.memory.estimate import _Step
    from tc_lite.memory.fake_models import _MetaModels, _Target
    from tc_lite.families import FAMILIES

    cfg = load_config(ROOT / "presets" / "sdxl-12gb.yaml", ["lora.encoders=[te2]", "lora.per_encoder.te2.rank=16"])
    family = FAMILIES["sdxl"]
    meta = _MetaModels.build(cfg, family, family.architecture(cfg))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), MemoryTracker("cpu", 512) as tracker:
        resident = _Step(cfg, meta, _Target.of(cfg), tracker).resident
    want = _sdxl_resident(cfg, 2)
    assert resident["text encoder te1 (frozen)"] == want["te te1"] and "lora te1 (fp32)" not in resident
    assert resident["lora te2 (fp32)"] == want["lora te2"] == 2 * _sdxl_resident(
        load_config(ROOT / "presets" / "sdxl-12gb.yaml"), 2)["lora te2"]  # rank 16 = twice rank 8
    assert resident["vae (encoder and decoder)"] == want["vae"]  # the fp16-safe VAE stays fp16


def test_block_checkpointing_lowers_the_sdxl_grad_steps_backward():
    """sdxl-12gb with and without memory.checkpoint_unet_blocks: the UNet recompute's peak drops by GiBs, nothing
    else moves (the same estimate the 12 GB plan needs for its next faster rung)."""
    on = preset_estimate("sdxl-12gb.yaml")
    cfg = load_config(ROOT / "presets" / "sdxl-12gb.yaml", ["memory.checkpoint_unet_blocks=false"])
    off = estimate_once(cfg)
    assert off.phase("grad steps backward").peak - on.phase("grad steps backward").peak > 4 * GiB
    assert off.phase("decode backward").peak == on.phase("decode backward").peak
    assert on.peak < off.peak and off.peak_phase == "grad steps backward"


@pytest.mark.parametrize("vram,blocks", [(12, True), (24, False)])
def test_plan_auto_fits_sdxl_at_12_and_24_gb(vram, blocks):
    """`memory.plan: auto` on sdxl-12gb: at 12 GB block checkpointing is what fits; at 24 GB the faster settings
    without it fit. Either way the chosen estimate is within the card's budget and every decision is explained."""
    cfg = load_config(ROOT / "presets" / "sdxl-12gb.yaml", ["memory.plan=auto", f"memory.vram_gb={vram}"])
    plan = plan_memory(cfg, estimator=estimate_once, use_cache=False)
    c = plan.config
    assert plan.fits and plan.peak <= plan.budget == budget_bytes(vram)
    assert estimate_once(c).peak == plan.peak
    assert c.memory.checkpoint_unet_blocks is blocks and c.memory.checkpoint_unet
    assert c.sampling == cfg.sampling and c.train.batch_size * c.train.grad_accum == 4
    assert plan.reasons[0].startswith(f"memory plan for a {vram} GB card")
    assert any(r.startswith("memory.checkpoint_unet_blocks=true") for r in plan.reasons) is blocks
    assert any(r.startswith("estimated peak") for r in plan.reasons)
    if blocks:  # the same switches as the preset: its header's "plan chooses the same" holds
        preset = load_config(ROOT / "presets" / "sdxl-12gb.yaml")
        assert dataclasses.replace(c.memory, plan="manual", vram_gb=None) == preset.memory
        assert c.rewards.offload == preset.rewards.offload
