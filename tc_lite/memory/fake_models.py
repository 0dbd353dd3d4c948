"""The step's modules as fake tensors, from configs, no weights: the family's components, the adapters on them and
CLIP-tower rewards built on 'meta' (`_MetaModels`), swapped for fake tensors on a device (`_materialize`), and the
stand-ins the estimator needs where the real objects cannot run on fake tensors (tokenizer, scheduler, prefix
cache, bitsandbytes AdamW8bit state, accelerate's sequential offload, custom rewards). Used by `estimate.py`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tc_lite.config import Config
from tc_lite.memory.architectures import (
    CLIP_ARCHITECTURES,
    Architecture,
    RewardShape,
    reward_shape,
)
from tc_lite.memory.tracker import MemoryTracker

# --------------------------------------------------------------------------------------------------- stand-ins


class _StubTokenizer:
    """Token ids of the right shape; the values never matter for memory."""

    model_max_length = 77

    def __call__(self, prompts: list[str], **_: Any) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.zeros((len(prompts), self.model_max_length), dtype=torch.long))

class _ClipReward(nn.Module):
    """A CLIP-tower reward of the right shape: aesthetic (vision + MLP head), CLIP score / PickScore / HPSv2 (both
    towers, image side with gradients, text side without), with the real differentiable preprocessing."""

    def __init__(self, shape: RewardShape, shared: dict[str, tuple[nn.Module, nn.Module]] | None = None):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        from tc_lite.rewards.aesthetic import AestheticHead

        arch = CLIP_ARCHITECTURES[shape.clip or "ViT-L/14"]
        self.shape = shape
        self.name = shape.label
        clip = CLIPModel(CLIPConfig(**copy.deepcopy(arch)))
        if shared is not None and shape.share_key is not None:
            # aesthetic and clip built from the same CLIP hold one vision tower (rewards.loading.share_vision)
            clip.vision_model, clip.visual_projection = shared.setdefault(
                shape.share_key, (clip.vision_model, clip.visual_projection))
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection
        if shape.text_tower:
            self.text_model, self.text_projection = clip.text_model, clip.text_projection
        self.head = AestheticHead(arch["projection_dim"]) if shape.head else None
        self.image_size = arch["vision_config"]["image_size"]

    def module(self) -> nn.Module:
        return self

    def to(self, *args: Any, **kwargs: Any) -> _ClipReward:
        return self  # placed once by the estimator (device or host); RewardMix's placement must not move it

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import torch.nn.functional as F

        from tc_lite.rewards.preprocess import clip_preprocess

        dtype = self.visual_projection.weight.dtype
        pixels = clip_preprocess(images, self.image_size, mode=self.shape.preprocess).to(dtype)
        emb = F.normalize(self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output).float(), dim=-1)
        if self.head is not None:
            return self.head(emb.to(dtype)).squeeze(-1).float()
        with torch.no_grad():
            ids = torch.zeros((len(prompts), 77), dtype=torch.long, device=images.device)
            text = F.normalize(self.text_projection(self.text_model(input_ids=ids).pooler_output).float(), dim=-1)
        return 100.0 * (emb * text).sum(-1)


def _stream_layer_by_layer(net: nn.Module, tracker: MemoryTracker) -> None:
    """`rewards.offload=sequential` as `offload.attach_sequential` sets it up, with plain module hooks in place of
    accelerate's (which re-wrap parameters in a way fake tensors do not allow): each submodule's own weights are
    copied from the host ('meta') to the device for its forward and dropped after it, and every transformer layer
    is checkpointed (`offload.checkpoint_layers`, the same code), so only what autograd keeps stays. A tower
    shared by two rewards is hooked once."""
    from tc_lite.rewards.offload import checkpoint_layers

    def fetch(mod: nn.Module, args: Any) -> None:
        for name, home in mod._tc_lite_home.items():
            copy = nn.Parameter(home.detach().to("cpu"), requires_grad=False)
            tracker.tag(copy, "parameters")
            mod._parameters[name] = copy

    def drop(mod: nn.Module, args: Any, out: Any) -> None:
        mod._parameters.update(mod._tc_lite_home)

    for sub in net.modules():
        for name, buf in list(sub._buffers.items()):  # buffers (position ids) live on the device, as with accelerate
            if buf is not None and buf.device.type == "meta":
                sub._buffers[name] = buf.to("cpu")
        own = {n: t for n, t in sub._parameters.items() if t is not None and t.device.type == "meta"}
        if own and not hasattr(sub, "_tc_lite_home"):
            sub._tc_lite_home = own
            sub.register_forward_pre_hook(fetch)
            sub.register_forward_hook(drop)
    checkpoint_layers(net)


class _Bnb8bitStateStandIn(torch.optim.Optimizer):
    """bitsandbytes AdamW8bit's state, allocated exactly as `Optimizer2State.init_state` does (uint8 moments with
    fp32 absmax per 256-value block for tensors of >= 4096 values, fp32 moments below that, two shared 256-entry
    quantisation maps); its fused update allocates nothing else. bitsandbytes kernels cannot run on fake tensors."""

    def __init__(self, params: list[nn.Parameter], min_8bit_size: int = 4096):
        super().__init__(params, {"min_8bit_size": min_8bit_size, "lr": 0.0})
        self._qmaps: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p in self.state:
                    continue
                state = self.state[p]
                if p.numel() < group["min_8bit_size"]:
                    state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                    state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    continue
                if self._qmaps is None:
                    self._qmaps = (torch.zeros(256, device=p.device), torch.zeros(256, device=p.device))
                blocks = -(-p.numel() // 256)
                state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                state["qmap1"], state["qmap2"] = self._qmaps
                state["absmax1"] = torch.zeros(blocks, device=p.device)
                state["absmax2"] = torch.zeros(blocks, device=p.device)


def bnb_adamw8bit_state_bytes(params: list[nn.Parameter], min_8bit_size: int = 4096) -> int:
    """Exact device bytes of bitsandbytes AdamW8bit state for `params` (see `_Bnb8bitStateStandIn`)."""
    total, qmaps = 0, False
    for p in params:
        n = p.numel()
        if n < min_8bit_size:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // 256)
            qmaps = True
    return total + (2 * 256 * 4 if qmaps else 0)


class _ZeroReward:
    """A custom reward the estimator cannot see into: scores 0, differentiably, with no memory of its own."""

    name = "custom"

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3)) * 0.0

    def module(self) -> None:
        return None

    def to(self, *args: Any, **kwargs: Any) -> _ZeroReward:
        return self


# --------------------------------------------------------------------------------------------------- building


def _materialize(module: nn.Module, dtype: torch.dtype, device: str, memo: dict[int, Any]) -> nn.Module:
    """Replace meta parameters/buffers by fake ones on `device`: frozen floats in `dtype`, trainable ones in fp32
    (what `freeze_and_cast` and `add_lora` leave behind). Tied and shared tensors stay tied; a tensor already
    materialized (a module shared by two rewards) is left alone. `memo` keeps the originals alive, so an `id` is
    never reused for another tensor while the memo lives."""
    done = {id(new) for _, new in memo.values()}
    for sub in module.modules():
        for store, is_param in ((sub._parameters, True), (sub._buffers, False)):
            for key, t in list(store.items()):
                if t is None or id(t) in done:
                    continue
                if id(t) not in memo:
                    trainable = is_param and t.requires_grad
                    dt = torch.float32 if trainable else (dtype if t.is_floating_point() else t.dtype)
                    new = torch.empty(t.shape, dtype=dt, device=device)
                    memo[id(t)] = (t, nn.Parameter(new, requires_grad=trainable) if is_param else new)
                store[key] = memo[id(t)][1]
                done.add(id(store[key]))
    return module


def _nbytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


def _module_bytes(module: nn.Module) -> int:
    return _nbytes([*module.parameters(), *module.buffers()])


@dataclass
class _Target:
    """The device the estimate is for, as the run would resolve it."""

    cuda: bool
    precision: str  # fp16 | bf16 | fp32
    dtype: torch.dtype

    @classmethod
    def of(cls, cfg: Config) -> _Target:
        cuda = cfg.memory.device != "cpu"
        name = cfg.memory.precision
        if name == "auto":
            name = "fp16" if cuda else "fp32"  # same bytes as bf16, but for a VAE that fp16 upcasts (an upper bound)
        return cls(cuda, name, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name])


@dataclass
class _MetaModels:
    """The step's modules on 'meta', built and wired as `Recipe.setup` builds them -- the family's components, the
    adapters `build_adapters` applies, the rewards -- before any fake tensor exists (module dtype conversions on
    fake parameters are not possible)."""

    family: Any
    components: Any
    adapters: Any
    rewards: list[tuple[str, Any, float]]
    notes: list[str]

    @classmethod
    def build(cls, cfg: Config, family: Any, arch: Architecture) -> _MetaModels:
        from tc_lite.adapters import build_adapters
        from tc_lite.decode import configure_vae

        notes: list[str] = []
        with torch.device("meta"):
            comps = family.meta_components(arch)
            adapters = build_adapters(cfg, family, comps)
            rewards = cls._rewards(cfg, notes)
        configure_vae(comps.vae, cfg.memory.checkpoint_vae)
        if cfg.memory.attention == "xformers":
            notes.append("memory.attention=xformers is estimated as PyTorch SDPA (same O(N) memory)")
        return cls(family, comps, adapters, rewards, notes)

    @staticmethod
    def _rewards(cfg: Config, notes: list[str]) -> list[tuple[str, Any, float]]:
        from tc_lite.rewards.synthetic import ColorReward

        entries: list[tuple[str, Any, float]] = []
        shared: dict[str, tuple[nn.Module, nn.Module]] = {}
        for label, term in cfg.rewards.terms.items():
            if term.weight == 0:
                continue
            shape = reward_shape(label, term)
            if shape is None:
                notes.append(f"reward '{label}' ({term.type}) is custom: its memory is not included")
                entries.append((label, _ZeroReward(), term.weight))
            elif shape.clip is None:
                entries.append((label, ColorReward(), term.weight))
            else:
                entries.append((label, _ClipReward(shape, shared).requires_grad_(False), term.weight))
        return entries


class ShapeScheduler:
    """DDIM/Euler-shaped arithmetic with Python-float coefficients (see the module docstring)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.init_noise_sigma = 1.0 if kind == "ddim" else 14.6
        self.timesteps: list[int] = []

    def set_timesteps(self, n: int, device: Any = None) -> None:
        self.timesteps = [999 - i * (1000 // n) for i in range(n)]

    def set_begin_index(self, index: int) -> None:
        pass

    def scale_model_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return x if self.kind == "ddim" else x / 2.0

    def step(self, eps: torch.Tensor, t: Any, latents: torch.Tensor, eta: float = 0.0, generator: Any = None,
             return_dict: bool = False) -> tuple[torch.Tensor]:
        if self.kind == "ddim":
            x0 = (latents - 0.5 * eps) / 0.8
            return (0.9 * x0 + 0.4 * eps,)
        return (latents + 0.1 * eps,)  # Euler: sample + dt * derivative (eps-parameterised)


class _PhasedRewards:
    """The reward mix, entered as the 'reward' phase. The gradient reaching the images marks the start of the
    backward through the decoder (and, for the UNet hook, that UNet calls from now on are recomputations)."""

    def __init__(self, mix: Any, tracker: MemoryTracker):
        self.mix, self.tracker = mix, tracker
        self.entries = mix.entries
        self.on_backward: Callable[[], None] = lambda: None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> Any:
        self.tracker.enter_phase("reward")
        if images.requires_grad:
            images.register_hook(self._backward_starts)
        return self.mix(images, prompts)

    def _backward_starts(self, grad: torch.Tensor) -> None:
        self.on_backward()
        self.tracker.enter_phase("decode backward")


class _ShapePrefix:
    """Stands in for `PrefixCache` as the step's latent source: the cached fp16 latent, read on the host and moved
    to the device (which of a prompt's noises a step draws does not change memory)."""

    def __init__(self, start: int, channels: int, vae: nn.Module, s: Any):
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        self.start, self.shape = start, (int(channels), s.height // f, s.width // f)

    def starting_latents(self, prompts: list[str], gen: Any, grad_steps: int) -> tuple[torch.Tensor, int]:
        host = torch.empty((len(prompts), *self.shape), dtype=torch.float16, device="meta")
        return host.to("cpu").float(), self.start
