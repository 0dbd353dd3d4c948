"""The built-in rewards with random weights of the right architecture: nothing downloaded, the memory and time of
the real ones (scores mean nothing).

`RandomReward(kind=...)` is a custom reward factory (`tc_lite.bench.random_rewards:RandomReward`) that a config
can name; `random_rewards(cfg)` rewrites every active built-in reward term of a config to it. Each kind is the
built-in class with its model swapped for a random one, so preprocessing, dtype handling, offloading and the
in-mix backward are the built-in code:

| kind | model (as `tc_lite.memory.architectures` describes it) |
|---|---|
| aesthetic | CLIP ViT-L/14 vision tower + projection + the v2 MLP head (tower shared with `clip`, as the real ones) |
| clip | CLIP ViT-L/14, both towers |
| pickscore | CLIP ViT-H/14 (PickScore_v1's shape), logit scale from the config default |
| hpsv2, hpsv21 | CLIP ViT-H/14 in transformers' layout (what HPSv2's OpenCLIP file converts to), pad preprocessing |

The models are initialised on the GPU when there is one (a ViT-H takes ~20 s to initialise on 2 CPU cores, a
fraction of a second on a GPU) and then moved to the CPU, where a built reward's weights start out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tc_lite.memory.architectures import CLIP_ARCHITECTURES

FACTORY = "tc_lite.bench.random_rewards:RandomReward"
KINDS = {"aesthetic": "ViT-L/14", "clip": "ViT-L/14", "pickscore": "ViT-H/14", "hpsv2": "ViT-H/14",
         "hpsv21": "ViT-H/14"}
_SHARE_KEY = "tc-lite-random/{arch}/{width}"  # `loading.share_vision` key: aesthetic and clip share one tower


def random_clip(arch: str, seed: int = 0) -> Any:
    """A transformers `CLIPModel` of `arch` ("ViT-L/14" | "ViT-H/14") with random weights, on the CPU, frozen."""
    from transformers import CLIPConfig, CLIPModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = CLIPModel(CLIPConfig(**CLIP_ARCHITECTURES[arch]))
    model = model.to("cpu").eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def _shared_clip(arch: str) -> Any:
    """A random CLIP whose vision tower is the one another live random reward of `arch` holds (as the real
    `aesthetic` and `clip` share OpenAI's ViT-L/14 tower), else its own, registered for the next one."""
    from tc_lite.rewards.loading import share_vision

    width = CLIP_ARCHITECTURES[arch]["vision_config"]["hidden_size"]
    return share_vision(_SHARE_KEY.format(arch=arch, width=width), random_clip(arch))


def RandomReward(kind: str = "aesthetic", **ignored: Any) -> Any:  # noqa: N802 -- named like the classes it stands for
    """The built-in reward `kind` with random weights (its own args, e.g. HPSv2's version, are accepted and ignored)."""
    from tc_lite.models import clip_tokenizer
    from tc_lite.rewards.aesthetic import AestheticHead, AestheticNet, AestheticReward
    from tc_lite.rewards.clip_score import ClipScoreReward
    from tc_lite.rewards.hpsv2 import HPSv2Reward
    from tc_lite.rewards.pickscore import PickScoreReward

    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"RandomReward: kind must be one of {sorted(KINDS)}, got {kind!r}")
    arch = KINDS[kind]
    if kind == "aesthetic":
        reward = AestheticReward.__new__(AestheticReward)
        clip = _shared_clip(arch)
        reward.image_size = int(clip.config.vision_config.image_size)
        head = AestheticHead(int(clip.visual_projection.out_features))
        reward.net = AestheticNet(clip.vision_model, clip.visual_projection, head).eval().requires_grad_(False)
        return reward
    cls = {"clip": ClipScoreReward, "pickscore": PickScoreReward, "hpsv2": HPSv2Reward, "hpsv21": HPSv2Reward}[kind]
    reward = cls.__new__(cls)
    reward.tokenizer = clip_tokenizer()
    clip = _shared_clip(arch) if kind == "clip" else random_clip(arch)
    reward._finish_model(clip)
    if kind == "pickscore":
        reward.image_size = reward.crop_size = 224
        reward.scale = float(clip.logit_scale.detach().float().exp())
    return reward


def random_rewards(cfg: Any) -> Any:
    """`cfg` with every active built-in reward that has weights replaced by its `RandomReward`."""
    terms = {}
    for label, term in cfg.rewards.terms.items():
        kind = (term.type or label).strip().lower()
        if term.weight != 0 and kind in KINDS:
            term = dataclasses.replace(term, type=FACTORY, args={**term.args, "kind": kind})
        terms[label] = term
    return dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, terms=terms))
