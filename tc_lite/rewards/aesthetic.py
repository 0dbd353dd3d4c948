"""LAION aesthetic predictor v2: a linear MLP on the L2-normalised CLIP ViT-L/14 image embedding (~1-10).

The head is the improved-aesthetic-predictor ``MLP``: ``layers`` = Linear(768,1024), Dropout(0.2),
Linear(1024,128), Dropout(0.2), Linear(128,64), Dropout(0.1), Linear(64,16), Linear(16,1) -- no activations in
the ``linearMSE`` weights, so the state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``. The embedding is
OpenAI CLIP's ``encode_image`` output, i.e. transformers' vision tower + ``visual_projection``. The full
``CLIPModel`` is loaded (``CLIPVisionModelWithProjection`` would silently re-initialise the projection when the
projection width sits only in the top-level config) and its text tower is dropped straight away. When a ``clip``
reward already holds the same CLIP model (same hub id or folder), its vision tower is reused instead of loading a
second copy (``loading.shared_vision``).

TextCraftor's code multiplies this score by 3 internally (``loss_aes = -3 * weight * prediction``); here that
belongs in the reward's weight (docs/rewards.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tc_lite.errors import UserError
from tc_lite.rewards.base import Reward
from tc_lite.rewards.loading import load_pretrained, read_state_dict, require, resolve_file, share_vision, shared_vision
from tc_lite.rewards.preprocess import clip_preprocess

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_HEAD = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
_HIDDEN = (1024, 128, 64, 16, 1)
_LINEAR_INDICES = (0, 2, 4, 6, 7)  # Sequential positions of the Linear layers (dropouts sit between)


class AestheticHead(nn.Module):
    """The v2 MLP with the original module layout, so its state dict loads without renaming."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def load_head(path: Path, *, reward: str = "aesthetic") -> AestheticHead:
    """Load and check a head file; its input width is read from ``layers.0.weight``."""
    state = read_state_dict(path, reward=reward, key="head")
    expected = {f"layers.{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    first = state.get("layers.0.weight")
    if missing or unexpected or first is None or first.ndim != 2:
        raise UserError(
            f"reward '{reward}': head file '{path}' is not an aesthetic-predictor v2 MLP (missing keys "
            f"{missing[:4]}, unexpected keys {unexpected[:4]}); use sac+logos+ava1-l14-linearMSE.pth."
        )
    head = AestheticHead(int(first.shape[1]))
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"reward '{reward}': head file '{path}' has wrong layer shapes: {err}") from err
    return head


class AestheticNet(nn.Module):
    """CLIP vision tower + projection + normalise + head: the whole frozen model the offloader moves."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, head: AestheticHead):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        embeds = F.normalize(embeds.float(), dim=-1)  # the original normalises in float32 too
        head_dtype = self.head.layers[0].weight.dtype
        return self.head(embeds.to(head_dtype)).squeeze(-1).float()


class AestheticReward(Reward):
    """Predicted LAION aesthetic score per image (prompts are ignored)."""

    name = "aesthetic"

    def __init__(self, clip_model: str = DEFAULT_CLIP_MODEL, head: str = DEFAULT_HEAD):
        require("transformers", reward=self.name, install="pip install transformers")
        mlp = load_head(resolve_file(head, reward=self.name, key="head"), reward=self.name)  # cheap: check first
        found = shared_vision(clip_model)
        if found is None:
            from transformers import CLIPModel

            clip = load_pretrained(CLIPModel, clip_model, reward=self.name, key="clip_model", what="CLIP model")
            share_vision(clip_model, clip)
            found = clip.vision_model, clip.visual_projection
            del clip  # the text tower goes with it
        vision_model, visual_projection = found
        proj_dim = int(visual_projection.out_features)
        in_dim = mlp.layers[0].in_features
        if proj_dim != in_dim:
            raise UserError(
                f"reward '{self.name}': head '{head}' expects {in_dim}-d CLIP embeddings but clip_model "
                f"'{clip_model}' gives {proj_dim}-d ones; the v2 head needs openai/clip-vit-large-patch14."
            )
        self.image_size = int(vision_model.config.image_size)
        net = AestheticNet(vision_model, visual_projection, mlp)
        self.net = net.eval().requires_grad_(False)

    def module(self) -> nn.Module:
        return self.net

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        pixels = clip_preprocess(images, self.image_size)
        return self.net(pixels.to(dtype))
