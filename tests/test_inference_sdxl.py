"""Inference with an SDXL LoRA: the kohya file's lora_te1/lora_te2 modules rebuild both tuned encoders exactly,
interpolation mixes pooled embeddings too (w=0 is the base model), and `sample` renders a grid from the file."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from tc_lite.adapters import build_adapters
from tc_lite.config import Config, LoraConfig
from tc_lite.families import FAMILIES
from tc_lite.inference import encode_prompts, sample_images, tuned_encoders
from tc_lite.lora import ADAPTER_NAME, lora_layers

SDXL = FAMILIES["sdxl"]
PROMPTS = ["a red square", "a blue bar"]


@pytest.fixture(scope="module")
def base():
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    c = build_tiny_sdxl_components(pretrain=False)
    for m in (c.text_encoder, c.text_encoder_2, c.unet, c.vae):
        m.requires_grad_(False).eval()
    return c


@pytest.fixture(scope="module")
def trained(base):
    """A copy of the components with a LoRA on both encoders (random nonzero up weights) and its kohya file."""
    c = copy.copy(base)
    c.text_encoder, c.text_encoder_2 = copy.deepcopy(base.text_encoder), copy.deepcopy(base.text_encoder_2)
    adapters = build_adapters(Config(lora=LoraConfig(rank=2, alpha=1.0)), SDXL, c)
    g = torch.Generator().manual_seed(0)
    for a in adapters:
        for _, layer in lora_layers(a.module()):
            w = layer.lora_B[ADAPTER_NAME].weight
            w.data = torch.randn(w.shape, generator=g) * 0.2
    tensors = {k: v for a in adapters for k, v in a.kohya_tensors().items()}
    return c, adapters, tensors


def test_kohya_file_rebuilds_both_tuned_encoders(base, trained, tmp_path):
    c, adapters, tensors = trained
    path = tmp_path / "xl.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    rebuilt = tuned_encoders(base, str(path))
    assert set(rebuilt) == {"te1", "te2"}
    with torch.no_grad(), adapters.eval_mode():
        expected = SDXL.encode(c, PROMPTS)
        got = SDXL.encode(base, PROMPTS, encoders=rebuilt)
    torch.testing.assert_close(got.hidden, expected.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.added["text_embeds"], expected.added["text_embeds"], rtol=1e-5, atol=1e-5)
    only_te2 = tuned_encoders(base, {k: v for k, v in tensors.items() if k.startswith("lora_te2")})
    assert set(only_te2) == {"te2"}


def test_interpolation_mixes_hidden_and_pooled(base, trained):
    _, _, tensors = trained
    emb = encode_prompts(base, PROMPTS, [tensors], size=(16, 16))
    assert emb.mix([0.0]) is emb.orig
    half, full = emb.mix([0.5]), emb.mix([1.0])
    for key in ("text_embeds",):
        o, h, f = emb.orig.added[key], half.added[key], full.added[key]
        assert not torch.allclose(o, f)
        torch.testing.assert_close(h, (o + f) / 2)
    n = len(PROMPTS)
    assert torch.count_nonzero(emb.orig.hidden[n:]) == 0  # the empty negative prompt: zeros (force_zeros)
    assert emb.orig.added["time_ids"].tolist()[0] == [16, 16, 0, 0, 16, 16]


def test_sample_images_with_a_tuned_sdxl(base, trained):
    _, _, tensors = trained
    emb = encode_prompts(base, PROMPTS[:1], [tensors], size=(16, 16))
    kw = dict(steps=3, guidance=3.0, scheduler="euler", height=16, width=16)
    zero, one = (sample_images(base, emb, [0], [w], **kw) for w in (0.0, 1.0))
    assert zero.shape == (1, 3, 16, 16) and not torch.allclose(zero, one)
    last = sample_images(base, emb, [0], [1.0], tuned_steps=0, **kw)
    torch.testing.assert_close(last, zero)  # tuned on none of the steps: the base model


def test_sample_command_on_tiny_sdxl(trained, tmp_path, monkeypatch):
    from tc_lite.cli import main
    from tc_lite.models import tiny_sdxl

    _, _, tensors = trained
    lora = tmp_path / "xl.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(lora))
    real = tiny_sdxl.build_tiny_sdxl_components
    monkeypatch.setattr(tiny_sdxl, "build_tiny_sdxl_components", lambda *a, **k: real(pretrain=False))
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", "tiny-sdxl", "--lora", str(lora), "--prompt", "a red square", "--weight", "0",
                 "1", "--steps", "2", "--scheduler", "euler", "--device", "cpu", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
