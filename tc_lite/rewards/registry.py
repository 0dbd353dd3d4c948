"""Turn a reward name from the config into a Reward: a built-in name or a ``package.module:Name`` path.

A custom path may name a class or factory (called with the reward's args) or, with no args, a function
``fn(images, prompts)`` that is itself the reward.

Built-ins are listed as import paths too, so nothing heavy (transformers) is imported until a reward that needs
it is actually built. Arguments are checked against the constructor's signature first, so an unknown or
missing key is reported as such rather than as a TypeError from deep inside a model loader.

``target`` wraps the built reward in a ``HingedReward``: ``min(score, target)`` (see ``base.HingedReward``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any

from tc_lite.errors import UserError
from tc_lite.rewards.base import HingedReward, Reward, as_reward

BUILTIN_REWARDS: dict[str, str] = {
    "aesthetic": "tc_lite.rewards.aesthetic:AestheticReward",
    "clip": "tc_lite.rewards.clip_score:ClipScoreReward",
    "color": "tc_lite.rewards.synthetic:ColorReward",
    "hpsv2": "tc_lite.rewards.hpsv2:HPSv2Reward",
    "pickscore": "tc_lite.rewards.pickscore:PickScoreReward",
}

# Names people will try that tc-lite deliberately does not build in, with the reason (docs/rewards.md).
NOT_BUILT_IN: dict[str, str] = {
    "imagereward": (
        "ImageReward is not built in: its only implementation (the image-reward package) pins timm 0.6.13 and "
        "fairscale and needs torchvision and OpenAI's clip from git, so tc-lite cannot load or verify it on "
        "maintained libraries (docs/rewards.md). Wrap it yourself as a custom reward 'package.module:ClassName'"
    ),
}

# import name -> pip requirement, where they differ (for "missing package" messages of custom rewards)
PIP_NAMES: dict[str, str] = {
    "open_clip": "open_clip_torch",
    "ImageReward": "image-reward",
    "hpsv2": "hpsv2",
    "clip": "git+https://github.com/openai/CLIP.git",
    "PIL": "pillow",
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
}


def known_rewards() -> list[str]:
    return sorted(BUILTIN_REWARDS)


def _unknown(name: str) -> UserError:
    hint = NOT_BUILT_IN.get(name.strip().lower())
    if hint:
        return UserError(f"reward '{name}': {hint}. Built-in rewards: {', '.join(known_rewards())}.")
    return UserError(
        f"unknown reward '{name}'. Known rewards: {', '.join(known_rewards())}; or give a custom reward as "
        f"'package.module:ClassName' (importable, constructed with the reward's args)."
    )


def _missing_dependency(name: str, module_name: str, err: BaseException) -> UserError | None:
    """A custom reward module that imports fine itself but needs a package that is not installed."""
    missing = getattr(err, "name", None)
    if not isinstance(err, ModuleNotFoundError) or not missing:
        return None
    if module_name == missing or module_name.startswith(missing + "."):
        return None  # the reward's own module (or its package) is what is missing: a path problem
    top = missing.split(".")[0]
    pip = PIP_NAMES.get(top, top.replace("_", "-"))
    return UserError(
        f"custom reward '{name}': its module '{module_name}' needs the package '{top}', which is not installed. "
        f"Install it with: pip install {pip}"
    )


def _import(path: str, name: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise _unknown(name)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        dependency = _missing_dependency(name, module_name, err)
        if dependency is not None:
            raise dependency from err
        raise UserError(
            f"custom reward '{name}': cannot import module '{module_name}' ({type(err).__name__}: {err}). "
            f"Check the spelling and that its package is on PYTHONPATH."
        ) from err
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"custom reward '{name}': module '{module_name}' has no attribute '{attr}'.")
        target = getattr(target, part)
    return target


def reward_parameters(factory: Any) -> tuple[list[str] | None, list[str]] | None:
    """The keyword args ``factory`` accepts (None: any, it takes ``**kwargs``) and those it requires; None when it
    has no introspectable signature (C callables)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) else [p.name for p in named]
    return accepted, [p.name for p in named if p.default is inspect.Parameter.empty]


def _check_args(name: str, factory: Any, args: dict[str, Any]) -> None:
    found = reward_parameters(factory)
    if found is None:
        return  # no introspectable signature: let the call itself decide
    accepted, required = found
    if accepted is not None:
        unknown = sorted(set(args) - set(accepted))
        if unknown:
            raise UserError(f"reward '{name}': unknown arg(s) {unknown}; accepted: {accepted or 'none'}.")
    missing = [r for r in required if r not in args]
    if missing:
        raise UserError(f"reward '{name}': missing required arg(s) {missing}.")


def _is_reward_function(obj: Any) -> bool:
    """A plain function that needs exactly (images, prompts): the reward itself rather than a factory."""
    if inspect.isclass(obj):
        return False
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind()
        return False  # callable without arguments: a factory
    except TypeError:
        pass
    try:
        sig.bind(None, None)
        return True
    except TypeError:
        return False


def _check_target(name: str, target: object) -> float | None:
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise UserError(
            f"reward '{name}': target must be a finite number (in the reward's own units, e.g. 6.5 for aesthetic) "
            f"or null to maximise, got {target!r}."
        )
    return float(target)


def resolve_reward(name: str) -> tuple[Any, bool]:
    """The class or factory ``name`` names, and whether it is a built-in: imported, never called (nothing is
    constructed, no weights load), for checking a config before training. UserError, with the fix, otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name))
    name = name.strip()
    builtin = name in BUILTIN_REWARDS
    if not builtin and ":" not in name:
        raise _unknown(name)
    factory = _import(BUILTIN_REWARDS.get(name, name), name)
    if not callable(factory):
        raise UserError(f"custom reward '{name}' is not a class or factory function.")
    return factory, builtin


def build_reward(name: str, *, args: dict[str, Any] | None = None, target: float | None = None) -> Reward:
    """Build the reward called ``name`` with keyword ``args`` (UserError on any problem the user can fix).

    ``target`` (optional): cap the score at this value, ``min(score, target)``; above it the reward earns nothing
    more and passes no gradient (a hinge against reward hacking; see ``base.HingedReward``).
    """
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name))
    name = name.strip()
    capped = _check_target(name, target)
    reward = _build(name, args)
    return HingedReward(reward, capped) if capped is not None else reward


def _build(name: str, args: dict[str, Any] | None) -> Reward:
    if args is None:
        args = {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise UserError(f"reward '{name}': args must be a mapping of names to values, got {args!r}.")
    factory, builtin = resolve_reward(name)
    if not builtin and not args and _is_reward_function(factory):
        return as_reward(factory, name)  # 'module:function' naming the reward itself, not a factory
    _check_args(name, factory, args)
    if builtin:
        return factory(**args)  # built-ins raise UserError themselves for bad values
    try:
        reward = factory(**args)
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"custom reward '{name}': construction with args {sorted(args)} failed ({type(err).__name__}: {err})."
        ) from err
    if not callable(reward):
        raise UserError(
            f"custom reward '{name}' built a {type(reward).__name__}, which is not callable as reward(images, prompts)."
        )
    return as_reward(reward, name)
