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
    assert known_rewards() == ["aesthetic", "clip", "color"]


def test_unknown_name_lists_the_known():
    with pytest.raises(
        UserError, match=r"unknown reward 'pickscor'.*aesthetic, clip, color.*package\.module:ClassName"
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
