"""CLIP score: how well each image matches its prompt, as ``100 * cos(image_embedding, text_embedding)``.

The x100 matches TextCraftor's code (and equals OpenAI CLIP's ``logit_scale.exp()``), so values sit around
15-35 for ViT-L/14. TextCraftor keeps this reward on (official weight 0.5) as an anchor against collapse.
Text embeddings are computed without gradient: only the images are being optimised.

``ClipSimilarity`` is the shared machinery of every "scale x cosine between a CLIP image and text embedding"
reward (``clip``, ``pickscore``, ``hpsv2``): they differ only in weights, preprocessing and scale.

``model`` takes a transformers CLIP (hub id or ``save_pretrained`` folder) or an OpenCLIP checkpoint file (a local
``.bin/.pt/.pth/.safetensors`` or ``owner/name/file`` on the hub) with its ``arch`` (e.g. ``ViT-g-14``, what
TextCraftor's code used: ``laion/CLIP-ViT-g-14-laion2B-s34B-b88K/open_clip_pytorch_model.bin``). OpenCLIP files
are converted by ``tc_lite.rewards.openclip``; their tokenizer defaults to the CLIP BPE that open_clip ships.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tc_lite.errors import UserError
from tc_lite.rewards.base import Reward
from tc_lite.rewards.loading import load_pretrained, read_state_dict, require, resolve_file, share_vision
from tc_lite.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
SCALE = 100.0
OPEN_CLIP_TOKENIZER = "open_clip"  # the CLIP BPE shipped inside open_clip_torch: offline, what OpenCLIP uses
_CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


def load_tokenizer(spec: str, *, reward: str, key: str = "tokenizer") -> Any:
    """A CLIP tokenizer: ``open_clip`` (built offline from open_clip's BPE file), a hub id or a local folder."""
    if spec == OPEN_CLIP_TOKENIZER:
        try:
            from tc_lite.models.tokenizer import clip_tokenizer

            return clip_tokenizer()
        except UserError as err:
            raise UserError(
                f"reward '{reward}': {key} '{OPEN_CLIP_TOKENIZER}' needs the package open_clip_torch (only its "
                f"vocabulary file is read). Install it with: pip install --no-deps open_clip_torch -- or set "
                f"{key} to laion/CLIP-ViT-H-14-laion2B-s32B-b79K. ({err})"
            ) from err
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, spec, reward=reward, key=key, what="tokenizer")


def open_clip_clean(text: str) -> str:
    """open_clip's tokenizer cleaning (``whitespace_clean(basic_clean(text)).lower()``): ftfy fixes, HTML entities
    unescaped twice (``&amp;`` -> ``&``), whitespace collapsed, lower case. transformers' CLIP tokenizers skip the
    unescaping, so OpenCLIP-tokenized rewards clean prompts this way first to get open_clip's token ids."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a tc-lite requirement; without it only mojibake repair is lost
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def is_checkpoint_file(spec: str) -> bool:
    return spec.lower().endswith(_CHECKPOINT_SUFFIXES)


def load_openclip_file(spec: str, arch: str | dict, *, reward: str, key: str) -> Any:
    """``CLIPModel`` from an OpenCLIP checkpoint file (local or ``owner/name/file``) and its architecture."""
    from tc_lite.rewards.openclip import load_openclip_model, resolve_arch

    cfg = resolve_arch(arch, reward=reward)  # cheap: fail on a bad arch before reading gigabytes
    path = resolve_file(spec, reward=reward, key=key)
    return load_openclip_model(read_state_dict(path, reward=reward, key=key), cfg, reward=reward, source=str(path))


class ClipSimilarity(Reward):
    """``scale * cos(image_embeds, text_embeds)`` per (image, prompt) pair, differentiable w.r.t. the images.

    Subclasses set ``model`` (a transformers ``CLIPModel``, frozen), ``tokenizer``, ``scale`` (a Python float) and
    the preprocessing fields. The device of every tensor is taken from the images, never from the parameters
    (with ``offload: sequential`` the parameters live on the ``meta`` device between layers).
    """

    model: nn.Module
    tokenizer: Any
    scale: float = SCALE
    image_size: int = 224
    crop_size: int | None = None
    mode: str = "crop"  # crop (shortest side + centre crop) | pad (longest side + zero pad)
    clamp: bool = True  # clamp the resized pixels to [0, 1] (PIL/uint8 references) or not (float-tensor references)
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    open_clip_text: bool = False  # clean prompts as open_clip's tokenizer does (OpenCLIP-trained rewards)

    def _finish_model(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.image_size = int(config.vision_config.image_size)
        self.max_length = int(config.text_config.max_position_embeddings)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < self.max_length:
            self.max_length = limit

    def module(self) -> nn.Module:
        return self.model

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> the model's ``pixel_values`` (float32), as the reference preprocessing does."""
        return clip_preprocess(
            images, self.image_size, mode=self.mode, mean=self.mean, std=self.std, crop_size=self.crop_size,
            clamp=self.clamp,
        )

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """L2-normalised text embeddings [B, D] in float32 (no gradient needed). ``device``: where the tokens go
        (default: the model's; pass the images' device when the model may be offloaded layer by layer)."""
        if device is None:
            device = next(self.model.parameters()).device
        texts = [open_clip_clean(p) for p in prompts] if self.open_clip_text else list(prompts)
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] in float32, differentiable w.r.t. ``images``."""
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images).to(dtype)
        out = self.model.vision_model(pixel_values=pixels)
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        return self.scale * (self.image_embeds(images) * self.text_embeds(prompts, images.device)).sum(-1)


class ClipScoreReward(ClipSimilarity):
    """``100 * cosine`` between the CLIP image and text embeddings, per (image, prompt) pair."""

    name = "clip"

    def __init__(self, model: str = DEFAULT_MODEL, arch: str | dict | None = None, tokenizer: str | None = None):
        require("transformers", reward=self.name, install="pip install transformers")
        if not isinstance(model, str) or not model.strip():
            raise UserError(
                f"reward '{self.name}': model must be a hub id, a folder or a checkpoint file, got {model!r}."
            )
        if is_checkpoint_file(model):
            if arch is None:
                raise UserError(
                    f"reward '{self.name}': model '{model}' is an OpenCLIP checkpoint file; give its architecture "
                    f"too, e.g. arch: ViT-g-14 (or use a transformers CLIP such as {DEFAULT_MODEL})."
                )
            self.tokenizer = load_tokenizer(tokenizer or OPEN_CLIP_TOKENIZER, reward=self.name)
            self.open_clip_text = True
            clip = load_openclip_file(model, arch, reward=self.name, key="model")
        else:
            if arch is not None:
                raise UserError(
                    f"reward '{self.name}': arch is only for OpenCLIP checkpoint files "
                    f"({', '.join(_CHECKPOINT_SUFFIXES)}); "
                    f"'{model}' is a transformers model, whose config already says its architecture. Remove arch."
                )
            from transformers import CLIPModel

            self.tokenizer = load_tokenizer(tokenizer or model, reward=self.name)
            loaded = load_pretrained(CLIPModel, model, reward=self.name, key="model", what="CLIP model")
            clip = share_vision(model, loaded)
        self._finish_model(clip)
