"""PickScore_v1 (Kirstain et al., 2023): human preference for an image given its prompt, ``logit_scale.exp() * cos``.

The model is a transformers ``CLIPModel`` (``yuvalkirstain/PickScore_v1``, a fine-tuned OpenCLIP ViT-H-14); its
official inference (the PickScore README) preprocesses with ``AutoProcessor`` of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` and scores ``model.logit_scale.exp() * (text_embs @ image_embs.T)`` on
L2-normalised embeddings. That is what this reward returns per (image, prompt) pair, so the numbers match the
published ones (about 17-23 for SD-class images; the paper's Parti-Prompts table has SD1.5 at 18.83).

Preprocessing follows the processor's own config (shortest side to ``size``, centre crop ``crop_size``, its mean and
std), read from the processor folder, on tensors that keep the gradient. The tokenizer is the processor's.

TextCraftor's code scores PickScore on the whole B x B prompt-image matrix and takes its mean (every prompt
against every image of the batch); tc-lite uses the per-pair score, which is what PickScore defines.
"""

from __future__ import annotations

from typing import Any

from tc_lite.errors import UserError
from tc_lite.rewards.clip_score import ClipSimilarity
from tc_lite.rewards.loading import load_pretrained, require

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _field(obj: Any, key: str) -> Any:
    """``size["shortest_edge"]`` for a dict (transformers 4) or a ``SizeDict`` (transformers 5)."""
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def image_settings(processor: Any, *, reward: str, spec: str) -> dict[str, Any]:
    """Size, crop, mean and std from a CLIP image processor; refuse settings the tensor path does not copy."""
    size = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None)
    shortest = _field(size, "shortest_edge")
    crop_hw = (_field(crop, "height"), _field(crop, "width"))
    problems = []
    if not getattr(processor, "do_resize", True) or not isinstance(shortest, int):
        problems.append(f"size {size!r} (expected a shortest_edge resize)")
    if not getattr(processor, "do_center_crop", True) or crop_hw[0] is None or crop_hw[0] != crop_hw[1]:
        problems.append(f"crop_size {crop!r} (expected a square centre crop)")
    resample = getattr(processor, "resample", 3)
    if int(getattr(resample, "value", resample)) != 3:
        problems.append(f"resample {resample} (expected 3 = bicubic)")
    if not getattr(processor, "do_normalize", True) or not getattr(processor, "do_rescale", True):
        problems.append("rescale/normalise switched off")
    if problems:
        raise UserError(
            f"reward '{reward}': processor '{spec}' uses {'; '.join(problems)}, which the differentiable "
            f"preprocessing does not reproduce; use {DEFAULT_PROCESSOR}."
        )
    return dict(
        image_size=int(shortest),
        crop_size=int(crop_hw[0]),
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
    )


class PickScoreReward(ClipSimilarity):
    """``logit_scale.exp() * cos(image, prompt)`` with PickScore_v1 weights (~17-23; higher = preferred)."""

    name = "pickscore"
    mode = "crop"
    clamp = True  # the reference is CLIPImageProcessor on PIL images (uint8)

    def __init__(self, model: str = DEFAULT_MODEL, processor: str = DEFAULT_PROCESSOR):
        require("transformers", reward=self.name, install="pip install transformers")
        from transformers import AutoProcessor, CLIPModel

        loaded = load_pretrained(AutoProcessor, processor, reward=self.name, key="processor", what="processor")
        image_processor, tokenizer = getattr(loaded, "image_processor", None), getattr(loaded, "tokenizer", None)
        if image_processor is None or tokenizer is None:
            raise UserError(
                f"reward '{self.name}': processor '{processor}' is not a CLIP processor (image processor + tokenizer); "
                f"use {DEFAULT_PROCESSOR}."
            )
        settings = image_settings(image_processor, reward=self.name, spec=processor)
        self.tokenizer = tokenizer
        clip = load_pretrained(CLIPModel, model, reward=self.name, key="model", what="PickScore model")
        self._finish_model(clip)
        self.image_size, self.crop_size = settings["image_size"], settings["crop_size"]
        self.mean, self.std = settings["mean"], settings["std"]
        # logit_scale is frozen: read it once (with offload: sequential the parameter itself sits on 'meta')
        self.scale = float(clip.logit_scale.detach().float().exp())
