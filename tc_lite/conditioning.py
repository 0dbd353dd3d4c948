"""What prompts become for the UNet: a small typed value (`Cond`), and the encoder that makes it for training.

`Cond` carries the per-token hidden states every family has, plus `added`: the UNet's `added_cond_kwargs`
(SDXL: the pooled embedding `text_embeds` and `time_ids`). Everything downstream (the denoising loop, the prefix
cache, interpolation at inference) treats it as a whole, so a family with more conditioning adds fields, not code.

`PromptEncoder` makes the two embeddings the method needs: the tuned one (with gradients into the adapters) and
the original one (the base model's, under the adapters' "original weights" context, without gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tc_lite.adapters import AdapterSet
    from tc_lite.families import ModelFamily


@dataclass
class Cond:
    """Conditioning for a batch: `hidden` [B, L, D] and the UNet's `added_cond_kwargs` (None for SD1)."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def map(self, fn: Callable[..., torch.Tensor], *others: "Cond") -> "Cond":
        """Apply `fn` to every tensor, together with the matching tensors of `others` (same fields)."""
        hidden = fn(self.hidden, *(o.hidden for o in others))
        added = None if self.added is None else {
            k: fn(v, *(o.added[k] for o in others)) for k, v in self.added.items()  # type: ignore[index]
        }
        return Cond(hidden, added)

    @staticmethod
    def cat(a: "Cond", b: "Cond") -> "Cond":
        return a.map(lambda x, y: torch.cat([x, y]), b)

    def expand(self, n: int) -> "Cond":
        if self.hidden.shape[0] == n:
            return self
        return self.map(lambda x: x.expand(n, *x.shape[1:]))

    def select(self, index: torch.Tensor | slice) -> "Cond":
        return self.map(lambda x: x[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Cond":
        return self.map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


class PromptEncoder:
    """Prompts → `Cond` through the family, tuned or original.

    `tuned` runs the encoders as they are now (adapters on, gradients flowing into them); `base` runs them under
    the text-encoder adapters' `original()` and `no_grad` (the two-encoder schedule's early steps, the
    unconditional embedding). The encoders are looked up in `components` on every call, so an adapter may swap one
    in for its context. A UNet adapter is not theirs to switch: `Recipe.render(tuned=False)` does that.
    """

    def __init__(self, family: "ModelFamily", components: Any, adapters: "AdapterSet | None" = None,
                 size: tuple[int, int] | None = None):
        self.family = family
        self.components = components
        self.adapters = adapters
        self.size = size  # (height, width) of the images; SDXL's time ids carry it

    def tuned(self, prompts: Sequence[str]) -> Cond:
        return self.family.encode(self.components, list(prompts), size=self.size)

    @torch.no_grad()
    def base(self, prompts: Sequence[str]) -> Cond:
        if self.adapters is None:
            return self.tuned(prompts)
        with self.adapters.original(only=self.adapters.keys("text_encoder")):
            return self.family.encode(self.components, list(prompts), size=self.size)

    def uncond_tuned(self, negative_prompt: str) -> Cond:
        """The negative prompt's conditioning (one row) by the tuned encoders; the family may make it without them
        (SDXL: zeros for an empty negative prompt, as diffusers does)."""
        return self.family.uncond(self.components, negative_prompt, size=self.size)

    @torch.no_grad()
    def uncond_base(self, negative_prompt: str) -> Cond:
        if self.adapters is None:
            return self.uncond_tuned(negative_prompt)
        with self.adapters.original(only=self.adapters.keys("text_encoder")):
            return self.family.uncond(self.components, negative_prompt, size=self.size)
