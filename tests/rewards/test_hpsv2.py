"""HPSv2 and OpenCLIP checkpoints: the conversion to transformers against open_clip's own code, and the hpsv2
reward against the official inference pipeline (written out step by step), on tiny random checkpoints saved in the
official format and loaded back through the real loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tc_lite.errors import UserError
from tc_lite.rewards import build_reward
from tc_lite.rewards.openclip import ARCHS, clip_config, convert_state_dict, load_openclip_model, resolve_arch
from tc_lite.rewards.preprocess import CLIP_MEAN, CLIP_STD
from tests.rewards.openclip_ref import TINY_ARCH, load_open_clip, tiny_open_clip

PROMPTS = ["a photo of a red cat &amp; dog", "A Very LONG prompt, with punctuation!! " * 12]  # 2nd is truncated


@pytest.fixture(scope="module")
def open_clip_code():
    return load_open_clip()


@pytest.fixture(scope="module")
def reference(open_clip_code):
    return tiny_open_clip(open_clip_code[0])


@pytest.fixture(scope="module")
def hps_files(reference, tmp_path_factory):
    """A tiny 'HPS_v2.1_compressed.pt' (``{'state_dict': ...}``, as the official file) and its arch JSON."""
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": reference.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    (folder / "tiny-ViT.json").write_text(json.dumps(TINY_ARCH))
    return folder / "HPS_v2.1_compressed.pt", folder / "tiny-ViT.json"


@pytest.fixture(scope="module")
def hps(hps_files):
    checkpoint, arch = hps_files
    return build_reward("hpsv2", args={"checkpoint": str(checkpoint), "arch": str(arch)})


def _pictures() -> list[Image.Image]:
    """A square SD-sized picture and a landscape one (the landscape one gets padded)."""
    out = []
    for w, h, seed in ((512, 512, 0), (300, 200, 1)):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 13.0 + yy / 29.0)], -1)
        noise = rng.random((h, w, 3)) * 0.3
        out.append(Image.fromarray(((smooth * 0.7 + noise) * 255).clip(0, 255).astype(np.uint8)))
    return out


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor: HWC uint8 -> CHW float in [0, 1]."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def official_preprocess(img: Image.Image, size: int = 224) -> torch.Tensor:
    """HPSv2's val transform (image_transform(..., resize_longest_max=True)), step by step:
    ToTensor -> ResizeMaxSize(size, fill=0) -> Normalize(OpenAI mean, std). ResizeMaxSize on a tensor: scale =
    size / max(h, w); if scale != 1: torchvision resize to (round(h*scale), round(w*scale)), bicubic, which for a
    float tensor is F.interpolate(bicubic, align_corners=False, antialias=True) without clamping; then pad
    [left=pad_w//2, top=pad_h//2, right=pad_w-pad_w//2, bottom=pad_h-pad_h//2] with 0."""
    x = _to_tensor(img)
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def test_conversion_matches_open_clip(open_clip_code, reference):
    oc_model, oc_tokenizer = open_clip_code
    for quick_gelu in (False, True):
        arch = {**TINY_ARCH, "quick_gelu": quick_gelu}
        ref = reference if not quick_gelu else tiny_open_clip(oc_model, arch)
        hf = load_openclip_model(ref.state_dict(), arch, reward="test", source="memory")
        pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        ids = oc_tokenizer.SimpleTokenizer()(PROMPTS)
        with torch.no_grad():
            image = hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output)
            text = hf.text_projection(hf.text_model(input_ids=ids).pooler_output)
            torch.testing.assert_close(image, ref.encode_image(pixels), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(text, ref.encode_text(ids), rtol=1e-5, atol=1e-5)
        assert float(hf.logit_scale) == pytest.approx(4.0)


def test_tokenizer_matches_open_clip(open_clip_code):
    from tc_lite.rewards.clip_score import load_tokenizer, open_clip_clean

    ours = load_tokenizer("open_clip", reward="test")
    prompts = [*PROMPTS, "café naïve — emoji 🐱 &amp; <b>tags</b>", "  spaces   and\ttabs "]
    official = open_clip_code[1].SimpleTokenizer()(prompts)
    cleaned = [open_clip_clean(p) for p in prompts]  # what the OpenCLIP-tokenized rewards feed their tokenizer
    mine = ours(cleaned, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    for a, b in zip(official, mine):
        end = int(a.argmax()) + 1  # up to the end-of-text token; open_clip pads with 0, the HF tokenizer with eot
        assert torch.equal(a[:end], b[:end]) and int(b[:end].argmax()) == end - 1


def test_hpsv2_matches_official_inference(open_clip_code, reference, hps):
    """The number the official pipeline prints for the same image and prompt, within 1e-5 (float32)."""
    tokenizer = open_clip_code[1].SimpleTokenizer()
    pictures = _pictures()
    with torch.no_grad():
        official = []
        for img, prompt in zip(pictures, PROMPTS):
            out = reference(official_preprocess(img)[None], tokenizer([prompt]))  # CLIP.forward: normalised
            official.append(float((out[0] @ out[1].T).diagonal()[0]))
    for img, prompt, expected in zip(pictures, PROMPTS, official):
        image = _to_tensor(img)[None].requires_grad_(True)
        score = hps(image, [prompt])
        assert float(score.detach()) == pytest.approx(expected, abs=1e-5)
        (grad,) = torch.autograd.grad(score.sum(), image)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        with torch.no_grad():
            assert torch.equal(hps(image, [prompt]), score.detach())  # deterministic


def test_hpsv2_batch_scores_each_pair(hps):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = hps(images, PROMPTS)
        one_by_one = torch.cat([hps(images[i : i + 1], [p]) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(both, one_by_one, rtol=1e-5, atol=1e-6)
    assert both.shape == (2,) and (both.abs() <= 1).all()  # a cosine, no scale


def test_openclip_checkpoint_as_clip_reward(hps_files, reference, open_clip_code):
    """`clip` takes an OpenCLIP file too (what TextCraftor used): 100 x cosine, OpenCLIP's crop preprocessing."""
    checkpoint, arch = hps_files
    reward = build_reward("clip", args={"model": str(checkpoint), "arch": str(arch)})
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    from tc_lite.rewards.preprocess import clip_preprocess

    with torch.no_grad():
        ids = open_clip_code[1].SimpleTokenizer()(PROMPTS)
        image = F.normalize(reference.encode_image(clip_preprocess(images)), dim=-1)
        text = F.normalize(reference.encode_text(ids), dim=-1)
        torch.testing.assert_close(reward(images, PROMPTS), 100 * (image * text).sum(-1), rtol=1e-4, atol=1e-4)


def test_arch_specs(tmp_path):
    assert resolve_arch("ViT-H-14", reward="t") == ARCHS["ViT-H-14"]
    assert resolve_arch("ViT-L-14-quickgelu", reward="t")["quick_gelu"] is True
    wrapped = tmp_path / "open_clip_config.json"  # the hub repos' file wraps the model config in model_cfg
    wrapped.write_text(json.dumps({"model_cfg": TINY_ARCH, "preprocess_cfg": {}}))
    assert resolve_arch(str(wrapped), reward="t") == TINY_ARCH
    config = clip_config(ARCHS["ViT-H-14"])  # the published PickScore_v1 / laion ViT-H-14 transformers config
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.num_hidden_layers, v.patch_size) == (
        1280, 5120, 16, 32, 14)
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_hidden_layers) == (1024, 4096, 16, 24)
    assert config.projection_dim == 1024 and v.hidden_act == t.hidden_act == "gelu" and t.eos_token_id == 2
    g = clip_config(ARCHS["ViT-g-14"]).vision_config
    assert (g.hidden_size, g.intermediate_size, g.num_attention_heads) == (1408, 6144, 16)


@pytest.mark.parametrize(
    ("arch", "pattern"),
    [
        ("ViT-Q-99", r"unknown OpenCLIP arch 'ViT-Q-99'. Known: .*ViT-H-14"),
        ({**TINY_ARCH, "vision_cfg": {**TINY_ARCH["vision_cfg"], "attentional_pool": True}},
         r"uses \['vision_cfg.attentional_pool'\], which the OpenCLIP -> transformers conversion does not support"),
        ({"embed_dim": 8}, r"must have embed_dim, vision_cfg and text_cfg"),
    ],
)
def test_bad_arch(arch, pattern):
    with pytest.raises(UserError, match=pattern):
        resolve_arch(arch, reward="hpsv2")


def test_wrong_checkpoint_contents(reference):
    state = reference.state_dict()
    with pytest.raises(UserError, match=r"holds the tensor 'visual.attn_pool.query'.*right file"):
        load_openclip_model({**state, "visual.attn_pool.query": torch.zeros(1)}, TINY_ARCH, reward="hpsv2", source="f")
    missing = {k: v for k, v in state.items() if k != "ln_final.weight"}
    with pytest.raises(UserError, match=r"does not match the OpenCLIP architecture \(missing \['text_model.final"):
        load_openclip_model(missing, TINY_ARCH, reward="hpsv2", source="f")
    bigger = {**TINY_ARCH, "embed_dim": 32}
    with pytest.raises(UserError, match=r"wrong shapes \['text_projection.weight: file \(24, 32\) vs arch \(32, 32\)"):
        load_openclip_model(state, bigger, reward="hpsv2", source="f")
    assert "attn_mask" not in convert_state_dict({"attn_mask": torch.zeros(2, 2)})


def test_hpsv2_argument_errors(hps_files, tmp_path, monkeypatch):
    checkpoint, arch = hps_files
    with pytest.raises(UserError, match=r"reward 'hpsv2': version must be one of \['v2.0', 'v2.1'\], got 'v3'"):
        build_reward("hpsv2", args={"version": "v3"})
    with pytest.raises(UserError, match=r"reward 'hpsv2': checkpoint file '.*nowhere\.pt' does not exist"):
        build_reward("hpsv2", args={"checkpoint": str(tmp_path / "nowhere.pt"), "arch": str(arch)})
    pickle_with_code = tmp_path / "code.pt"
    torch.save({"state_dict": {}, "args": _NotATensor()}, pickle_with_code)
    with pytest.raises(UserError, match=r"cannot read checkpoint file '.*code\.pt'.*tensors only"):
        build_reward("hpsv2", args={"checkpoint": str(pickle_with_code), "arch": str(arch)})
    with pytest.raises(UserError, match=r"hub repo 'xswu/HPSv2' file 'HPS_v2_compressed.pt'.*hf download xswu/HPSv2"):
        build_reward("hpsv2", args={"version": "v2.0", "arch": str(arch)})  # offline and not cached

    import tc_lite.models.tokenizer as tok

    def no_open_clip():
        raise UserError("The CLIP tokenizer vocabulary comes from the open_clip_torch package, which is not installed.")

    monkeypatch.setattr(tok, "clip_tokenizer", no_open_clip)
    with pytest.raises(UserError, match=r"'hpsv2': tokenizer 'open_clip' needs .*--no-deps open_clip_torch"):
        build_reward("hpsv2", args={"checkpoint": str(checkpoint), "arch": str(arch)})


class _NotATensor:
    """Stands for the non-tensor objects some training checkpoints pickle (weights_only loading refuses them)."""


def test_hpsv2_in_the_compute_dtype(hps_files, hps):
    """In a mix the model is cast to the compute dtype (bf16 here; fp16 on GPUs) and the score stays close."""
    from tc_lite.rewards import RewardMix

    checkpoint, arch = hps_files
    fresh = build_reward("hpsv2", args={"checkpoint": str(checkpoint), "arch": str(arch)})
    mix = RewardMix([("hpsv2", fresh, 1.0)], "cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in fresh.model.parameters()} == {torch.bfloat16}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    total, parts = mix(images, PROMPTS)
    assert parts["hpsv2"].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(parts["hpsv2"], hps(images, PROMPTS), rtol=0, atol=0.01)  # measured 0.0016
    total.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
