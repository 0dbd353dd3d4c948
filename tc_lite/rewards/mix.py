"""Weighted sum of rewards, scored one model at a time, with gradients that reach the images.

``total = sum_k weight_k * reward_k(images, prompts)`` per image (shape [B]); every part is also returned,
detached, for logging. Weights may be negative (penalties); a weight of 0 scores the reward for logging only and
skips its backward.

**Why each reward's backward runs inside the mix.** With ``offload="cpu"`` a reward model sits on the GPU only
while it scores. A normal autograd graph would keep every reward's activations and device weights alive until
the trainer's ``loss.backward()`` -- all reward models on the GPU at once. Instead, for each reward in turn the
mix (1) moves its model to the device, (2) scores a detached float32 copy ``x`` of the images, (3) takes
``d score / d x`` with ``torch.autograd.grad``, (4) frees that graph and sends the model home. The returned
``total`` is attached to the caller's ``images`` by a small autograd function whose backward returns
``grad_total[i] * sum_k weight_k * d reward_k / d x[i]``. This is the exact vector-Jacobian product whenever each
image's score depends only on that image (true for all built-in rewards) or the loss weighs all images equally
(``loss = -total.mean()``); it holds for both offload modes, and peak memory is one reward's activations
instead of all of them. Consequences: call ``backward`` on ``total`` at most once per call, and reward
parameters receive no gradient (reward models are frozen).

**Offload modes.** ``cpu``: each model moves to the device for its own scoring window (``on_device``), one at a
time. ``none``: every model lives on the device. ``sequential``: layer by layer through accelerate hooks
(``offload.attach_sequential``), for the smallest cards: at most one layer's weights on the device at any time, at
the price of a host-to-device copy of every layer per forward and per backward recomputation. The mix owns the
hooked models: ``close()`` removes the hooks and gives the weights back.

**Dtypes.** Every reward receives the images as float32 on the compute device (preprocessing is precise and
cheap at 224 px); built-in rewards cast their 224 px pixel tensor to their model's dtype, which the mix sets to
``dtype``. Scores come back as float32. Code runs fine under an enclosing ``torch.autocast``. When the reward
runs in float16 (``dtype=float16`` or float16 autocast) the internal backward uses a fixed loss scale of 1024
(retried unscaled on overflow), because the trainer's GradScaler does not reach this inner backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tc_lite.errors import UserError
from tc_lite.rewards.base import Reward, as_reward
from tc_lite.rewards.offload import (
    attach_sequential,
    detach_sequential,
    normalize_device,
    on_device,
    pin_memory,
    sequential_window,
)

OFFLOAD_MODES = ("cpu", "none", "sequential")
_FP16_GRAD_SCALE = 1024.0


class _AttachGrad(torch.autograd.Function):
    """Forward: the precomputed total. Backward: the precomputed d total / d images, scaled per image."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, images: torch.Tensor, total: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.images_dtype, ctx.images_device = images.dtype, images.device
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        scale = grad_total.to(grad.dtype).reshape(-1, *([1] * (grad.ndim - 1)))
        return (grad * scale).to(ctx.images_device, ctx.images_dtype), None, None


def _check_weight(name: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UserError(f"reward '{name}': weight must be a finite number, got {weight!r}.")
    return float(weight)


def check_scores(name: str, scores: object, batch: int) -> torch.Tensor:
    """Enforce the reward contract on one output: a finite floating tensor of shape [B]."""
    if not isinstance(scores, torch.Tensor):
        raise UserError(f"reward '{name}' returned {type(scores).__name__}; it must return a Tensor of shape [B].")
    if tuple(scores.shape) != (batch,):
        raise UserError(
            f"reward '{name}' returned shape {list(scores.shape)} for {batch} images; it must return one score "
            f"per image, shape [{batch}]."
        )
    if not scores.is_floating_point():
        raise UserError(f"reward '{name}' returned dtype {scores.dtype}; scores must be floating point.")
    if not bool(torch.isfinite(scores).all()):
        raise UserError(
            f"reward '{name}' returned non-finite scores {scores.detach().cpu().tolist()}; fix the reward (or run "
            f"reward models in bfloat16/float32 if float16 overflows)."
        )
    return scores


class RewardMix:
    """``mix(images, prompts) -> (total [B], {name: part [B]})``; see the module docstring for the gradient path."""

    def __init__(
        self,
        entries: Sequence[tuple[str, Reward, float]],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        offload: str = "cpu",
    ):
        if offload not in OFFLOAD_MODES:
            raise UserError(f"reward offload must be one of {list(OFFLOAD_MODES)}, got {offload!r}.")
        if not entries:
            raise UserError("no rewards configured: add at least one reward with a weight.")
        names = [name for name, _, _ in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"reward names must be unique; repeated: {dupes}.")
        self.device = normalize_device(device)
        self.dtype = dtype
        self.offload = offload
        self.entries: list[tuple[str, Reward, float]] = [
            (name, as_reward(reward, name), _check_weight(name, weight)) for name, reward, weight in entries
        ]
        if offload == "sequential":
            try:
                import accelerate  # noqa: F401
            except ImportError as err:
                raise UserError(
                    "rewards.offload: sequential needs the package 'accelerate', which is not installed. "
                    "Install it with: pip install accelerate (or use rewards.offload: cpu)."
                ) from err
        home = self.device if offload == "none" else torch.device("cpu")
        self._non_blocking = offload == "cpu" and self.device.type == "cuda"
        self._hooked: list = []
        for _, reward, _ in self.entries:
            reward.to(home, dtype)
            module = reward.module()
            if self._non_blocking and module is not None:
                pin_memory(module)
        if offload == "sequential":  # after every reward is placed: a tower shared by two rewards is hooked once
            for _, reward, _ in self.entries:
                module = reward.module()
                if module is not None:
                    attach_sequential(module, self.device)
                    self._hooked.append(module)

    def close(self) -> None:
        """Give hooked models back (``offload: sequential``): hooks removed, weights restored on the CPU."""
        for module in self._hooked:
            detach_sequential(module)
        self._hooked = []

    def _window(self, reward: Reward):
        """Where a reward's model is while it scores: moved for the call (cpu; a no-op for none) or hooked."""
        if self.offload == "sequential":
            return sequential_window(reward.module())
        return on_device(reward.module(), self.device, non_blocking=self._non_blocking)

    def _inner_grad_scale(self) -> float:
        """Loss scale for the reward's own backward: needed whenever it runs in float16 (weights or autocast)."""
        if self.dtype == torch.float16:
            return _FP16_GRAD_SCALE
        try:
            kind = self.device.type
            if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
                return _FP16_GRAD_SCALE
        except RuntimeError:  # device types without autocast support
            pass
        return 1.0

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.entries]

    def _score(
        self, name: str, reward: Reward, x: torch.Tensor, prompts: list[str], with_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score (and, if asked, d score / d x) inside the on-device window; the graph dies with this frame."""
        batch = x.shape[0]
        if not with_grad:
            with torch.no_grad():
                return check_scores(name, reward(x, prompts), batch).detach().float(), None
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = check_scores(name, reward(x, prompts), batch)
            if not scores.requires_grad:
                raise UserError(f"reward '{name}' is not differentiable w.r.t. the images (its output has no grad).")
            objective = scores.float().sum()
            scale = self._inner_grad_scale()
            (grad,) = torch.autograd.grad(objective * scale, x, retain_graph=scale != 1.0, allow_unused=True)
            if grad is None:
                raise UserError(f"reward '{name}' is not differentiable w.r.t. the images (no path to the pixels).")
            if scale != 1.0:
                if bool(torch.isfinite(grad).all()):
                    grad = grad / scale
                else:
                    (grad,) = torch.autograd.grad(objective, x)
        return scores.detach().float(), grad

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B,3,H,W] in [0,1], got {images.dtype} {tuple(images.shape)}")
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        want_grad = torch.is_grad_enabled() and images.requires_grad
        x = images.detach().to(self.device, torch.float32)
        total = torch.zeros(x.shape[0], device=self.device, dtype=torch.float32)
        grad_sum = torch.zeros_like(x) if want_grad else None
        parts: dict[str, torch.Tensor] = {}
        for name, reward, weight in self.entries:
            with self._window(reward):
                scores, grad = self._score(name, reward, x, prompts, want_grad and weight != 0.0)
            scores = scores.to(self.device)
            parts[name] = scores
            total = total + weight * scores
            if grad is not None and grad_sum is not None:
                grad_sum.add_(grad, alpha=weight)
        if grad_sum is not None:
            total = _AttachGrad.apply(images, total, grad_sum)
        return total, parts

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g}*{n}" for n, _, w in self.entries)
        return f"RewardMix({terms}, device={self.device}, dtype={self.dtype}, offload={self.offload!r})"
