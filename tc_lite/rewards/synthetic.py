"""``color``: a cheap, weight-free differentiable reward for the offline tiny demo and tests.

score = mean over pixels of ``<pixel - g, target - g> / ||target - g||^2`` with ``g`` = mid-grey (0.5, 0.5, 0.5):
how far each pixel has moved from grey toward the target colour, averaged. 0 for a grey image, 1 for an image
of exactly the target when the target is a corner of the RGB cube (red, green, white, ...), negative toward the
opposite colour. The gradient is constant (no saturation before the pixels hit the cube's faces), which is what
lets a tiny model's text encoder visibly move it. For red it is ``(2/3) * (mean R - mean G - mean B + 0.5)``,
the same ranking as the "mean R - mean(G, B)" redness measured in the design notes. Prompts are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tc_lite.errors import UserError
from tc_lite.rewards.base import Reward

_GREY = 0.5


class ColorReward(Reward):
    """How far the image's pixels have moved from grey toward a ``target`` colour (RGB in [0,1]; default red)."""

    name = "color"

    def __init__(self, target: Sequence[float] = (1.0, 0.0, 0.0)):
        ok = (
            isinstance(target, (list, tuple))
            and len(target) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in target)
            and all(0.0 <= float(v) <= 1.0 for v in target)
            and any(abs(float(v) - _GREY) > 1e-3 for v in target)
        )
        if not ok:
            raise UserError(
                f"reward '{self.name}': target must be a list of 3 numbers in [0, 1] (RGB) other than mid-grey, "
                f"got {target!r}; e.g. target: [1, 0, 0] for red."
            )
        self.target = tuple(float(v) for v in target)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        direction = torch.tensor(self.target, device=images.device, dtype=torch.float32) - _GREY
        direction = (direction / direction.square().sum()).view(1, 3, 1, 1)
        return ((images.float() - _GREY) * direction).sum(dim=1).mean(dim=(1, 2))
