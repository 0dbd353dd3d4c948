"""Adapters as objects: what they train, their "original weights" context, checkpoints, kohya tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from tc_lite.adapters import AdapterSet, FullTextEncoder, TextEncoderLoRA, build_adapters
from tc_lite.config import load_config
from tc_lite.errors import UserError
from tc_lite.families import FAMILIES

SD1 = FAMILIES["sd1"]
PROMPTS = ["a red square", "a blue circle"]


def lora_cfg(*overrides: str):
    return load_config(None, ["lora.rank=4", "lora.alpha=4", *overrides])


@pytest.fixture()
def fresh(tiny_components):
    def make():
        c = copy.deepcopy(tiny_components)
        c.text_encoder.requires_grad_(False)
        return c
    return make


@pytest.fixture()
def comps(fresh):
    return fresh()


def encode(comps) -> torch.Tensor:
    with torch.no_grad():
        return SD1.encode(comps, PROMPTS).hidden


def test_build_adapters_reads_lora_mode_once_per_family_slot(comps, fresh):
    lora = build_adapters(lora_cfg(), SD1, comps)
    assert [(a.key, a.kind) for a in lora] == [("te", "lora")] and isinstance(lora.adapters[0], TextEncoderLoRA)
    full = build_adapters(lora_cfg("lora.mode=full"), SD1, fresh())
    assert [(a.key, a.kind) for a in full] == [("te", "full")] and isinstance(full.adapters[0], FullTextEncoder)


def test_lora_trains_only_its_weights_and_original_is_the_base_model(comps):
    before = encode(comps)
    adapters = build_adapters(lora_cfg(), SD1, comps)
    params = adapters.parameters()
    names = {n for n, p in comps.text_encoder.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names) and len(params) == len(names)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    assert (encode(comps) - before).abs().max() > 1e-3
    with adapters.original():
        assert torch.equal(encode(comps), before)
    kohya = adapters.adapters[0].kohya_tensors()
    assert kohya and all(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya)


def test_full_training_original_swaps_in_the_frozen_copy(comps):
    before = encode(comps)
    adapters = build_adapters(lora_cfg("lora.mode=full"), SD1, comps)
    trained = comps.text_encoder
    assert len(adapters.parameters()) == len(list(trained.parameters()))
    with torch.no_grad():
        for p in adapters.parameters():
            p.mul_(1.1)
    assert (encode(comps) - before).abs().max() > 1e-3
    with adapters.original():
        assert comps.text_encoder is not trained
        assert torch.equal(encode(comps), before)
    assert comps.text_encoder is trained  # restored after the context
    assert list(adapters.adapters[0].held_modules()) == ["original te copy"]


def test_checkpoint_state_round_trips_and_refuses_other_adapters(comps, fresh):
    a = build_adapters(lora_cfg(), SD1, comps)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    state = a.state_dict()
    b = build_adapters(lora_cfg(), SD1, fresh())
    b.load_state_dict(state, "ckpt")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(UserError, match="different trainable weights"):
        build_adapters(lora_cfg("lora.rank=2", "lora.alpha=2", "lora.targets=[q_proj]"), SD1,
                       fresh()).load_state_dict(state, "ckpt")
    with pytest.raises(UserError, match="saved for adapters"):
        AdapterSet([]).load_state_dict(state, "ckpt")
