"""open_clip's own model and tokenizer code as the reference for OpenCLIP-format rewards (HPSv2, OpenCLIP CLIPs).

``import open_clip`` fails here: its package ``__init__`` imports torchvision for the image transforms, and
torchvision is deliberately not installed (it would pull a second torch). The model code itself
(``open_clip/model.py``, ``transformer.py``) and the tokenizer only need torch, except for one import of
``torchvision.ops.misc.FrozenBatchNorm2d`` (used by ResNet towers, not by ViTs). So the reference loads those
submodules under a stand-in package with a stand-in for that one torchvision class, then takes both stand-ins out
of ``sys.modules`` again (a leftover stub would confuse ``importlib.util.find_spec`` elsewhere in the session).
Only open_clip's ViT CLIP and tokenizer are used; the image transform is written out step by step, from HPSv2's
``ResizeMaxSize`` and torchvision's tensor ``resize``: in the HPSv2 tests, and here as
:func:`resize_max_size_reference`, whose bicubic resize is PIL's float resampler (:func:`pil_float_resize`), an
implementation of the filter independent of ``F.interpolate``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import pytest


def load_open_clip() -> tuple[Any, Any]:
    """(open_clip.model, open_clip.tokenizer) modules, or skip when open_clip_torch is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    import transformers  # noqa: F401  (imported before any stub: it probes torchvision itself)
    from torch import nn

    before = set(sys.modules)
    stubs: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("torchvision") is None:
        tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (nn.Module,), {})  # never built by ViT models
        tv.ops, ops.misc = ops, misc
        stubs = {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc}
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    saved = {name: sys.modules.get(name) for name in [*stubs, "open_clip"]}
    sys.modules.update(stubs)
    sys.modules["open_clip"] = package
    try:
        model = importlib.import_module("open_clip.model")
        tokenizer = importlib.import_module("open_clip.tokenizer")
    except Exception as err:  # an open_clip version with other imports: no reference, not a failure of ours
        pytest.skip(f"cannot load open_clip's model code without torchvision ({type(err).__name__}: {err})")
    finally:
        for name in set(sys.modules) - before:
            if name == "open_clip" or name.startswith(("open_clip.", "torchvision")):
                del sys.modules[name]
        for name, module in saved.items():
            if module is not None:
                sys.modules[name] = module
    return model, tokenizer


TINY_ARCH: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_open_clip(oc_model: Any, arch: dict[str, Any] = TINY_ARCH, seed: int = 0) -> Any:
    """A tiny OpenCLIP ViT CLIP built by open_clip's code, every tensor randomised (LayerNorms too, so a mapping
    that swapped ln_1/ln_2 or pre/post norms could not pass)."""
    import torch

    torch.manual_seed(seed)
    model = oc_model.CLIP(**arch).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(4.0)
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5))
    return model


def pil_float_resize(x: Any, height: int, width: int) -> Any:
    """Bicubic resize of a float ``[3,H,W]`` tensor by PIL's float ("F" mode) resampler, channel by channel.

    This is the filter torchvision's tensor ``resize(..., antialias=True)`` was written to reproduce (PIL's
    separable bicubic, a = -0.5, support widened by the downscale factor), computed by PIL's own code in float32:
    no uint8 rounding and no clipping, as torchvision does for float tensors. So it checks the antialiased kernel
    at large downscales (SDXL's 1024 -> 224 is ~4.6x) independently of ``F.interpolate``.
    """
    import numpy as np
    import torch
    from PIL import Image

    planes = [Image.fromarray(c.numpy().astype(np.float32), mode="F") for c in x.detach().float().cpu()]
    return torch.from_numpy(np.stack([np.asarray(p.resize((width, height), Image.BICUBIC)) for p in planes]))


def resize_max_size_reference(x: Any, size: int = 224, fill: float = 0.0) -> Any:
    """HPSv2's ``ResizeMaxSize(size, fill=0)`` on a ``ToTensor`` output ``[3,H,W]`` in [0,1], step by step:
    ``scale = size / max(h, w)``; if ``scale != 1``: resize to ``(round(h*scale), round(w*scale))`` (bicubic, here
    by :func:`pil_float_resize`), then pad ``[left=pad_w//2, top=pad_h//2, right=pad_w-pad_w//2,
    bottom=pad_h-pad_h//2]`` with ``fill``. Returns ``[3,size,size]`` (before normalisation)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return x  # ResizeMaxSize skips resize and pad here (tc-lite pads; see docs/rewards.md)
    new_h, new_w = round(h * scale), round(w * scale)
    x = pil_float_resize(x, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
