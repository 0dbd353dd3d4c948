"""Turn a reward name from the config into a Reward: a built-in name or a ``package.module:Name`` path.

A custom path may name a class or factory (called with the reward's args) or, with no args, a function
``fn(images, prompts)`` that is itself the reward.

Built-ins are listed as import paths too, so nothing heavy (transformers) is imported until a reward that needs
it is actually built. Arguments are checked against the constructor's signature first, so an unknown or
missing key is reported as such rather than as a TypeError from deep inside a model loader.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from tc_lite.errors import UserError
from tc_lite.rewards.base import Reward, as_reward

BUILTIN_REWARDS: dict[str, str] = {
    "aesthetic": "tc_lite.rewards.aesthetic:AestheticReward",
    "clip": "tc_lite.rewards.clip_score:ClipScoreReward",
    "color": "tc_lite.rewards.synthetic:ColorReward",
}


def known_rewards() -> list[str]:
    return sorted(BUILTIN_REWARDS)


def _unknown(name: str) -> UserError:
    return UserError(
        f"unknown reward '{name}'. Known rewards: {', '.join(known_rewards())}; or give a custom reward as "
        f"'package.module:ClassName' (importable, constructed with the reward's args)."
    )


def _import(path: str, name: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise _unknown(name)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
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


def _check_args(name: str, factory: Any, args: dict[str, Any]) -> None:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return  # no introspectable signature (C callables): let the call itself decide
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = None
    else:
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if accepted is not None:
        unknown = sorted(set(args) - set(accepted))
        if unknown:
            raise UserError(f"reward '{name}': unknown arg(s) {unknown}; accepted: {accepted or 'none'}.")
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
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


def build_reward(name: str, *, args: dict[str, Any] | None = None) -> Reward:
    """Build the reward called ``name`` with keyword ``args`` (UserError on any problem the user can fix)."""
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name))
    name = name.strip()
    if args is None:
        args = {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise UserError(f"reward '{name}': args must be a mapping of names to values, got {args!r}.")
    builtin = name in BUILTIN_REWARDS
    if not builtin and ":" not in name:
        raise _unknown(name)
    factory = _import(BUILTIN_REWARDS.get(name, name), name)
    if not callable(factory):
        raise UserError(f"custom reward '{name}' is not a class or factory function.")
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
