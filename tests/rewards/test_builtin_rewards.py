"""Built-in rewards load through the real loaders from local paths, compute what the references compute,
are deterministic, and pass finite gradients to the images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tc_lite.errors import UserError
from tc_lite.rewards import build_reward
from tc_lite.rewards.preprocess import clip_preprocess
from tests.rewards.tiny_rewards import head_state_dict


def _grad_ok(reward, images, prompts):
    scores = reward(images, prompts)
    assert scores.shape == (images.shape[0],) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(reward(images, prompts), scores.detach())  # deterministic (dropout off)
    return scores


@pytest.fixture(scope="module")
def tiny_clip_model(tiny_clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir).eval()


def test_aesthetic_matches_reference_formula(tiny_clip_dir, tiny_head_path, tiny_clip_model, images):
    reward = build_reward("aesthetic", args={"clip_model": str(tiny_clip_dir), "head": str(tiny_head_path)})
    scores = _grad_ok(reward, images, ["a", "b"])
    # reference: projected image features -> L2 normalise -> five Linear layers, no activations
    with torch.no_grad():
        m = tiny_clip_model
        feats = m.visual_projection(m.vision_model(pixel_values=clip_preprocess(images)).pooler_output)
        x = F.normalize(feats, dim=-1)
        state = head_state_dict()
        for idx in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    torch.testing.assert_close(scores.detach(), x.squeeze(-1), rtol=1e-5, atol=1e-5)


def test_aesthetic_head_errors_name_the_file(tiny_clip_dir, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match=r"bad\.pth.*not an aesthetic-predictor"):
        build_reward("aesthetic", args={"clip_model": str(tiny_clip_dir), "head": str(bad)})
    narrow = tmp_path / "narrow.pth"
    torch.save(head_state_dict(input_dim=512), narrow)
    with pytest.raises(UserError, match=r"512-d.*768-d"):
        build_reward("aesthetic", args={"clip_model": str(tiny_clip_dir), "head": str(narrow)})
    with pytest.raises(UserError, match=r"head file '.*missing\.pth' does not exist"):
        build_reward("aesthetic", args={"clip_model": str(tiny_clip_dir), "head": str(tmp_path / "missing.pth")})


def test_missing_hub_files_say_how_to_get_them(tiny_clip_dir, tiny_head_path):
    with pytest.raises(UserError, match=r"tc-lite-test/no-such-repo.*hf download tc-lite-test/no-such-repo head\.pth"):
        build_reward("aesthetic", args={"clip_model": str(tiny_clip_dir), "head": "tc-lite-test/no-such-repo/head.pth"})
    with pytest.raises(UserError, match=r"'tc-lite-test/no-such-clip'.*hf download tc-lite-test/no-such-clip"):
        build_reward("aesthetic", args={"clip_model": "tc-lite-test/no-such-clip", "head": str(tiny_head_path)})
    with pytest.raises(UserError, match=r"neither an existing local folder nor a hub id"):
        build_reward("clip", args={"model": "./no/such/folder"})


def test_clip_score_is_100_cosine(tiny_clip_dir, tiny_clip_model, images):
    reward = build_reward("clip", args={"model": str(tiny_clip_dir)})
    prompts = ["a red square", "a photo of a cat on a very long prompt " * 20]  # second one gets truncated
    scores = _grad_ok(reward, images, prompts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_clip_dir)
    m = tiny_clip_model
    with torch.no_grad():
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text = m.text_projection(m.text_model(**ids).pooler_output)
        image = m.visual_projection(m.vision_model(pixel_values=clip_preprocess(images)).pooler_output)
        ref = 100 * F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scores.detach(), ref, rtol=1e-4, atol=1e-4)


def test_color_reward_measures_progress_from_grey_to_target():
    reward = build_reward("color", args={"target": [1, 0, 0]})
    red, grey = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)
    red[:, 0] = 1
    assert reward(red, ["x"]).item() == pytest.approx(1.0)
    assert reward(grey, ["x"]).item() == pytest.approx(0.0)
    assert reward(1 - red, ["x"]).item() == pytest.approx(-1.0)  # cyan: the opposite direction
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    score = reward(images, ["x", "y"])
    r, g, b = images.detach().mean(dim=(2, 3)).T
    torch.testing.assert_close(score.detach(), (2 / 3) * (r - g - b + 0.5))
    (grad,) = torch.autograd.grad(score.sum(), images)
    assert (grad[:, 0] > 0).all() and (grad[:, 1:] < 0).all()  # ascent moves pixels toward red


@pytest.mark.parametrize("target", [[1, 0], [2, 0, 0], "red", [float("nan"), 0, 0], [0.5, 0.5, 0.5]])
def test_color_rejects_bad_target(target):
    with pytest.raises(UserError, match=r"reward 'color': target"):
        build_reward("color", args={"target": target})


@pytest.mark.parametrize("clip_first", [True, False])
def test_aesthetic_and_clip_share_one_vision_tower(tiny_clip_dir, tiny_head_path, tiny_clip_model, clip_first):
    def clip():
        return build_reward("clip", args={"model": str(tiny_clip_dir)})

    def aesthetic():
        return build_reward("aesthetic", args={"clip_model": str(tiny_clip_dir), "head": str(tiny_head_path)})

    first, second = (clip(), aesthetic()) if clip_first else (aesthetic(), clip())
    c, a = (first, second) if clip_first else (second, first)
    assert a.net.vision_model is c.model.vision_model and a.net.visual_projection is c.model.visual_projection
    fresh = tiny_clip_model.vision_model.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in c.model.vision_model.state_dict().items())  # the same weights
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # both still compute what they computed alone
        m = tiny_clip_model
        pooled = m.vision_model(pixel_values=clip_preprocess(images)).pooler_output
        ref = F.normalize(m.visual_projection(pooled), dim=-1)
        torch.testing.assert_close(c.image_embeds(images), ref, rtol=1e-5, atol=1e-6)


def test_vision_tower_is_not_shared_across_different_models(tiny_clip_dir, tiny_head_path, tmp_path):
    import shutil

    copy = tmp_path / "other_clip"
    shutil.copytree(tiny_clip_dir, copy)
    c = build_reward("clip", args={"model": str(tiny_clip_dir)})
    a = build_reward("aesthetic", args={"clip_model": str(copy), "head": str(tiny_head_path)})
    assert a.net.vision_model is not c.model.vision_model
