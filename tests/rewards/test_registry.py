"""Names in the config resolve to rewards; every mistake a user can make is a UserError that names it."""

from __future__ import annotations

import textwrap

import pytest
import torch

from tc_lite.errors import UserError
from tc_lite.rewards import Reward, build_reward, known_rewards

CUSTOM = textwrap.dedent(
    '''
    import torch
    from tc_lite.rewards import Reward

    class Brightness(Reward):
        """Mean brightness times a gain; has a tiny model so offload has something to move."""

        def __init__(self, gain=1.0):
            self.gain = gain
            self.net = torch.nn.Linear(3, 1, bias=False)
            torch.nn.init.constant_(self.net.weight, 1.0 / 3)

        def module(self):
            return self.net

        def __call__(self, images, prompts):
            return self.gain * self.net(images.mean(dim=(2, 3))).squeeze(-1)

    def redness(images, prompts):
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))

    def make_redness():
        return redness

    class NeedsKey:
        def __init__(self, key):
            raise RuntimeError("server refused the key")

    NOT_CALLABLE = 3
    '''
)


@pytest.fixture
def custom_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "tc_custom_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tc_custom_rewards"


def test_known_rewards():
    assert known_rewards() == ["aesthetic", "clip", "color", "hpsv2", "pickscore"]


def test_unknown_name_lists_the_known():
    with pytest.raises(
        UserError, match=r"unknown reward 'pickscor'.*aesthetic, clip, color, hpsv2, pickscore.*package\.module:Class"
    ):
        build_reward("pickscor")


def test_custom_class_with_args(custom_module):
    reward = build_reward(f"{custom_module}:Brightness", args={"gain": 2.0})
    assert isinstance(reward, Reward)
    assert reward.name == f"{custom_module}:Brightness"  # subclass without its own name gets the path
    images = torch.full((2, 3, 4, 4), 0.25, requires_grad=True)
    torch.testing.assert_close(reward(images, ["a", "b"]), torch.full((2,), 0.5))


@pytest.mark.parametrize("attr", ["make_redness", "redness"])
def test_custom_function_or_factory(custom_module, attr):
    reward = build_reward(f"{custom_module}:{attr}")
    assert isinstance(reward, Reward) and reward.module() is None
    images = torch.zeros(1, 3, 2, 2)
    images[:, 0] = 1
    assert reward(images, ["x"]).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "args", "pattern"),
    [
        (
            "no_such_pkg_xyz.mod:Cls",
            None,
            r"custom reward 'no_such_pkg_xyz\.mod:Cls': cannot import module.*ModuleNotFoundError",
        ),
        ("{mod}:Missing", None, r"custom reward '{mod}:Missing': module '{mod}' has no attribute 'Missing'"),
        (
            "{mod}:NeedsKey",
            {"key": "k"},
            r"custom reward '{mod}:NeedsKey': construction .*RuntimeError: server refused",
        ),
        ("{mod}:NeedsKey", None, r"reward '{mod}:NeedsKey': missing required arg\(s\) \['key'\]"),
        (
            "{mod}:Brightness",
            {"gian": 2},
            r"reward '{mod}:Brightness': unknown arg\(s\) \['gian'\]; accepted: \['gain'\]",
        ),
        ("{mod}:NOT_CALLABLE", None, r"custom reward '{mod}:NOT_CALLABLE' is not a class or factory"),
        ("color", {"colour": [1, 0, 0]}, r"reward 'color': unknown arg\(s\) \['colour'\]; accepted: \['target'\]"),
        ("color", [1, 0, 0], r"reward 'color': args must be a mapping"),
    ],
)
def test_mistakes_are_user_errors_naming_the_reward(custom_module, name, args, pattern):
    with pytest.raises(UserError, match=pattern.format(mod=custom_module)):
        build_reward(name.format(mod=custom_module), args=args)


# --------------------------------------------------------------------------------------------------- target (hinge)


def test_target_caps_the_score_and_its_gradient():
    plain, capped = build_reward("color"), build_reward("color", target=0.5)
    assert capped.name == "color" and repr(capped) == "HingedReward(ColorReward(name='color'), target=0.5)"
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1  # score 1.0: above the target
    pale = torch.full((1, 3, 4, 4), 0.5)
    pale[:, 0] = 0.7  # score 0.13: below it
    images = torch.cat([red, pale]).requires_grad_(True)
    scores = capped(images, ["a", "b"])
    torch.testing.assert_close(scores.detach(), torch.tensor([0.5, float(plain(pale, ["b"]))]))
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad[0].abs().sum() == 0  # above the target: nothing more to gain
    (expected,) = torch.autograd.grad(plain(images, ["a", "b"])[1], images)
    torch.testing.assert_close(grad[1], expected[1])  # below it: the reward itself


def test_target_inside_a_mix_and_with_custom_rewards(custom_module):
    from tc_lite.rewards import RewardMix

    capped = build_reward(f"{custom_module}:Brightness", args={"gain": 2.0}, target=0.4)
    assert capped.module() is capped.inner.net  # offload still finds the wrapped model
    images = torch.full((2, 3, 4, 4), 0.25, requires_grad=True)  # brightness 2 * 0.25 = 0.5 > 0.4
    total, parts = RewardMix([("bright", capped, 2.0)], "cpu")(images, ["a", "b"])
    torch.testing.assert_close(parts["bright"], torch.full((2,), 0.4))
    torch.testing.assert_close(total.detach(), torch.full((2,), 0.8))
    total.sum().backward()
    assert images.grad.abs().sum() == 0


@pytest.mark.parametrize("target", [float("nan"), float("inf"), "6.5", True])
def test_target_must_be_a_finite_number(target):
    with pytest.raises(UserError, match=r"reward 'color': target must be a finite number .* got"):
        build_reward("color", target=target)


# --------------------------------------------------------------------------------------------------- packages


def test_imagereward_says_why_it_is_not_built_in():
    with pytest.raises(UserError, match=r"reward 'imagereward': ImageReward is not built in: .*timm 0\.6\.13.*custom"):
        build_reward("imagereward")


def test_missing_dependency_of_a_custom_reward_names_the_install_command(tmp_path, monkeypatch):
    (tmp_path / "tc_needs_dep.py").write_text("import open_clip_tc_lite_missing_dep\n")
    (tmp_path / "tc_needs_open_clip.py").write_text("import open_clip\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "open_clip", None)  # as if open_clip_torch were not installed
    with pytest.raises(
        UserError,
        match=r"custom reward 'tc_needs_dep:score': its module 'tc_needs_dep' needs the package "
        r"'open_clip_tc_lite_missing_dep'.*pip install open-clip-tc-lite-missing-dep",
    ):
        build_reward("tc_needs_dep:score")
    with pytest.raises(UserError, match=r"needs the package 'open_clip'.*pip install open_clip_torch"):
        build_reward("tc_needs_open_clip:Anything")


def test_sequential_offload_without_accelerate(monkeypatch):
    from tc_lite.rewards import RewardMix

    monkeypatch.setitem(__import__("sys").modules, "accelerate", None)
    with pytest.raises(UserError, match=r"offload: sequential needs the package 'accelerate'.*pip install accelerate"):
        RewardMix([("color", build_reward("color"), 1.0)], "cpu", offload="sequential")


def test_builtin_reward_without_its_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(UserError, match=r"'pickscore' needs the package 'transformers'.*pip install transformers"):
        build_reward("pickscore")
