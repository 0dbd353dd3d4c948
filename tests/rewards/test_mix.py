"""RewardMix: the documented weighted sum, exact gradients whatever the offload mode, strict output checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tc_lite.errors import UserError
from tc_lite.rewards import Reward, RewardMix, build_reward


class Linear(Reward):
    """A tiny model reward: mean over pixels of a random colour projection, then a non-linearity."""

    name = "linear"

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).requires_grad_(False)

    def module(self) -> nn.Module:
        return self.net

    def __call__(self, images, prompts):
        pixels = images.permute(0, 2, 3, 1).to(self.net[0].weight.dtype)
        return self.net(pixels).mean(dim=(1, 2)).squeeze(-1).float()


class Bad(Reward):
    def __init__(self, out):
        self.out = out

    def __call__(self, images, prompts):
        return self.out(images)


def _upstream(batch: int = 2):
    """Images produced by a parameter, as the VAE decode would; non-square to exercise preprocessing."""
    theta = torch.randn(batch, 3, 40, 56, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    return theta, torch.sigmoid(theta)


@pytest.fixture(scope="module")
def clip_reward(tiny_clip_dir):
    return build_reward("clip", args={"model": str(tiny_clip_dir)})


def _entries(clip_reward):
    return [("color", build_reward("color"), 1.0), ("linear", Linear(), -0.5), ("clip", clip_reward, 0.25)]


def test_total_is_the_weighted_sum_of_detached_parts(clip_reward):
    _, images = _upstream()
    mix = RewardMix(_entries(clip_reward), device="cpu")
    total, parts = mix(images, ["a red car", "a dog"])
    assert set(parts) == {"color", "linear", "clip"} and mix.names == ["color", "linear", "clip"]
    assert all(p.shape == (2,) and not p.requires_grad and p.dtype == torch.float32 for p in parts.values())
    expected = 1.0 * parts["color"] - 0.5 * parts["linear"] + 0.25 * parts["clip"]
    torch.testing.assert_close(total.detach(), expected)
    assert total.requires_grad


@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_gradients_equal_plain_autograd(clip_reward, offload):
    prompts = ["a red car", "a dog"]
    upstream = torch.tensor([1.0, -3.0])  # per-image loss weights: checks the per-image vector-Jacobian product
    theta, images = _upstream()
    plain = sum(w * r(images, prompts) for _, r, w in _entries(clip_reward))
    (expected,) = torch.autograd.grad((plain * upstream).sum(), theta)

    theta, images = _upstream()
    total, _ = RewardMix(_entries(clip_reward), device="cpu", offload=offload)(images, prompts)
    torch.testing.assert_close(total.detach(), plain.detach(), rtol=1e-5, atol=1e-5)
    (total * upstream).sum().backward()
    torch.testing.assert_close(theta.grad, expected, rtol=1e-5, atol=1e-7)
    assert theta.grad.abs().sum() > 0


def test_zero_weight_is_logged_but_adds_no_gradient():
    theta, images = _upstream()
    total, parts = RewardMix([("color", build_reward("color"), 1.0), ("linear", Linear(), 0.0)], "cpu")(
        images, ["a", "b"]
    )
    total.sum().backward()
    theta2, images2 = _upstream()
    build_reward("color")(images2, ["a", "b"]).sum().backward()
    torch.testing.assert_close(theta.grad, theta2.grad)
    assert "linear" in parts


def test_no_graph_when_images_need_no_grad():
    total, _ = RewardMix([("linear", Linear(), 1.0)], "cpu")(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert not total.requires_grad
    with torch.no_grad():
        _, images = _upstream()
        total, _ = RewardMix([("linear", Linear(), 1.0)], "cpu")(images, ["a", "b"])
    assert not total.requires_grad


def test_half_precision_images_and_models():
    theta, images = _upstream()
    (expected,) = torch.autograd.grad(Linear()(images, ["a", "b"]).sum(), theta)
    theta, images = _upstream()
    mix = RewardMix([("linear", Linear(), 1.0)], "cpu", dtype=torch.float16)
    assert mix.entries[0][1].net[0].weight.dtype == torch.float16
    total, _ = mix(images.half(), ["a", "b"])
    total.sum().backward()
    torch.testing.assert_close(theta.grad, expected, rtol=2e-2, atol=2e-4)


def test_fp16_autocast_and_inner_loss_scale_overflow():
    theta, images = _upstream()
    (expected,) = torch.autograd.grad(Linear()(images, ["a", "b"]).sum(), theta)
    theta, images = _upstream()
    with torch.autocast("cpu", dtype=torch.float16):
        total, _ = RewardMix([("linear", Linear(), 1.0)], "cpu")(images, ["a", "b"])
    total.sum().backward()
    torch.testing.assert_close(theta.grad, expected, rtol=2e-2, atol=2e-4)

    def steep(x, prompts):  # d score / d pixel = 100: overflows float16 once scaled by 1024
        return (x[:, :, 0, 0].half() * 100).float().sum(-1)

    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    total, _ = RewardMix([("steep", steep, 1.0)], "cpu", dtype=torch.float16)(images, ["a", "b"])
    total.sum().backward()
    assert images.grad[:, :, 0, 0].eq(100).all() and images.grad[:, :, 1:, :].eq(0).all()


def test_module_rewards_are_found_and_only_reward_subclasses_are_cast():
    class Plain(nn.Module):  # a custom nn.Module honouring the call contract, nothing more
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, images, prompts):
            return self.lin(images.mean(dim=(2, 3))).squeeze(-1)

    class Both(Reward, nn.Module):
        def __init__(self):
            nn.Module.__init__(self)
            self.lin = nn.Linear(3, 1)

        def __call__(self, images, prompts):
            return self.lin(images.mean(dim=(2, 3)).to(self.lin.weight.dtype)).squeeze(-1).float()

    plain, both = Plain(), Both()
    mix = RewardMix([("plain", plain, 1.0), ("both", both, 1.0)], "cpu", dtype=torch.float16)
    assert [r.module() for _, r, _ in mix.entries] == [plain, both]
    assert plain.lin.weight.dtype == torch.float32 and both.lin.weight.dtype == torch.float16
    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    total, _ = mix(images, ["a", "b"])
    total.sum().backward()
    assert torch.isfinite(images.grad).all()


@pytest.mark.parametrize("weight", [math.nan, math.inf, "1", True, None])
def test_weights_must_be_finite_numbers(weight):
    with pytest.raises(UserError, match=r"reward 'linear': weight must be a finite number"):
        RewardMix([("linear", Linear(), weight)], "cpu")


def test_mix_configuration_errors():
    with pytest.raises(UserError, match=r"offload must be one of \['cpu', 'none', 'sequential'\]"):
        RewardMix([("linear", Linear(), 1.0)], "cpu", offload="gpu")
    with pytest.raises(UserError, match=r"repeated: \['linear'\]"):
        RewardMix([("linear", Linear(), 1.0), ("linear", Linear(), 2.0)], "cpu")
    with pytest.raises(UserError, match="no rewards"):
        RewardMix([], "cpu")


@pytest.mark.parametrize(
    ("out", "pattern"),
    [
        (lambda x: x.mean(dim=(1, 2, 3)).unsqueeze(-1), r"reward 'mine' returned shape \[2, 1\] for 2 images"),
        (lambda x: x.mean(dim=(1, 2, 3)) / 0.0, r"reward 'mine' returned non-finite scores"),
        (lambda x: x.mean(dim=(1, 2, 3)).detach(), r"reward 'mine' is not differentiable"),
        (lambda x: torch.ones(2), r"reward 'mine' is not differentiable"),
        (lambda x: x.mean().item(), r"reward 'mine' returned float; it must return a Tensor"),
        (lambda x: torch.ones(2, dtype=torch.long), r"reward 'mine' returned dtype torch.int64"),
    ],
)
def test_bad_custom_outputs_name_the_reward(out, pattern):
    _, images = _upstream()
    with pytest.raises(UserError, match=pattern):
        RewardMix([("mine", Bad(out), 1.0)], "cpu")(images, ["a", "b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_matches_cpu_and_leaves_the_gpu(tiny_clip_dir, tiny_head_path):
    prompts = ["a red car", "a dog"]

    def entries():
        return [
            (
                "aesthetic",
                build_reward("aesthetic", args={"clip_model": str(tiny_clip_dir), "head": str(tiny_head_path)}),
                1.0,
            ),
            ("clip", build_reward("clip", args={"model": str(tiny_clip_dir)}), 0.5),
        ]

    theta, images = _upstream()
    total, _ = RewardMix(entries(), "cpu")(images, prompts)
    total.sum().backward()
    expected = theta.grad

    for offload in ("cpu", "none", "sequential"):
        theta, images = _upstream()
        mix = RewardMix(entries(), "cuda", offload=offload)
        total, _ = mix(images.cuda(), prompts)
        total.sum().backward()
        torch.testing.assert_close(theta.grad, expected, rtol=1e-3, atol=1e-6)
        home = {"cpu": "cpu", "none": "cuda", "sequential": "meta"}[offload]  # sequential: weights in CPU hooks
        for _, reward, _ in mix.entries:  # (the root's own tensors, e.g. logit_scale, stay on the device)
            assert {p.device.type for n, p in reward.module().named_parameters() if "." in n} == {home}
        mix.close()
        for _, reward, _ in mix.entries:
            assert "meta" not in {p.device.type for p in reward.module().parameters()}
