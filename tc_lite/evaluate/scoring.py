"""What scores the images: the reward models of the selection (``build_rewards``) and the image embedding that
diversity is measured in (``embedder``: a reward's CLIP image embedding, else the pixel-space fallback)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from tc_lite.errors import UserError
from tc_lite.evaluate.stats import COLLAPSE_RATIO

_PIXEL_SIDE = 32  # pixel-space diversity fallback: images downsampled to 32x32


def build_rewards(spec: Mapping[str, Mapping[str, Any]], prec: Any, offload: str) -> Any:
    """A ``RewardMix`` of every reward in ``spec`` (weight 1 each: scores are reported one by one)."""
    from tc_lite.rewards import RewardMix, build_reward

    entries = []
    for label, term in spec.items():
        try:
            reward = build_reward(term["type"], args=dict(term.get("args") or {}))
        except UserError as e:
            if label == term["type"]:
                raise  # the registry's message already names the reward
            raise UserError(f"rewards: {label}: {e}") from None
        entries.append((label, reward, 1.0))
    offload = offload if prec.device.type == "cuda" else "none"
    # Scores are the product here, so no bf16: fp16 (3 more mantissa bits) on a GPU, fp32 on the CPU.
    dtype = torch.float16 if prec.device.type == "cuda" else torch.float32
    return RewardMix(entries, device=prec.device, dtype=dtype, offload=offload)


def embedder(mix: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], str, str]:
    """(embed(images) -> [B, D], metric, description): a CLIP image embedding when a reward offers one."""
    from tc_lite.rewards import on_device

    candidates = []
    for label, reward, _ in mix.entries:
        owner = reward if hasattr(reward, "image_embeds") else getattr(reward, "fn", None)
        if owner is not None and callable(getattr(owner, "image_embeds", None)):
            candidates.append((label != "clip", label, reward, owner))
    if candidates:
        _, label, reward, owner = min(candidates, key=lambda c: c[0])

        @torch.no_grad()
        def embed(images: torch.Tensor) -> torch.Tensor:
            with on_device(reward.module(), mix.device):
                return owner.image_embeds(images.to(mix.device, torch.float32)).float().cpu()

        return embed, "cosine", (f"Diversity: mean pairwise 1 − cosine similarity of the CLIP image embeddings "
                                 f"(reward '{label}') of the same prompt's images across seeds, averaged over "
                                 f"prompts; flagged when below {COLLAPSE_RATIO:g} × the base model's.")

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images.float(), size=(_PIXEL_SIDE, _PIXEL_SIDE), mode="area").flatten(1).cpu()

    return pixels, "rms", (f"Diversity: no CLIP reward selected, so the pixel-space fallback: mean pairwise RMS "
                           f"difference of the same prompt's images across seeds, downsampled to "
                           f"{_PIXEL_SIDE}×{_PIXEL_SIDE} (values in [0, 1]), averaged over prompts; flagged when "
                           f"below {COLLAPSE_RATIO:g} × the base model's. Select the clip reward for a semantic measure.")
