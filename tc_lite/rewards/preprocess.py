"""Differentiable CLIP preprocessing on tensors, so reward gradients reach the generated pixels.

The reference pipelines (``CLIPImageProcessor``, OpenAI ``clip.load`` transforms) work on PIL images and cut the
gradient. These functions reproduce them on ``[B,3,H,W]`` float tensors in [0,1]:

* ``mode="crop"`` (CLIP, aesthetic, PickScore): resize the shortest side to ``size`` (bicubic, antialiased; the
  long side becomes ``int(size * long / short)`` as in transformers), centre-crop ``size``x``size`` (offset
  ``(extent - size) // 2``), normalise.
* ``mode="pad"`` (HPSv2 inference): resize the longest side to ``size`` (other side ``round(side * scale)``),
  zero-pad (black, before normalisation) to a square, ``pad // 2`` on the left/top, then normalise.

The resized pixels are clamped to [0,1] like PIL's uint8 output: the reward models never saw the bicubic
overshoot at hard edges (it would cost up to 0.16 per normalised value), and only those few overshooting pixels
lose their gradient. What remains is PIL's uint8 rounding (one uint8 step = 0.015 normalised) and its clipping
between the horizontal and vertical filter passes: against ``CLIPImageProcessor`` on downscaled test pictures
the mean |diff| is < 0.004, >= 99.9 % of values are within 0.03, and the max (a few hard-edge pixels) < 0.15.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(images.shape[-2:]) == (height, width):
        return images  # PIL resize to the same size is the identity too
    out = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)


def resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shortest side to ``size``, then centre crop to a square."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    images = _resize(images, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size]


def resize_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """Longest side to ``size``, then zero-pad to a square (nothing is cut off)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    images = _resize(images, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def normalize(images: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    *,
    mode: str = "crop",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] -> CLIP ``pixel_values`` ``[B,3,size,size]``, differentiable w.r.t. ``images``.

    Computed in float32 whatever the input dtype (the resize filter and normalisation are precision-sensitive
    and cheap at 224 px); cast to the model's dtype afterwards.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
    images = images.float()
    if mode == "crop":
        images = resize_crop(images, size)
    elif mode == "pad":
        images = resize_pad(images, size)
    else:
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    return normalize(images, mean, std)
