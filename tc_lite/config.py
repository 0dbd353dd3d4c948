"""Presets: typed config sections, YAML with inheritance, strict dotted overrides, all problems reported at once.

A preset is YAML in sections that mirror the data flow (model → lora → sampling → rewards → optim → memory →
train/data → output/logging). `inherit: other.yaml` pulls in a parent preset (path relative to the child), and
`key.sub=value` overrides on the command line go through the same strict checks as the file: an unknown key, a
wrong type, an out-of-range number or an impossible combination is never silently accepted.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError


def _range(lo: float | None = None, hi: float | None = None, **kw: Any) -> dict:
    return {"min": lo, "max": hi, **kw}


@dataclass
class ModelConfig:
    source: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, diffusers folder, .safetensors file, or "tiny"
    config_dir: str | None = None  # diffusers config folder for a single-file checkpoint (default: bundled SD1.5)
    allow_pickle: bool = False  # .ckpt/.pt files can run code when loaded; refuse unless this is true
    revision: str | None = None


@dataclass
class LoraConfig:
    mode: Literal["lora", "full"] = "lora"
    rank: int = field(default=8, metadata=_range(1, 1024))
    alpha: float = field(default=8.0, metadata=_range(1e-6))
    dropout: float = field(default=0.0, metadata=_range(0.0, 0.99))
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])


@dataclass
class SamplingConfig:
    scheduler: Literal["ddim", "euler", "dpm++"] = "ddim"
    steps: int = field(default=25, metadata=_range(1, 1000))
    grad_steps: int = field(default=5, metadata=_range(1, 1000))
    grad_steps_min: int | None = field(default=None, metadata=_range(1, 1000))
    guidance_scale: float = field(default=7.5, metadata=_range(1.0, 50.0))
    negative_prompt: str = ""
    height: int = field(default=512, metadata=_range(8, 4096))
    width: int = field(default=512, metadata=_range(8, 4096))
    eta: float = field(default=0.0, metadata=_range(0.0, 1.0))
    encoder_schedule: Literal["two_encoder", "tuned"] = "two_encoder"
    prefix_cache: Literal["none", "lazy", "prefill"] = "none"
    prefix_variants: int = field(default=1, metadata=_range(1, 64))
    prefix_cache_dir: str | None = None
    uncond: Literal["original", "tuned"] = "tuned"


@dataclass
class RewardTerm:
    type: str | None = None  # registry name or "package.module:Class"; defaults to the term's key
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    target: float | None = None  # hinge: no reward for going above this value (limits reward hacking)


@dataclass
class RewardsConfig:
    offload: Literal["cpu", "none", "sequential"] = "cpu"
    terms: dict[str, RewardTerm] = field(default_factory=lambda: {"clip": RewardTerm(weight=1.0)})


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = field(default=1e-4, metadata=_range(0.0, 1.0, exclusive_min=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = field(default=1e-8, metadata=_range(0.0, 1.0, exclusive_min=True))
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = field(default=0, metadata=_range(0))
    grad_clip: float | None = field(default=1.0, metadata=_range(0.0, exclusive_min=True))


@dataclass
class MemoryConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    attention: Literal["sdpa", "xformers", "auto"] = "sdpa"
    checkpoint_unet: bool = True
    checkpoint_vae: bool = True
    cpu_threads: int | None = field(default=None, metadata=_range(1, 1024))  # CPU runs: torch threads (null: default)
    plan: Literal["manual", "auto"] = "manual"  # auto: choose memory switches so the estimate fits vram_gb
    # None: the CUDA card's total memory (plan: auto only)
    vram_gb: float | None = field(default=None, metadata=_range(1.0, 1024.0))


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata=_range(1))
    batch_size: int = field(default=1, metadata=_range(1, 1024))
    grad_accum: int = field(default=1, metadata=_range(1, 1024))
    seed: int = field(default=0, metadata=_range(0))
    resume: str | None = "auto"  # auto: continue from the newest checkpoint in output.dir if any; a path; null: never
    checkpoint_every: int = field(default=100, metadata=_range(0))  # 0: only on interrupt
    keep_checkpoints: int = field(default=2, metadata=_range(1))
    max_bad_steps: int = field(default=5, metadata=_range(1))  # consecutive non-finite steps before the run stops


@dataclass
class DataConfig:
    prompts: str | None = None  # .txt/.csv/.tsv/.jsonl, or null for the shipped list
    column: str | None = None


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    name: str = "tc_lite"
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    overwrite: bool = False


@dataclass
class LoggingConfig:
    log_every: int = field(default=1, metadata=_range(1))
    sample_every: int = field(default=100, metadata=_range(0))  # 0 disables sample grids during training
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a mountain lake at sunset"])
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1])
    progress: bool = True
    tensorboard: bool = False  # also log to <output.dir>/tensorboard when the tensorboard package is installed


@dataclass
class EvalConfig:
    every: int = field(default=0, metadata=_range(0))  # held-out evaluation every N steps; 0 disables
    prompts: str = "builtin:heldout"
    num_prompts: int = field(default=8, metadata=_range(1))
    seeds: list[int] = field(default_factory=lambda: [0])
    patience: int = field(default=0, metadata=_range(0))  # early stop after N evals without improvement; 0: never


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value or record a problem."""
    origin = typing.get_origin(tp)
    bad = f"{key}: expected {_type_name(tp)}, got {value!r}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a section (mapping), got {value!r}")
            return tp()
        return _build(tp, value, key, problems)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            out = _convert(value, arg, key, trial)
            if not trial:
                return out
        problems.append(bad)
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(bad)
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(bad)
            return []
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(bad)
            return {}
        _, inner = typing.get_args(tp)
        return {str(k): _convert(v, inner, f"{key}.{k}", problems) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(bad)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{key}: expected a finite number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(bad)
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in the schema, not user input


def _check_range(value: Any, meta: dict, key: str, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("exclusive_min") and value <= lo)):
        problems.append(f"{key}: {value} is below the minimum ({'>' if meta.get('exclusive_min') else '>='} {lo})")
    if hi is not None and value > hi:
        problems.append(f"{key}: {value} is above the maximum (<= {hi})")


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            problems.append(f"{key}: unknown key{_suggest(str(k), list(fields))}")
            continue
        value = _convert(v, hints[k], key, problems)
        _check_range(value, dict(fields[k].metadata), key, problems)
        kwargs[k] = value
    try:
        return cls(**kwargs)
    except TypeError:  # only reachable with earlier problems recorded
        return cls()


def _suggest(name: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid keys here: {', '.join(options)}"


# --------------------------------------------------------------------------------------------------- semantics


def _check_combinations(cfg: Config, problems: list[str]) -> None:
    s = cfg.sampling
    if s.grad_steps > s.steps:
        problems.append(f"sampling.grad_steps: {s.grad_steps} > sampling.steps ({s.steps}); gradients can flow through at most every step")
    if s.grad_steps_min is not None and s.grad_steps_min > s.grad_steps:
        problems.append(f"sampling.grad_steps_min: {s.grad_steps_min} > sampling.grad_steps ({s.grad_steps}); it is the lower end of the random range")
    for dim in ("height", "width"):
        if getattr(s, dim) % 8:
            problems.append(f"sampling.{dim}: {getattr(s, dim)} is not a multiple of 8 (the VAE downsamples by 8)")
    if cfg.memory.device == "cpu" and cfg.memory.precision == "fp16":
        problems.append("memory.precision: fp16 needs a CUDA GPU; on the CPU use bf16 or fp32 (or precision: auto)")
    if cfg.sampling.prefix_cache != "none" and cfg.sampling.encoder_schedule != "two_encoder":
        problems.append("sampling.prefix_cache: needs sampling.encoder_schedule=two_encoder (only then do the early steps not depend on the trained weights)")
    if cfg.sampling.prefix_cache != "none" and cfg.sampling.scheduler == "dpm++":
        problems.append("sampling.prefix_cache: DPM++ carries a multistep history the cached latent does not hold; use ddim or euler")
    if cfg.sampling.prefix_cache != "none" and cfg.sampling.grad_steps_min is not None:
        problems.append("sampling.prefix_cache: random truncation (grad_steps_min) changes where the prefix ends; unset one of them")
    if cfg.sampling.prefix_cache == "none":
        for key, is_set in (("prefix_variants", s.prefix_variants != 1), ("prefix_cache_dir", s.prefix_cache_dir is not None)):
            if is_set:
                problems.append(f"sampling.{key}: applies to the prefix cache, which is off; set sampling.prefix_cache=lazy or prefill")
    if cfg.memory.device == "cpu" and cfg.memory.attention == "xformers":
        problems.append("memory.attention: xformers needs a CUDA GPU; use sdpa (or auto)")
    if cfg.lora.mode == "lora" and not cfg.lora.targets:
        problems.append("lora.targets: empty; name the linear layers to adapt, e.g. [q_proj, k_proj, v_proj, out_proj, fc1, fc2]")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas if isinstance(b, float)):
        problems.append(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.warmup_steps > cfg.train.steps:
        problems.append(f"optim.warmup_steps: {cfg.optim.warmup_steps} > train.steps ({cfg.train.steps})")
    active = {k: t for k, t in cfg.rewards.terms.items() if t.weight != 0}
    if not active:
        problems.append("rewards.terms: no reward with a non-zero weight; add one, e.g. rewards.terms.clip.weight=1")
    if len(cfg.logging.sample_seeds) == 0 and cfg.logging.sample_every:
        problems.append("logging.sample_seeds: empty while logging.sample_every > 0; give at least one seed or set sample_every: 0")


# --------------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path, problems: list[str]) -> dict:
    if not path.is_file():
        problems.append(f"{path}: preset file not found")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problems.append(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}")
        return {}
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: a preset must be a mapping of sections, got {type(data).__name__}")
        return {}
    return data


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: str | Path, problems: list[str], _seen: tuple[Path, ...] = ()) -> dict:
    """Read a preset and everything it inherits from (child keys win, mappings merge)."""
    path = Path(path).resolve()
    if path in _seen:
        problems.append(f"{path}: inherit cycle ({' -> '.join(p.name for p in (*_seen, path))})")
        return {}
    data = _read_yaml(path, problems)
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        problems.append(f"{path}: inherit: expected a path to another preset, got {parent!r}")
        return data
    return _merge(load_raw(path.parent / parent, problems, (*_seen, path)), data)


def parse_override(item: str, problems: list[str]) -> tuple[list[str], Any] | None:
    if "=" not in item:
        problems.append(f"override '{item}': expected key=value, e.g. optim.lr=1e-4")
        return None
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.strip().split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _fix_yaml_floats(data: Any) -> Any:
    """YAML 1.1 reads '1e-4' (no dot) as a string; presets mean a number."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str) and _looks_numeric(data) and any(c in data.lower() for c in "e."):
        return float(data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (or the defaults), apply overrides, and validate everything; raise ConfigError with every problem."""
    problems: list[str] = []
    raw = load_raw(path, problems) if path is not None else {}
    for item in overrides:
        parsed = parse_override(item, problems)
        if parsed is None:
            continue
        keys, value = parsed
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
        node[keys[-1]] = value
    raw = _fix_yaml_floats(raw)
    cfg = _build(Config, raw, "", problems)
    try:
        _check_combinations(cfg, problems)
    except TypeError:  # a value of the wrong type is already reported; skip the combinations it takes part in
        pass
    if problems:
        raise ConfigError(problems, source=str(path) if path else "config")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (after inheritance and overrides) so a run can be reproduced from its folder."""
    from .io import save_text_atomic

    save_text_atomic(yaml.safe_dump(cfg.to_dict(), sort_keys=False), Path(path))
