"""Preflight: the checks a config needs beyond its own values, run after `load_config` and before any model loads.

`load_config` checks types, ranges and combinations. This looks outside the config, cheaply: that each active
reward resolves (its module imports, nothing is constructed) and accepts the `args` given, that the LoRA targets
exist, that the prompt files read, and that a local model path or config folder is there. Every problem is
reported in one `ConfigError`, so a run never spends a minute loading models to fail on a typo.
"""

from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path
from typing import Any

from tc_lite.config import Config
from tc_lite.errors import ConfigError, UserError

__all__ = ["preflight", "preflight_problems"]


def preflight(cfg: Config, source: str = "config") -> None:
    """Raise ConfigError listing every problem found (see the module docstring); return None when there is none."""
    problems = preflight_problems(cfg)
    if problems:
        raise ConfigError(problems, source=f"{source} (found before loading any model)")


def preflight_problems(cfg: Config) -> list[str]:
    return [*_reward_problems(cfg), *_lora_problems(cfg), *_data_problems(cfg), *_model_problems(cfg)]


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------------------------------------------- rewards


def _reward_problems(cfg: Config) -> list[str]:
    from tc_lite.rewards.registry import NOT_BUILT_IN, known_rewards, resolve_reward

    problems = []
    for label, term in cfg.rewards.terms.items():
        if term.weight == 0:
            continue  # switched off: never built
        key = f"rewards.terms.{label}"
        name = (term.type or label).strip()
        if name not in known_rewards() and ":" not in name and name.lower() not in NOT_BUILT_IN:
            where = f"{key}.type" if term.type else key
            problems.append(f"{where}: unknown reward '{name}'{_did_you_mean(name, known_rewards())}; built-in: "
                            f"{', '.join(known_rewards())}, or a custom reward 'package.module:ClassName'")
            continue
        try:
            factory, builtin = resolve_reward(name)
        except UserError as e:
            problems.append(f"{key}.type: {e}" if term.type else f"{key}: {e}")
            continue
        problems += _args_problems(key, name, factory, builtin, term.args)
    return problems


def _args_problems(key: str, name: str, factory: Any, builtin: bool, args: dict[str, Any]) -> list[str]:
    from tc_lite.rewards.registry import _is_reward_function, reward_parameters

    if not builtin and not args and _is_reward_function(factory):
        return []  # 'module:function' that is the reward itself
    if inspect.isclass(factory) and not any("__call__" in vars(k) for k in factory.__mro__[:-1]):
        return [f"{key}.type: '{name}' is a class whose instances cannot be called as reward(images, prompts); "
                "give it __call__(self, images, prompts) or name a factory function that returns a reward"]
    found = reward_parameters(factory)
    if found is None:
        return []
    accepted, required = found
    problems = []
    for arg in args:
        if accepted is not None and arg not in accepted:
            problems.append(f"{key}.args.{arg}: not an argument of reward '{name}'{_did_you_mean(arg, accepted)}; "
                            f"accepted: {', '.join(accepted) or 'none'}")
    for arg in required:
        if arg not in args:
            problems.append(f"{key}.args.{arg}: required by reward '{name}' but not given; set {key}.args.{arg}=VALUE")
    return problems


# ------------------------------------------------------------------------------------------------------- lora


def _lora_problems(cfg: Config) -> list[str]:
    from tc_lite.families import family_for

    try:
        family = family_for(cfg.model)  # configs and key names only: no weights, no download
    except UserError as e:
        return [str(e)]
    slots = [s.name for s in family.slots]
    problems = []
    for i, name in enumerate(cfg.lora.encoders or []):
        if name not in slots:
            problems.append(f"lora.encoders[{i}]: '{name}' is not a text encoder of {family.label}"
                            f"{_did_you_mean(name, slots)}; choose from {', '.join(slots)}")
    if cfg.lora.encoders is not None and not cfg.lora.encoders and cfg.unet.mode == "none":
        problems.append(f"lora.encoders: empty, so nothing would train; list some of {', '.join(slots)}, use null, "
                        "or train the UNet alone with unet.mode=lora")
    for name in cfg.lora.per_encoder:
        if name not in slots:
            problems.append(f"lora.per_encoder.{name}: not a text encoder of {family.label}"
                            f"{_did_you_mean(name, slots)}; choose from {', '.join(slots)}")
    from tc_lite.adapters import encoder_settings, selected_slots

    if all(encoder_settings(cfg.lora, s.name)["mode"] == "full" for s in selected_slots(cfg.lora, family)):
        return problems  # no LoRA anywhere: targets do not matter
    valid = list(family.lora_targets)
    for i, target in enumerate(cfg.lora.targets):
        if target not in valid:
            problems.append(f"lora.targets[{i}]: '{target}' is not a text-encoder linear tc-lite adapts"
                            f"{_did_you_mean(target, valid)}; choose from {', '.join(valid)}")
    for target in sorted({t for t in cfg.lora.targets if cfg.lora.targets.count(t) > 1}):
        problems.append(f"lora.targets: '{target}' is listed {cfg.lora.targets.count(target)} times; list each once")
    return problems


# ------------------------------------------------------------------------------------------------------- data


def _data_problems(cfg: Config) -> list[str]:
    from tc_lite.data import load_prompts

    problems = []
    try:
        load_prompts(cfg.data.prompts, column=cfg.data.column)
    except UserError as e:
        problems.append(f"data.prompts: {e}")
    if cfg.eval.every > 0:
        try:
            load_prompts(cfg.eval.prompts)  # as tc_lite.tracking reads it: no column
        except UserError as e:
            problems.append(f"eval.prompts: {e}")
    return problems


# ------------------------------------------------------------------------------------------------------ model


def _model_problems(cfg: Config) -> list[str]:
    problems = []
    source = cfg.model.source.strip()
    if not source:
        problems.append("model.source: empty; set it to 'tiny', a hub id, a diffusers folder or a .safetensors file")
    elif source not in ("tiny", "tiny-sdxl") and not Path(source).expanduser().exists():
        from tc_lite.models.loading import _looks_like_path  # hub ids (org/name) cannot be checked offline here

        if _looks_like_path(source):
            problems.append(f"model.source: {source!r} does not exist; check the path (it is resolved from "
                            f"{os.getcwd()})")
    vae = (cfg.model.vae or "").strip()
    if vae and not Path(vae).expanduser().exists():
        from tc_lite.models.loading import _looks_like_path

        if _looks_like_path(vae):
            problems.append(f"model.vae: {vae!r} does not exist; give a hub id, a diffusers VAE folder or a "
                            ".safetensors VAE file (or null to keep the model's)")
    if cfg.model.config_dir:
        folder = Path(cfg.model.config_dir).expanduser()
        if not folder.is_dir():
            problems.append(f"model.config_dir: {cfg.model.config_dir!r} does not exist; point it at a diffusers "
                            "model folder (configs suffice) or set it to null for the bundled SD1.5/SDXL configs")
        elif Path(source).expanduser().is_file() and not (folder / "model_index.json").is_file():  # read for single files
            problems.append(f"model.config_dir: {cfg.model.config_dir!r} is not a diffusers config folder (no "
                            "model_index.json); point it at a diffusers model folder or set it to null")
    return problems
