"""The differentiable preprocessing must feed reward models what their reference PIL pipeline would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tc_lite.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, normalize
from tests.rewards.openclip_ref import pil_float_resize, resize_max_size_reference


def _picture(width: int, height: int) -> Image.Image:
    """Smooth gradients plus hard-edged shapes: both regimes of the resize filter."""
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], -1) * 255
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([width // 4, height // 4, width // 2, height // 2], fill=(250, 20, 30))
    draw.rectangle([width // 2, height // 3, width - 10, height - 20], fill=(10, 200, 40))
    return img


@pytest.mark.parametrize(
    "size", [(512, 512), (640, 480), (300, 500), (224, 224), (1024, 1024), (1216, 832), (832, 1216)]
)
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


# --- SDXL sizes ------------------------------------------------------------------------------------------------
# (width, height): SDXL's native 1024² and its aspect buckets, both orientations. 1024 -> 224 is a ~4.6x downscale,
# where a resize without antialiasing (or with another filter) shows; the non-square buckets have odd resized
# extents (1216x832 -> 327x224, crop offset 51) and an uneven pad split (-> 224x153, 35 + 36 rows of padding).
SDXL_SIZES = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)]

# PickScore's processor: preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, in its legacy form
# (int ``size``, which transformers reads as the shortest edge, and int ``crop_size``).
PICKSCORE_PROCESSOR = dict(
    size=224, crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
)  # fmt: skip


def _smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture: a 12x12 random colour field, bicubic-upsampled (no overshoot past [0,1])."""
    field = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    up = torch.nn.functional.interpolate(field, size=(height, width), mode="bicubic", align_corners=False)
    return Image.fromarray((up[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _checkerboard(width: int, height: int) -> Image.Image:
    """1-pixel checkerboard (green against magenta): all its energy is above the 224 px Nyquist limit."""
    yy, xx = np.mgrid[0:height, 0:width]
    c = ((xx + yy) % 2).astype(np.uint8) * 255
    return Image.fromarray(np.stack([c, 255 - c, c], -1))


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """I.i.d. uniform pixels: high frequencies *and* no two pixels alike, so a one-pixel shift of the crop or a
    resized extent off by one (which smooth pictures and the checkerboard hide) shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


# Tolerances against the PIL-based CLIP processors (normalised units; one uint8 step = 1/255/std <= 0.0152).
# PIL resizes uint8 pictures in two separable passes and rounds to uint8 after each: <= 0.5 step after the first
# pass, carried through the second pass's filter (sum of |weights| ~1.05 for bicubic a = -0.5), + 0.5 step at the
# end: <= ~1.05 steps = 0.016. Smooth pictures and the checkerboard never leave [0, 255] between the passes, so
# 0.02 (measured max 0.0154). I.i.d. noise overshoots [0, 255] in the first pass and PIL clips it before the
# second (the float path does not), so 0.04 (measured max 0.0141). Mean |diff| < 0.008: rounding alone biases it
# by at most half a step (0.0076), which the checkerboard reaches (every output pixel is 127.5 -> 128; measured
# mean 0.0073, <= 0.0041 on the other pictures). What this catches (measured on noise at these sizes): no
# antialiasing >= 2.3 (and >= 1.8 on the checkerboard, except at 1152x896's exact 4x, where plain bicubic samples
# fall midway between pixels), an area filter >= 0.43, an antialiased bilinear filter >= 0.19, a crop one pixel
# off or a resized long side one pixel longer >= 1.0 (at every bucket; at 1024² both are no-ops).
SDXL_CLIP_TOLERANCE = {"smooth": 0.02, "checkerboard": 0.02, "noise": 0.04}


@pytest.mark.parametrize("size", SDXL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sdxl_sizes_match_clip_and_pickscore_processors(size):
    from transformers import CLIPImageProcessor

    from tc_lite.rewards.pickscore import image_settings

    pick = CLIPImageProcessor(**PICKSCORE_PROCESSOR)
    settings = image_settings(pick, reward="pickscore", spec="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    processors = {
        "clip": (CLIPImageProcessor(), {}),  # clip and aesthetic: the default CLIPImageProcessor
        "pickscore": (pick, dict(size=settings["image_size"], crop_size=settings["crop_size"],
                                 mean=settings["mean"], std=settings["std"])),
    }  # fmt: skip
    failures = []
    for kind, make in (("smooth", _smooth), ("checkerboard", _checkerboard), ("noise", _noise)):
        img = make(*size)
        for name, (processor, kwargs) in processors.items():
            ref = torch.from_numpy(np.array(processor(images=img, return_tensors="np")["pixel_values"][0]))
            ours = clip_preprocess(_tensor(img), **kwargs)[0]
            assert ours.shape == ref.shape == (3, 224, 224)
            diff = (ours - ref).abs()
            if diff.max() > SDXL_CLIP_TOLERANCE[kind] or diff.mean() > 0.008:
                failures.append(f"{name}/{kind}: max {float(diff.max()):.4f} mean {float(diff.mean()):.5f}")
    assert not failures, failures


@pytest.mark.parametrize("size", SDXL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sdxl_sizes_match_open_clip_pad(size):
    """HPSv2 (``mode="pad"``, ``clamp=False``) against ``ResizeMaxSize`` with PIL's float resampler: both are
    float32 computations of one filter, so the only gap is float rounding in the weights and sums (measured
    <= 2.4e-5 normalised, on noise); 1e-4 allows for that and nothing else (a swapped pad split, at 1216x832's odd
    71-row pad, or the short side rounded up, at 1152x896 and 1216x832, fails by > 2)."""
    for kind, make in (("smooth", _smooth), ("checkerboard", _checkerboard), ("noise", _noise)):
        x = _tensor(make(*size))
        ref = normalize(resize_max_size_reference(x[0], 224)[None])
        ours = clip_preprocess(x, mode="pad", clamp=False)
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        assert float((ours - ref).abs().max()) < 1e-4, (kind, float((ours - ref).abs().max()))


def test_antialiased_filter_matches_pil_at_sdxl_downscale():
    """The filter itself, without uint8 rounding: torch's antialiased bicubic equals PIL's float bicubic at the
    largest SDXL downscale (1344 -> 392 and 768 -> 224, the crop path; 1344 -> 224, the pad path)."""
    x = _tensor(_noise(1344, 768))[0]
    for h, w in ((224, 392), (128, 224)):
        ours = torch.nn.functional.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True)[0]
        assert float((ours - pil_float_resize(x, h, w)).abs().max()) < 2e-5


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_gradient_reaches_pixels_at_1024(mode):
    """At 1024² every pixel feeds the 224² output (nothing is cropped or padded), and the gradient is the true
    adjoint: the preprocessing is affine away from the clamp, so <grad, v> = <w, f(x + v) - f(x)>."""
    gen = torch.Generator().manual_seed(0)
    x = (0.2 + 0.6 * _tensor(_smooth(1024, 1024))).requires_grad_(True)  # inside (0, 1): the clamp stays inactive
    w = torch.randn(1, 3, 224, 224, generator=gen)
    out = clip_preprocess(x, mode=mode)
    (out * w).sum().backward()
    grad = x.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.99
    v = 0.02 * torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        change = float((w * (clip_preprocess(x + v, mode=mode) - out)).sum())
    assert float((grad * v).sum()) == pytest.approx(change, rel=1e-3)


def test_gradient_follows_the_crop_of_a_bucket():
    """1216x832 (W x H): resized to 327x224, columns 51..274 kept, i.e. input columns ~190..1023 (+- the 7.4 px
    filter support). Pixels left and right of that get no gradient, the kept ones do."""
    x = torch.rand(1, 3, 832, 1216, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    clip_preprocess(x).sum().backward()
    per_column = x.grad.abs().sum(dim=(0, 1, 2))
    assert (per_column[:175] == 0).all() and (per_column[1040:] == 0).all()
    assert (per_column[200:1010] > 0).all()
