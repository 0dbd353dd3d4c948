"""What every reward is: a scoring callable plus, optionally, the frozen model the offloader may move."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class RewardFn(Protocol):
    """The whole contract: ``reward(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]``, higher is better."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class Reward:
    """Base class for rewards that own a model.

    Subclasses implement ``__call__`` and, when they hold weights, ``module()``: returning the model (instead of
    subclassing ``nn.Module``) lets the mix move *only* the heavy frozen weights between CPU and GPU while the
    reward object itself stays a plain, cheap Python object.
    """

    name: str = "reward"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def module(self) -> nn.Module | None:
        """The frozen model to offload (the reward itself if it is also an ``nn.Module``), else None."""
        return self if isinstance(self, nn.Module) else None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Reward:
        """Place the weights where they live between scoring calls (the offload 'home') in the compute dtype.

        Subclasses receive float32 images and should cast to their module's dtype themselves.
        """
        mod = self.module()
        if mod is self:
            nn.Module.to(mod, device=device, dtype=dtype)  # a Reward that is also an nn.Module (avoid recursion)
        elif mod is not None:
            mod.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class CallableReward(Reward):
    """Adapts a user's plain callable (function or object) to the ``Reward`` interface.

    Custom rewards only have to honour the call contract; their model, if any, is found as the object itself
    when it is an ``nn.Module`` or through its own ``module()`` method. It is moved between devices but never
    cast, because the callable may not expect a different dtype.
    """

    def __init__(self, fn: RewardFn, name: str):
        self.fn = fn
        self.name = str(getattr(fn, "name", "") or name)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.fn(images, prompts)

    def module(self) -> nn.Module | None:
        if isinstance(self.fn, nn.Module):
            return self.fn
        get = getattr(self.fn, "module", None)
        return get() if callable(get) else None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Reward:
        """Move only: a plain callable did not opt into the compute dtype, so its weights keep their own."""
        return super().to(device, None)


def as_reward(obj: object, name: str) -> Reward:
    """Return ``obj`` if it already is a ``Reward``, else wrap a conforming callable."""
    if isinstance(obj, Reward):
        if obj.name == Reward.name:  # subclass without its own name: use the one it was registered under
            obj.name = name
        return obj
    if not callable(obj):
        raise TypeError(f"{name} is not callable")
    return CallableReward(obj, name)  # type: ignore[arg-type]


class HingedReward(Reward):
    """``min(score, target)``: a reward capped at ``target`` (the config's per-term ``target``).

    Below the target it is the wrapped reward, gradient and all; at or above it the score stays at ``target`` and
    the gradient is zero, so the text encoder gains nothing by pushing the reward further (which is where reward
    hacking lives: over-saturated "aesthetic" images, repeated objects for HPSv2). ``target`` is in the reward's
    own units (aesthetic ~1-10, clip ~15-35, pickscore ~17-23, hpsv2 ~0.25-0.30) and applies before the weight.
    The logged part is the capped score. The wrapped reward's weights, offload and other attributes
    (``image_embeds``, ...) are the inner reward's.
    """

    def __init__(self, inner: Reward, target: float):
        self.inner = inner
        self.target = float(target)
        self.name = inner.name

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        scores = self.inner(images, prompts)
        if not isinstance(scores, torch.Tensor):
            return scores  # let the mix report the contract violation with the reward's name
        return scores.clamp(max=self.target)

    def module(self) -> nn.Module | None:
        return self.inner.module()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Reward:
        self.inner.to(device, dtype)
        return self

    def __getattr__(self, attr: str):
        if attr == "inner":  # not set yet (during unpickling): avoid infinite recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return f"HingedReward({self.inner!r}, target={self.target:g})"
