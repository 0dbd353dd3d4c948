"""A peft LoRA on the UNet's attention and feed-forward projections, and its kohya names.

The UNet counterpart of `tc_lite.lora` (same adapter name, same fp32-on-a-half-base rule, same "disable instead of
a second copy" trick). What differs is naming: kohya sd-scripts names UNet modules by their path in the model it
trains, with "." -> "_":

- SD1.x: diffusers' own paths (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`);
- SDXL: the original (SGM) block paths (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`), because
  sd-scripts trains SDXL on its own copy of the original UNet.

A1111, ComfyUI and diffusers map exactly these names (DESIGN §7). SD1's `proj_in`/`proj_out` are 1×1 convolutions
(`use_linear_projection: false`); their LoRA is a pair of 1×1 convolutions, stored 4-D as kohya stores them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from tc_lite.config.schema import UNET_TARGETS
from tc_lite.errors import UserError
from tc_lite.lora import ADAPTER_NAME, _inject, lora_disabled, lora_layers

__all__ = ["KOHYA_UNET_PREFIX", "UNET_TARGETS", "UNetLoRAModule", "add_unet_lora", "kohya_unet_module_name",
           "kohya_unet_names", "load_unet_lora", "resolve_unet_lora", "split_unet_lora", "unet_kohya_state_dict",
           "unet_lora_disabled", "unet_lora_groups", "unet_lora_modules", "unet_lora_parameters"]

KOHYA_UNET_PREFIX = "lora_unet"
_IN_TRANSFORMER = re.compile(r"(?:^|\.)attentions\.\d+\.")  # only the cross-attention transformers' modules


def unet_lora_modules(unet: torch.nn.Module, targets: Sequence[str] = UNET_TARGETS) -> list[str]:
    """Paths of the UNet modules a LoRA on `targets` adapts: inside the transformer blocks only (the UNet's time
    embedding and ResNets have no such names, but a custom UNet might)."""
    return [name for name, mod in unet.named_modules()
            if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) and _IN_TRANSFORMER.search(name)
            and any(name == t or name.endswith("." + t) for t in targets)]


def add_unet_lora(unet: torch.nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                  targets: Sequence[str] = UNET_TARGETS, init_seed: int | None = None,
                  adapter: str = ADAPTER_NAME) -> torch.nn.Module:
    """Inject a LoRA into `unet` in place; afterwards only its fp32 LoRA weights require grad, and `lora_B` starts
    at zero, so the UNet computes exactly as before until training moves it."""
    from tc_lite.config.checks import unet_target_problems

    if problems := unet_target_problems(list(targets)):
        raise UserError(problems[0])
    if lora_layers(unet, adapter):
        raise ValueError(f"the UNet already has a LoRA adapter {adapter!r}; add it once")
    modules = unet_lora_modules(unet, targets)
    if not modules:
        raise UserError(f"unet.targets {list(targets)}: no such module in this UNet's transformer blocks")
    config = LoraConfig(r=rank, lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=modules,
                        bias="none", init_lora_weights=True)
    return _inject(unet, config, adapter, init_seed)


def unet_lora_parameters(unet: torch.nn.Module, adapter: str = ADAPTER_NAME) -> list[torch.nn.Parameter]:
    """The LoRA weights (A then B of each module, in module order), whatever their `requires_grad`."""
    return [p for _, layer in lora_layers(unet, adapter)
            for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)]


def unet_lora_disabled(unet: torch.nn.Module, adapter: str = ADAPTER_NAME) -> AbstractContextManager[None]:
    """The base UNet for the duration (see `tc_lite.lora.lora_disabled`, including its checkpointing caveat)."""
    return lora_disabled(unet, adapter)


# --------------------------------------------------------------------------------------------------- kohya names


def kohya_unet_module_name(module_path: str, base_model_version: str, config: Mapping[str, Any]) -> str:
    """The kohya module name of a diffusers UNet module path, for the family kohya calls `base_model_version`
    (`sd_v1`: diffusers paths; `sdxl_base_v1-0`: SGM paths through `tc_lite.models.ldm_keys.unet_key`)."""
    path = module_path.removeprefix("base_model.model.")
    if base_model_version == "sdxl_base_v1-0":
        from tc_lite.models.ldm_keys import unet_key

        path = unet_key(path + ".weight", config).removesuffix(".weight")
    elif base_model_version != "sd_v1":
        raise UserError(f"UNet LoRA names for {base_model_version!r} are not known to tc-lite (sd_v1, sdxl_base_v1-0)")
    return f"{KOHYA_UNET_PREFIX}_{path.replace('.', '_')}"


def unet_kohya_state_dict(unet: torch.nn.Module, base_model_version: str,
                          adapter: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The UNet LoRA as kohya tensors: `.lora_down.weight` (A: [r, in] or [r, in, 1, 1]), `.lora_up.weight` (B),
    `.alpha` (the real alpha, an fp32 scalar); detached fp32 CPU copies in module order."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(unet, adapter):
        kname = kohya_unet_module_name(name, base_model_version, unet.config)
        if f"{kname}.alpha" in out:
            raise ValueError(f"two UNet modules map to {kname!r}")
        out[f"{kname}.lora_down.weight"] = layer.lora_A[adapter].weight.detach().to("cpu", torch.float32).clone()
        out[f"{kname}.lora_up.weight"] = layer.lora_B[adapter].weight.detach().to("cpu", torch.float32).clone()
        out[f"{kname}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]), dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------------- reading back

_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


class UNetLoRAModule(NamedTuple):
    """One UNet module of a kohya file, resolved against a UNet: where it goes and what it holds."""

    path: str  # the diffusers module path (`down_blocks.1.attentions.0.proj_in`)
    name: str  # its kohya name in the file
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float  # the file's alpha (rank when the file has none, as A1111/ComfyUI/diffusers read it)


def split_unet_lora(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(text-encoder part, UNet part) of a kohya state dict: every `lora_unet_` key is the UNet's; the rest is left
    to the text-encoder readers, which name any key that is neither."""
    te: dict[str, torch.Tensor] = {}
    unet: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        (unet if key.startswith(KOHYA_UNET_PREFIX + "_") else te)[key] = value
    return te, unet


def unet_lora_groups(sd: Mapping[str, torch.Tensor], source: str = "LoRA") -> dict[str, dict[str, torch.Tensor]]:
    """kohya module name -> {lora_down.weight, lora_up.weight[, alpha]} of a kohya UNet LoRA; UserError for keys of
    other network kinds (LoHa, LoKr, DoRA scales...), which tc-lite does not load, and for half-written modules."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        module, _, part = key.partition(".")
        if not module.startswith(KOHYA_UNET_PREFIX + "_") or part not in _PARTS:
            unknown.append(key)
        else:
            groups.setdefault(module, {})[part] = value
    if unknown:
        raise UserError(f"{source}: {len(unknown)} key(s) are not kohya UNet LoRA keys (first: {unknown[0]}); tc-lite "
                        f"loads '{KOHYA_UNET_PREFIX}_<module>.(lora_down.weight|lora_up.weight|alpha)' (plain LoRA)")
    if not groups:
        raise UserError(f"{source}: no UNet LoRA weights (no {KOHYA_UNET_PREFIX}_ keys)")
    half = sorted(m for m, parts in groups.items() if not {"lora_down.weight", "lora_up.weight"} <= parts.keys())
    if half:
        raise UserError(f"{source}: lora_down/lora_up missing for {half[0]}; the file is truncated or not a LoRA")
    return groups


def kohya_unet_names(unet: torch.nn.Module) -> dict[str, str]:
    """kohya name -> diffusers path of every linear and convolution of `unet`, under both names kohya-style files
    use for it: the diffusers path (kohya's SD1 names; diffusers' own kohya converter writes SDXL so too) and the
    SGM path (kohya's SDXL names). Computed forward with `kohya_unet_module_name`, so it inverts what we write."""
    out: dict[str, str] = {}
    for path, mod in unet.named_modules():
        if not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) or ".lora_" in path:
            continue
        path = path.removesuffix(".base_layer")  # a module a LoRA wraps goes by the wrapper's path
        for version in ("sd_v1", "sdxl_base_v1-0"):
            try:
                name = kohya_unet_module_name(path, version, unet.config)
            except KeyError:  # no SGM name (a module kind SD1.x and SDXL do not have)
                continue
            if out.setdefault(name, path) != path:
                raise ValueError(f"UNet modules {out[name]!r} and {path!r} both have the kohya name {name!r}")
    return out


def resolve_unet_lora(unet: torch.nn.Module, sd: Mapping[str, torch.Tensor],
                      source: str = "LoRA") -> list[UNetLoRAModule]:
    """The UNet part of a kohya state dict (`lora_unet_` keys only), each module matched to its place in `unet` and
    checked against its shape; UserError naming the first module of another model."""
    groups = unet_lora_groups(sd, source)
    names = kohya_unet_names(unet)
    unknown = sorted(set(groups) - set(names))
    if unknown:
        raise UserError(f"{source}: {len(unknown)} UNet module(s) are not in this UNet (first: {unknown[0]}); the "
                        "LoRA was made for another base model (SD1.x or SDXL): use the base it was trained on")
    out = []
    for name in sorted(groups, key=lambda n: names[n]):
        parts, path = groups[name], names[name]
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        base, rank = unet.get_submodule(path), int(down.shape[0])
        base = getattr(base, "base_layer", base)  # a module another adapter already wraps
        kernel = tuple(base.kernel_size) if isinstance(base, torch.nn.Conv2d) else ()
        tail = (1, 1) if kernel else ()
        want_down = (rank, base.weight.shape[1], *kernel)
        want_up = (base.weight.shape[0], rank, *tail)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise UserError(f"{source}: {name} has down {tuple(down.shape)} / up {tuple(up.shape)}, but {path} needs "
                            f"{want_down} / {want_up}; the LoRA was made for another base model")
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        out.append(UNetLoRAModule(path, name, down, up, alpha))
    return out


def load_unet_lora(unet: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, source: str = "LoRA",
                   adapter: str = ADAPTER_NAME) -> list[str]:
    """Inject a LoRA on exactly the UNet modules of a kohya state dict (SD1 or SGM names; the inverse of
    `unet_kohya_state_dict`), with the file's rank and alpha per module, and load its weights; returns the module
    paths. Pass the `lora_unet_` part (`split_unet_lora`). The LoRA weights stay fp32 and frozen.

    The UNet may hold other adapters (a run's own LoRA, other files under other `adapter` names): they keep their
    active state and `requires_grad` (peft's injection would make the new adapter the only active one everywhere
    and freeze the rest), and the new one is active beside them. `unet_lora_disabled` switches off whole layers
    (every adapter on them); to switch one adapter among several, set each layer's active adapters
    (`LoraLayer.set_adapter`, as `tc_lite.unet_mix` does)."""
    if lora_layers(unet, adapter):
        raise ValueError(f"the UNet already has a LoRA adapter {adapter!r}; load into a UNet without one")
    modules = resolve_unet_lora(unet, sd, source)
    ranks = Counter(int(m.down.shape[0]) for m in modules)
    rank = ranks.most_common(1)[0][0]
    config = LoraConfig(r=rank, lora_alpha=float(rank), lora_dropout=0.0, bias="none",
                        target_modules=[m.path for m in modules],
                        rank_pattern={re.escape(m.path): int(m.down.shape[0]) for m in modules
                                      if m.down.shape[0] != rank})
    active = {id(m): list(m.active_adapters) for m in unet.modules() if isinstance(m, LoraLayer)}
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    _inject(unet, config, adapter, init_seed=0)
    for m in unet.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter(active.get(id(m), []) + ([adapter] if adapter in m.lora_A else []))
    for p, flag in flags:
        p.requires_grad_(flag)
    with torch.no_grad():
        for m in modules:
            layer = unet.get_submodule(m.path)
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            a.copy_(m.down.to(a.dtype))
            b.copy_(m.up.to(b.dtype))
            layer.lora_alpha[adapter] = m.alpha
            layer.set_scale(adapter, 1.0)  # scaling = alpha / r of this module
    for p in unet_lora_parameters(unet, adapter):
        p.requires_grad_(False)
    return [m.path for m in modules]
