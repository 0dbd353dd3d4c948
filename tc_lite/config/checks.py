"""Combination checks: settings that are each valid but impossible together.

Every check names the keys it reads and runs on its own: a check runs only when all of its keys hold values of the
schema's type (a wrongly typed value is reported by the parser already and would only add noise or a TypeError
here), so one bad value never hides the problems among the others.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from typing import Any

from .parse import _convert
from .schema import UNET_TARGETS, Config

Check = Callable[[Config], Iterable[str]]
CHECKS: list[tuple[tuple[str, ...], Check]] = []


def _check(*keys: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS.append((keys, fn))
        return fn

    return register


def _well_typed(value: Any, tp: Any) -> bool:
    """Does an already built value match the annotation (sections and mappings of sections included)?"""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return isinstance(value, tp) and all(
            _well_typed(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(tp)
        )
    if typing.get_origin(tp) is dict:
        _, inner = typing.get_args(tp)
        return isinstance(value, dict) and all(_well_typed(v, inner) for v in value.values())
    trial: list[str] = []
    _convert(value, tp, "", trial)
    return not trial


def _key_ok(cfg: Config, key: str) -> bool:
    value: Any = cfg
    tp: Any = Config
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
        value = getattr(value, part)
    return _well_typed(value, tp)


def check_combinations(cfg: Config, problems: list[str]) -> None:
    """Append every combination problem among the well-typed values of `cfg`."""
    for keys, check in CHECKS:
        if all(_key_ok(cfg, k) for k in keys):
            problems.extend(check(cfg))


_check_combinations = check_combinations  # the name before the split into a package


@_check("sampling.grad_steps", "sampling.steps")
def _grad_steps(cfg: Config) -> Iterable[str]:
    s = cfg.sampling
    if s.grad_steps > s.steps:
        yield f"sampling.grad_steps: {s.grad_steps} > sampling.steps ({s.steps}); gradients can flow through at most every step"


@_check("sampling.grad_steps_min", "sampling.grad_steps")
def _grad_steps_min(cfg: Config) -> Iterable[str]:
    s = cfg.sampling
    if s.grad_steps_min is not None and s.grad_steps_min > s.grad_steps:
        yield f"sampling.grad_steps_min: {s.grad_steps_min} > sampling.grad_steps ({s.grad_steps}); it is the lower end of the random range"


@_check("sampling.height")
def _height(cfg: Config) -> Iterable[str]:
    if cfg.sampling.height % 8:
        yield f"sampling.height: {cfg.sampling.height} is not a multiple of 8 (the VAE downsamples by 8)"


@_check("sampling.width")
def _width(cfg: Config) -> Iterable[str]:
    if cfg.sampling.width % 8:
        yield f"sampling.width: {cfg.sampling.width} is not a multiple of 8 (the VAE downsamples by 8)"


@_check("memory.device", "memory.precision")
def _cpu_fp16(cfg: Config) -> Iterable[str]:
    if cfg.memory.device == "cpu" and cfg.memory.precision == "fp16":
        yield "memory.precision: fp16 needs a CUDA GPU; on the CPU use bf16 or fp32 (or precision: auto)"


@_check("sampling.prefix_cache", "sampling.encoder_schedule", "sampling.scheduler", "sampling.grad_steps_min",
        "unet.mode")
def _prefix_cache_usable(cfg: Config) -> Iterable[str]:
    from tc_lite.prefix_rules import prefix_cache_problems

    if cfg.sampling.prefix_cache != "none":
        yield from prefix_cache_problems(cfg.sampling, unet_mode=cfg.unet.mode)


def unet_target_problems(targets: list[str]) -> list[str]:
    """Problems with `unet.targets` (empty: none): each must be one of UNET_TARGETS, listed once."""
    problems = []
    if not targets:
        problems.append(f"unet.targets: empty; name the UNet projections to adapt, e.g. {list(UNET_TARGETS)}")
    for i, t in enumerate(targets):
        if t not in UNET_TARGETS:
            problems.append(f"unet.targets[{i}]: '{t}' is not a UNet projection tc-lite adapts; choose from "
                            f"{', '.join(UNET_TARGETS)} (the modules kohya, A1111 and ComfyUI map)")
    for t in sorted({t for t in targets if targets.count(t) > 1}):
        problems.append(f"unet.targets: '{t}' is listed {targets.count(t)} times; list each once")
    return problems


@_check("unet.mode", "unet.targets")
def _unet_targets(cfg: Config) -> Iterable[str]:
    if cfg.unet.mode == "lora":
        yield from unet_target_problems(cfg.unet.targets)


@_check("unet.mode", "unet.stage", "unet.start_step", "unet.lr", "unet.drift_weight", "train.steps", "lora.encoders")
def _unet_stage(cfg: Config) -> Iterable[str]:
    u = cfg.unet
    if u.mode == "none":
        changed = [k for k in ("stage", "start_step", "lr", "drift_weight")
                   if getattr(u, k) != getattr(type(u)(), k)]
        for k in changed:
            yield f"unet.{k}: applies to the UNet LoRA, which is off; set unet.mode=lora (or remove unet.{k})"
        return
    if u.start_step >= cfg.train.steps:
        yield (f"unet.start_step: {u.start_step} >= train.steps ({cfg.train.steps}), so the UNet LoRA would never "
               "train; lower it or raise train.steps")
    if u.stage == "after_te" and cfg.lora.encoders == []:
        yield ("unet.stage: after_te trains the text encoders first, but lora.encoders is empty (the UNet alone); "
               "use unet.stage=joint, or list the encoders to train first")
    if u.stage == "after_te" and u.start_step == 0:
        yield ("unet.stage: after_te trains the text encoders first, then the UNet from unet.start_step; set "
               "unet.start_step > 0 (e.g. half of train.steps), or use unet.stage=joint")


@_check("sampling.prefix_cache", "sampling.prefix_variants", "sampling.prefix_cache_dir")
def _cache_off(cfg: Config) -> Iterable[str]:
    s = cfg.sampling
    if s.prefix_cache == "none":
        for key, is_set in (("prefix_variants", s.prefix_variants != 1), ("prefix_cache_dir", s.prefix_cache_dir is not None)):
            if is_set:
                yield f"sampling.{key}: applies to the prefix cache, which is off; set sampling.prefix_cache=lazy or prefill"


@_check("memory.device", "memory.attention")
def _cpu_xformers(cfg: Config) -> Iterable[str]:
    if cfg.memory.device == "cpu" and cfg.memory.attention == "xformers":
        yield "memory.attention: xformers needs a CUDA GPU; use sdpa (or auto)"


@_check("lora.mode", "lora.targets")
def _lora_targets(cfg: Config) -> Iterable[str]:
    if cfg.lora.mode == "lora" and not cfg.lora.targets:
        yield "lora.targets: empty; name the linear layers to adapt, e.g. [q_proj, k_proj, v_proj, out_proj, fc1, fc2]"


@_check("optim.betas")
def _betas(cfg: Config) -> Iterable[str]:
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        yield f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}"


@_check("optim.warmup_steps", "train.steps")
def _warmup(cfg: Config) -> Iterable[str]:
    if cfg.optim.warmup_steps > cfg.train.steps:
        yield f"optim.warmup_steps: {cfg.optim.warmup_steps} > train.steps ({cfg.train.steps})"


@_check("rewards.terms")
def _some_reward(cfg: Config) -> Iterable[str]:
    if not any(t.weight != 0 for t in cfg.rewards.terms.values()):
        yield "rewards.terms: no reward with a non-zero weight; add one, e.g. rewards.terms.clip.weight=1"


@_check("logging.sample_seeds", "logging.sample_every")
def _sample_seeds(cfg: Config) -> Iterable[str]:
    if len(cfg.logging.sample_seeds) == 0 and cfg.logging.sample_every:
        yield "logging.sample_seeds: empty while logging.sample_every > 0; give at least one seed or set sample_every: 0"


@_check("logging.sample_prompts", "logging.sample_every")
def _sample_prompts(cfg: Config) -> Iterable[str]:
    if len(cfg.logging.sample_prompts) == 0 and cfg.logging.sample_every:
        yield "logging.sample_prompts: empty while logging.sample_every > 0; give at least one prompt or set sample_every: 0"


@_check("eval.seeds", "eval.every")
def _eval_seeds(cfg: Config) -> Iterable[str]:
    if len(cfg.eval.seeds) == 0 and cfg.eval.every:
        yield "eval.seeds: empty while eval.every > 0; give at least one seed, e.g. eval.seeds=[0]"
