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


# --------------------------------------------------------------------------------------------------- sequential


def _hooked_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "_hf_hook")]


def _materialised(modules: list[nn.Module]) -> int:
    return len(_materialised_set(modules))


def _materialised_set(modules: list[nn.Module]) -> set[int]:
    return {id(m) for m in modules if any(p.device.type != "meta" for p in m._parameters.values() if p is not None)}


def _ancestors(root: nn.Module) -> dict[int, set[int]]:
    """id(module) -> ids of the modules that contain it (a parent's forward is still running while it runs)."""
    out: dict[int, set[int]] = {id(root): set()}
    for parent in root.modules():
        for child in parent.children():
            out[id(child)] = out[id(parent)] | {id(parent)}
    return out


def _upstream():
    theta = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    return theta, torch.sigmoid(theta)


def test_sequential_streams_one_layer_at_a_time_and_matches(tiny_clip_dir):
    """Same scores and image gradients as `none`; while it runs no layer other than the one computing holds its
    weights; every layer of the image tower runs twice under a backward (checkpointing: the weights are fetched
    again rather than kept alive by autograd); close() gives back the very same weights."""
    from tc_lite.rewards import build_reward

    reward = build_reward("clip", args={"model": str(tiny_clip_dir)})
    before = {k: v.clone() for k, v in reward.model.state_dict().items()}
    prompts = ["a red car", "a dog"]
    theta, images = _upstream()
    total, _ = RewardMix([("clip", reward, 1.0)], "cpu", offload="none")(images, prompts)
    total.sum().backward()
    expected_total, expected_grad = total.detach(), theta.grad

    mix = RewardMix([("clip", reward, 1.0)], "cpu", offload="sequential")
    hooked = _hooked_modules(reward.model)
    assert len(hooked) > 20 and _materialised(hooked) == 0  # every layer offloaded between calls
    seen, calls, ancestors = [], {"vision_fc1": 0}, _ancestors(reward.model)
    for m in hooked:  # when a module starts, only modules whose forward encloses it may hold weights
        m.register_forward_pre_hook(lambda mod, args: seen.append(len(_materialised_set(hooked) - ancestors[id(mod)])))
    fc1 = reward.model.vision_model.encoder.layers[0].mlp.fc1
    fc1.register_forward_pre_hook(lambda mod, args: calls.__setitem__("vision_fc1", calls["vision_fc1"] + 1))

    theta, images = _upstream()
    total, _ = mix(images, prompts)
    total.sum().backward()
    torch.testing.assert_close(total.detach(), expected_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theta.grad, expected_grad, rtol=1e-4, atol=1e-7)
    assert seen and max(seen) == 0 and _materialised(hooked) == 0
    assert calls["vision_fc1"] == 2  # forward + recomputation in backward

    mix.close()
    assert not _hooked_modules(reward.model)
    after = reward.model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())


def test_sequential_offloads_even_when_scoring_raises(tiny_clip_dir):
    from tc_lite.rewards import build_reward

    reward = build_reward("clip", args={"model": str(tiny_clip_dir)})
    mix = RewardMix([("clip", reward, 1.0)], "cpu", offload="sequential")
    hooked = _hooked_modules(reward.model)
    fc2 = reward.model.vision_model.encoder.layers[1].mlp.fc2

    def boom(module, args, output):  # after fc2's weights arrived, before accelerate sends them away
        raise RuntimeError("boom")

    handle = fc2.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        mix(torch.rand(1, 3, 32, 32, requires_grad=True), ["x"])
    assert _materialised(hooked) == 0
    handle.remove()
    total, _ = mix(torch.rand(1, 3, 32, 32), ["x"])  # and it still works afterwards
    assert torch.isfinite(total).all()
    mix.close()


def test_sequential_with_a_shared_vision_tower(tiny_clip_dir, tiny_head_path):
    """aesthetic + clip from one CLIP share the vision tower; it is hooked once and both scores stay exact."""
    from tc_lite.rewards import build_reward

    clip = build_reward("clip", args={"model": str(tiny_clip_dir)})
    aes = build_reward("aesthetic", args={"clip_model": str(tiny_clip_dir), "head": str(tiny_head_path)})
    assert aes.net.vision_model is clip.model.vision_model
    entries = [("clip", clip, 0.5), ("aesthetic", aes, 1.0)]
    theta, images = _upstream()
    total, _ = RewardMix(entries, "cpu", offload="none")(images, ["a", "b"])
    total.sum().backward()
    expected_total, expected_grad = total.detach(), theta.grad

    mix = RewardMix(entries, "cpu", offload="sequential")
    theta, images = _upstream()
    total, _ = mix(images, ["a", "b"])
    total.sum().backward()
    torch.testing.assert_close(total.detach(), expected_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theta.grad, expected_grad, rtol=1e-4, atol=1e-7)
    layers = list(aes.net.vision_model.encoder.layers)
    assert all(getattr(m.__dict__.get("forward"), "_tc_lite_checkpointed", False) for m in layers)
    assert not any(getattr(m.forward.__wrapped__, "_tc_lite_checkpointed", False) for m in layers)  # wrapped once
    mix.close()
    assert not any(hasattr(m, "_hf_hook") for m in [*clip.model.modules(), *aes.net.modules()])
