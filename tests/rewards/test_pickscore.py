"""PickScore: the differentiable path against the official inference code (the PickScore README: AutoProcessor on
PIL images, get_image_features / get_text_features, logit_scale.exp() * cosine), on a tiny random CLIP saved with
save_pretrained and a processor folder saved the way the hub's is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tc_lite.errors import UserError
from tc_lite.rewards import build_reward
from tests.rewards.tiny_rewards import clip_tokenizer

LOGIT_SCALE = 3.5  # exp(3.5) = 33.1; PickScore_v1's is ~4.6 (x100): a distinct value shows the scale is applied


@pytest.fixture(scope="module")
def pick_dirs(tmp_path_factory):
    """(model folder, processor folder): PickScore_v1's architecture family (gelu, argmax pooling), tiny widths."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu")
    config = CLIPConfig(
        text_config=dict(small, vocab_size=49408, max_position_embeddings=77, eos_token_id=2, bos_token_id=0),
        vision_config=dict(small, image_size=224, patch_size=32),
        projection_dim=24,
        logit_scale_init_value=LOGIT_SCALE,
    )
    model_dir, processor_dir = tmp_path_factory.mktemp("pick_model"), tmp_path_factory.mktemp("pick_processor")
    CLIPModel(config).eval().save_pretrained(model_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer()).save_pretrained(processor_dir)
    return model_dir, processor_dir


@pytest.fixture(scope="module")
def pick(pick_dirs):
    model_dir, processor_dir = pick_dirs
    return build_reward("pickscore", args={"model": str(model_dir), "processor": str(processor_dir)})


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients, texture and hard-edged shapes (the resize filter's easy and hard cases)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], -1) * 0.8
    arr = arr + 0.2 * rng.random((height, width, 3))
    img = Image.fromarray((arr * 255).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([width // 4, height // 4, width // 2, height // 2], fill=(250, 20, 30))
    draw.rectangle([width // 2, height // 3, width - 10, height - 20], fill=(10, 200, 40))
    return img


def official_pickscore(model_dir, processor_dir, prompt: str, images: list[Image.Image]) -> torch.Tensor:
    """The PickScore README's calc_probs up to the scores (before the softmax), on the CPU."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(processor_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs)
        text_embs = model.get_text_features(**text_inputs)
        # transformers >= 5 wraps the projected features in an output object; 4.x returned the tensor
        image_embs = getattr(image_embs, "pooler_output", image_embs)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]


def test_pickscore_matches_official_inference(pick_dirs, pick):
    """Tolerance 0.02 on scores of ~+-33*cos: the processor resizes PIL uint8 images (rounding to 1/255 and
    clipping between its two filter passes), the reward resizes float tensors; the rest is identical."""
    prompt = "a red circle and a green box &amp; more"
    pictures = [_picture(512, 512, 0), _picture(640, 480, 1), _picture(300, 500, 2)]
    official = official_pickscore(*pick_dirs, prompt, pictures)
    tensors = [torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1)[None].float() / 255 for p in pictures]
    ours = torch.cat([pick(t, [prompt]).detach() for t in tensors])
    assert official.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(ours, official, rtol=0, atol=0.02)


def test_pickscore_scale_gradient_and_determinism(pick):
    assert pick.scale == pytest.approx(math.exp(LOGIT_SCALE), rel=1e-6)
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    scores = pick(images, ["a cat", "a dog"])
    assert scores.shape == (2,) and scores.dtype == torch.float32 and (scores.abs() <= pick.scale + 1e-4).all()
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(pick(images, ["a cat", "a dog"]), scores.detach())


def test_pickscore_errors(pick_dirs, tmp_path):
    model_dir, processor_dir = pick_dirs
    with pytest.raises(UserError, match=r"reward 'pickscore': model '.*no_such_dir' is neither an existing local"):
        build_reward("pickscore", args={"model": str(tmp_path / "no_such_dir"), "processor": str(processor_dir)})
    with pytest.raises(UserError, match=r"cannot load the processor 'tc-lite-test/none'.*hf download tc-lite-test/"):
        build_reward("pickscore", args={"model": str(model_dir), "processor": "tc-lite-test/none"})
    from transformers import CLIPImageProcessor, CLIPProcessor

    odd = tmp_path / "odd_processor"
    no_crop = CLIPImageProcessor(do_center_crop=False)
    CLIPProcessor(image_processor=no_crop, tokenizer=clip_tokenizer()).save_pretrained(odd)
    with pytest.raises(UserError, match=r"processor '.*odd_processor' uses crop_size .*square centre crop"):
        build_reward("pickscore", args={"model": str(model_dir), "processor": str(odd)})
