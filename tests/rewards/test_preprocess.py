"""The differentiable preprocessing must feed reward models what their reference PIL pipeline would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tc_lite.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess


def _picture(width: int, height: int) -> Image.Image:
    """Smooth gradients plus hard-edged shapes: both regimes of the resize filter."""
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], -1) * 255
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([width // 4, height // 4, width // 2, height // 2], fill=(250, 20, 30))
    draw.rectangle([width // 2, height // 3, width - 10, height - 20], fill=(10, 200, 40))
    return img


@pytest.mark.parametrize("size", [(512, 512), (640, 480), (300, 500), (224, 224)])
def test_matches_clip_image_processor(size):
    from transformers import CLIPImageProcessor

    img = _picture(*size)
    ref = torch.from_numpy(np.array(CLIPImageProcessor()(images=img, return_tensors="np")["pixel_values"][0]))
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    ours = clip_preprocess(tensor)[0]
    assert ours.shape == ref.shape == (3, 224, 224)
    diff = (ours - ref).abs()
    # PIL rounds (one uint8 step = 0.015 after normalisation) and clips between its two filter passes, which
    # only matters at a handful of hard-edge pixels
    stats = (float(diff.max()), float(diff.mean()), float((diff > 0.03).float().mean()))
    assert diff.mean() < 0.004 and (diff > 0.03).float().mean() < 1e-3 and diff.max() < 0.15, stats


def test_pad_mode_keeps_whole_image_and_pads_black():
    images = torch.full((1, 3, 100, 200), 0.5)
    out = clip_preprocess(images, 224, mode="pad")
    assert out.shape == (1, 3, 224, 224)
    # 200 -> 224 wide, 100 -> 112 high, 112 rows of padding split 56 / 56
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    grey = (torch.full((3,), 0.5) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, :, :56, :], black.view(3, 1, 1).expand(3, 56, 224), atol=1e-6)
    assert torch.allclose(out[0, :, 168:, :], black.view(3, 1, 1).expand(3, 56, 224), atol=1e-6)
    assert torch.allclose(out[0, :, 60:164, :], grey.view(3, 1, 1).expand(3, 104, 224), atol=1e-5)


def test_is_differentiable_and_float32():
    images = torch.rand(2, 3, 40, 30, dtype=torch.float16).requires_grad_(True)
    out = clip_preprocess(images)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        clip_preprocess(torch.rand(3, 32, 32))
    with pytest.raises(ValueError):
        clip_preprocess(torch.rand(1, 3, 32, 32), mode="squash")
