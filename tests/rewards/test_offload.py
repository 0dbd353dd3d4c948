"""Reward models visit the compute device only while scoring, one at a time, and always go home.

This machine has no GPU, so the 'device' here is ``meta``: moving there is observable, and anything that
forgets to move a model back would leave it unusable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tc_lite.rewards import Reward, RewardMix, on_device


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    model.tie = nn.Linear(3, 4)
    model.tie.weight = model[0].weight  # a tied weight must stay tied on the device
    model.register_buffer("scale", torch.ones(3))
    return model.requires_grad_(False)


def _devices(module: nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def test_moves_and_restores_the_same_tensors():
    model = _model()
    before = {name: (t, t.clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    with on_device(model, "meta"):
        assert _devices(model) == {"meta"}
        assert model.tie.weight is model[0].weight
    assert _devices(model) == {"cpu"}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is before[name][0] and torch.equal(t, before[name][1])


def test_restores_even_when_scoring_raises():
    model = _model()
    weight = model[0].weight
    with pytest.raises(RuntimeError, match="boom"):
        with on_device(model, "meta"):
            raise RuntimeError("boom")
    assert _devices(model) == {"cpu"} and model[0].weight is weight


def test_noop_for_none_and_for_modules_already_there():
    with on_device(None, "meta"):
        pass
    model = _model()
    weight = model[0].weight
    with on_device(model, "cpu"):
        assert model[0].weight is weight


class _Spy(Reward):
    """Records, while it scores, where every reward's model is."""

    def __init__(self, name: str, log: list, everyone: list, fail: bool = False):
        self.name, self.log, self.everyone, self.fail = name, log, everyone, fail
        self.net = nn.Linear(3, 3).requires_grad_(False)

    def module(self) -> nn.Module:
        return self.net

    def __call__(self, images, prompts):
        self.log.append({r.name: next(r.net.parameters()).device.type for r in self.everyone})
        if self.fail:
            raise RuntimeError(f"{self.name} failed")
        return torch.ones(images.shape[0])


def test_mix_moves_one_model_at_a_time():
    log, everyone = [], []
    everyone += [_Spy("a", log, everyone), _Spy("b", log, everyone)]
    mix = RewardMix([("a", everyone[0], 1.0), ("b", everyone[1], 1.0)], device="meta", offload="cpu")
    mix(torch.rand(2, 3, 8, 8), ["x", "y"])  # no grad requested: the spies need not be differentiable
    assert log == [{"a": "meta", "b": "cpu"}, {"a": "cpu", "b": "meta"}]
    assert all(_devices(r.net) == {"cpu"} for r in everyone)


def test_mix_sends_the_model_home_when_a_reward_raises():
    log, everyone = [], []
    everyone += [_Spy("ok", log, everyone), _Spy("bad", log, everyone, fail=True)]
    mix = RewardMix([("ok", everyone[0], 1.0), ("bad", everyone[1], 1.0)], device="meta", offload="cpu")
    with pytest.raises(RuntimeError, match="bad failed"):
        mix(torch.rand(1, 3, 8, 8), ["x"])
    assert all(_devices(r.net) == {"cpu"} for r in everyone)


def test_offload_none_keeps_models_on_the_device():
    log, everyone = [], []
    everyone += [_Spy("a", log, everyone), _Spy("b", log, everyone)]
    RewardMix([("a", everyone[0], 1.0), ("b", everyone[1], 1.0)], device="meta", offload="none")
    assert all(_devices(r.net) == {"meta"} for r in everyone)
