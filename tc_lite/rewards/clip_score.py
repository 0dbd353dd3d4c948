"""CLIP score: how well each image matches its prompt, as ``100 * cos(image_embedding, text_embedding)``.

The x100 matches TextCraftor's code (and equals OpenAI CLIP's ``logit_scale.exp()``), so values sit around
15-35 for ViT-L/14. TextCraftor keeps this reward on (official weight 0.5) as an anchor against collapse.
Text embeddings are computed without gradient: only the images are being optimised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tc_lite.rewards.base import Reward
from tc_lite.rewards.loading import load_pretrained
from tc_lite.rewards.preprocess import clip_preprocess

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
SCALE = 100.0


class ClipScoreReward(Reward):
    """``100 * cosine`` between the CLIP image and text embeddings, per (image, prompt) pair."""

    name = "clip"

    def __init__(self, model: str = DEFAULT_MODEL):
        from transformers import AutoTokenizer, CLIPModel

        self.model = load_pretrained(CLIPModel, model, reward=self.name, key="model", what="CLIP model")
        self.model.eval().requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer, model, reward=self.name, key="model", what="tokenizer")
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def module(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [B, D] in float32 (no gradient needed)."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] in float32, differentiable w.r.t. ``images``."""
        dtype = next(self.model.parameters()).dtype
        pixels = clip_preprocess(images, self.image_size).to(dtype)
        out = self.model.vision_model(pixel_values=pixels)
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        return SCALE * (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
