"""Tiny, real-format reward models built offline: a random CLIP saved with ``save_pretrained`` plus a tokenizer
built from open_clip's shipped BPE, and an aesthetic head written with the original key names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.rewards.tiny_rewards import clip_tokenizer, head_state_dict


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIP (hidden 32, 2 layers, 224 px / patch 32) with the ViT-L projection width 768."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(small, image_size=224, patch_size=32),
        projection_dim=768,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_head_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_state_dict(), path)
    return path


@pytest.fixture
def images() -> torch.Tensor:
    """Two 64x48 images (non-square, so the crop path is exercised), requiring grad."""
    return torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
