"""Differentiable rewards: what the text encoder is trained to increase.

The reward contract
-------------------
A reward is any callable ``reward(images, prompts) -> Tensor[B]``:

* ``images``: float tensor ``[B, 3, H, W]`` with values in [0, 1], carrying gradient (any H, W; each reward
  resizes for its own model);
* ``prompts``: list of B strings, the prompt each image was generated from;
* returns one finite score per image, **higher is better**, and must be **differentiable w.r.t. images**
  (no ``.item()``, ``.detach()`` or numpy on the path).

Optionally a reward exposes ``module()`` returning the frozen ``nn.Module`` that holds its weights (an
``nn.Module`` reward is its own module), so the mix can keep it on the CPU except while it scores
(``offload="cpu"``). Subclass ``Reward`` for a ready-made ``name``/``module()``/``to()``; its module is then also
cast to the compute dtype (fp16/bf16), so cast the incoming float32 images to the module's dtype. A plain
function or object works too; its module is moved but keeps its own dtype.

Built-in rewards (``build_reward(name, args=..., target=...)``), each returning the number its authors publish:

* ``aesthetic``: LAION aesthetic predictor v2, ~1-10; args ``clip_model``, ``head``;
* ``clip``: 100 x CLIP cosine similarity to the prompt, ~15-35; args ``model`` (transformers CLIP, or an OpenCLIP
  checkpoint file with ``arch``), ``arch``, ``tokenizer``;
* ``pickscore``: PickScore_v1, ``logit_scale.exp() * cos``, ~17-23; args ``model``, ``processor``;
* ``hpsv2``: HPSv2 / HPSv2.1 cosine, ~0.25-0.30; args ``version`` (v2.0 | v2.1), ``checkpoint``, ``tokenizer``,
  ``arch`` (OpenCLIP checkpoints converted to transformers by ``tc_lite.rewards.openclip``);
* ``color``: synthetic, weight-free, for offline demos; arg ``target``: [r, g, b].

Custom rewards: ``"package.module:ClassName"``, constructed with the reward's ``args`` as keyword arguments.
``target=`` caps a reward at that value (``HingedReward``: no reward and no gradient above it). The scalings of
TextCraftor's code (CLIP x100 built in; aesthetic x3, HPS x100 in the weights) are in docs/rewards.md.

``RewardMix`` combines rewards into ``total = sum(weight * reward)`` and returns each part for logging; offload
``cpu`` | ``none`` | ``sequential`` (layer by layer, accelerate hooks).
"""

from tc_lite.rewards.base import HingedReward, Reward, RewardFn
from tc_lite.rewards.mix import RewardMix
from tc_lite.rewards.offload import on_device
from tc_lite.rewards.preprocess import clip_preprocess
from tc_lite.rewards.registry import build_reward, known_rewards

__all__ = [
    "HingedReward",
    "Reward",
    "RewardFn",
    "RewardMix",
    "build_reward",
    "clip_preprocess",
    "known_rewards",
    "on_device",
]
