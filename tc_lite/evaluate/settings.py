"""What an evaluation does, as one value: ``EvalSettings`` (every rendering, scoring and output option, with the
defaults of ``python -m tc_lite eval``), its validation (every problem reported at once), and the parsers for the
two options with a small syntax of their own, ``parse_seeds`` and ``parse_reward_spec``."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tc_lite.errors import UserError

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


class EvalSettingsError(UserError):
    """Every problem found in a set of eval settings. One problem reads as itself; several are listed."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the eval settings:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


@dataclass
class EvalPlan:
    """The settings made concrete by ``EvalSettings.resolve``: lists instead of specs, ready to run."""

    prompts: list[str]
    prompts_source: str  # the file / builtin name, or "a list"
    seeds: list[int]
    reward_spec: dict[str, dict[str, Any]]
    model_names: list[str]  # "base" first, then one unique name per LoRA


@dataclass
class EvalSettings:
    """Every option of ``evaluate`` except the model and the LoRAs; the defaults are the eval command's.

    ``prompts``: a prompt file (``.txt``, CSV/TSV such as Parti-Prompts' ``PartiPrompts.tsv`` with its ``Prompt``
    column, ``.jsonl``), ``builtin:NAME``, or a list; ``column`` picks a CSV/TSV column or JSONL key;
    ``num_prompts`` keeps the first N. ``rewards``: see ``parse_reward_spec``; ``reward_args`` are
    ``LABEL.KEY=VALUE`` strings. ``seeds``: a count or a list (see ``parse_seeds``). ``names``: one label per LoRA
    (default: the file names). ``lora_weight`` and ``tuned_steps`` as in ``tc_lite.inference``. ``height`` /
    ``width`` default to the model's native size. ``device`` / ``precision`` as ``memory.device`` /
    ``memory.precision``; ``reward_offload`` as ``rewards.offload``. ``batch_size``: images per UNet batch;
    ``grid_prompts``: side-by-side grids for the first N prompts; ``save_images``: every image under
    ``out_dir/images/``. ``model_options`` are ``model`` preset keys (``config_dir``, ``allow_pickle``,
    ``revision``, as in the ``model`` preset section).
    """

    out_dir: str | Path = "outputs/eval"
    prompts: str | Path | Sequence[str] = "builtin:heldout"
    column: str | None = None
    num_prompts: int | None = None
    rewards: str | Sequence[str] | Mapping[str, Any] = "clip"
    reward_args: Sequence[str] = ()
    seeds: int | str | Sequence[int] = 4
    names: Sequence[str] | None = None
    lora_weight: float = 1.0
    tuned_steps: int | None = None
    steps: int = 25
    guidance: float = 7.5
    scheduler: str = "ddim"
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    device: str = "auto"
    precision: str = "auto"
    reward_offload: str = "cpu"
    batch_size: int = 4
    grid_prompts: int = 8
    save_images: bool = False
    progress: bool = True
    model_options: Mapping[str, Any] | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def unknown_names(cls, names: Sequence[str]) -> list[str]:
        """One problem per name that is not a field (with the closest field as a hint)."""
        known = cls.field_names()
        out = []
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f"; known settings: {', '.join(known)}"
                out.append(f"{name}: unknown eval setting{hint}")
        return out

    def replace(self, **changes: Any) -> EvalSettings:
        """A copy with ``changes``; an unknown name raises ``EvalSettingsError`` naming it (values are not checked
        here: ``validate`` does that)."""
        unknown = self.unknown_names(list(changes))
        if unknown:
            raise EvalSettingsError(unknown)
        return dataclasses.replace(self, **changes)

    def problems(self, loras: Sequence[Any] = ()) -> list[str]:
        """Every problem of these settings (for these LoRAs), each message naming its field; empty when valid.
        Reads the prompt file (cheap) and checks that LoRA files exist; loads no model."""
        return self._resolve(loras)[0]

    def validate(self, loras: Sequence[Any] = ()) -> None:
        """Raise one ``EvalSettingsError`` (a ``UserError``) listing every problem, if there is any."""
        self.resolve(loras)

    def resolve(self, loras: Sequence[Any] = ()) -> EvalPlan:
        """Validate, then return the concrete prompts, seeds, reward spec and model names."""
        problems, plan = self._resolve(loras)
        if problems:
            raise EvalSettingsError(problems)
        assert plan is not None
        return plan

    # ----------------------------------------------------------------------------------------------- checks

    def _resolve(self, loras: Sequence[Any]) -> tuple[list[str], EvalPlan | None]:
        problems: list[str] = []

        def attempt(fn: Any, *args: Any) -> Any:
            try:
                return fn(*args)
            except UserError as e:
                problems.append(str(e))
                return None

        seeds = attempt(parse_seeds, self.seeds)
        spec = attempt(parse_reward_spec, self.rewards, self.reward_args)
        prompts, source = attempt(self._load_prompts) or (None, "")
        if self.num_prompts is not None:
            if not _is_int(self.num_prompts) or self.num_prompts < 1:
                problems.append(f"num_prompts: must be at least 1, got {self.num_prompts!r}")
            elif prompts is not None:
                prompts = prompts[: self.num_prompts]
        problems += self._sampling_problems()
        problems += [f"--lora {str(src)!r}: file not found; pass a LoRA .safetensors written by tc-lite (kohya, "
                     "diffusers or peft format) or a full-encoder file"
                     for src in loras if isinstance(src, (str, Path)) and not Path(src).expanduser().exists()]
        names = attempt(_model_names, list(loras), self.names)
        if problems:
            return problems, None
        return [], EvalPlan(prompts, source, seeds, spec, names)

    def _load_prompts(self) -> tuple[list[str], str]:
        from tc_lite.data import load_prompts

        if isinstance(self.prompts, (str, Path)):
            return load_prompts(self.prompts, column=self.column), str(self.prompts)
        prompt_list = [str(p) for p in self.prompts]
        if not prompt_list:
            raise UserError("prompts: the list is empty; give at least one prompt")
        return prompt_list, "a list"

    def _sampling_problems(self) -> list[str]:
        from tc_lite.rewards.mix import OFFLOAD_MODES

        p = []
        if not _is_int(self.steps) or self.steps < 1:
            p.append(f"steps: must be an integer >= 1, got {self.steps!r}")
        if self.tuned_steps is not None and not (
                _is_int(self.tuned_steps) and 0 <= self.tuned_steps <= (self.steps if _is_int(self.steps) else math.inf)):
            p.append(f"tuned_steps: must be an integer between 0 and steps ({self.steps}), got {self.tuned_steps!r}")
        if not isinstance(self.guidance, numbers.Real) or not self.guidance >= 1.0:
            p.append(f"guidance: must be >= 1 (1 = no classifier-free guidance), got {self.guidance!r}")
        if not isinstance(self.lora_weight, numbers.Real) or not math.isfinite(self.lora_weight):
            p.append(f"lora_weight: must be a finite number, got {self.lora_weight!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                p.append(f"{name}: must be a positive integer (or None: the model's native size), got {v!r}")
        if self.precision not in PRECISIONS:
            p.append(f"precision: {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        if self.reward_offload not in OFFLOAD_MODES:
            p.append(f"reward_offload: {self.reward_offload!r} is unknown; use one of {', '.join(OFFLOAD_MODES)}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            p.append(f"batch_size: must be >= 1, got {self.batch_size!r}")
        if not _is_int(self.grid_prompts) or self.grid_prompts < 0:
            p.append(f"grid_prompts: must be >= 0, got {self.grid_prompts!r}")
        return p


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _source_name(src: Any, i: int) -> str:
    """A file's stem; for slot -> file (an SDXL run with encoders trained in full) the first file's."""
    if isinstance(src, dict) and src and all(isinstance(v, (str, Path)) for v in src.values()):
        src = next(iter(src.values()))
    return Path(src).stem if isinstance(src, (str, Path)) else f"lora{i + 1}"


def _model_names(loras: Sequence[Any], names: Sequence[str] | None) -> list[str]:
    """"base", then one name per LoRA (given, or the file's stem), made unique and free of whitespace."""
    if names is not None:
        if len(names) != len(loras):
            raise UserError(f"names: {len(names)} name(s) for {len(loras)} LoRA(s); give one per LoRA")
        out = list(names)
    else:
        out = [_source_name(src, i) for i, src in enumerate(loras)]
    seen: dict[str, int] = {"base": 1}
    unique = []
    for n in out:
        base_name = re.sub(r"\s+", "_", str(n)) or "lora"
        k = seen.get(base_name, 0)
        seen[base_name] = k + 1
        unique.append(base_name if k == 0 else f"{base_name}_{k + 1}")
    return ["base", *unique]


# --------------------------------------------------------------------------------------------------- parsing


def parse_seeds(value: int | str | Sequence[int]) -> list[int]:
    """``4`` or ``"4"`` -> seeds 0..3; ``"0,5,9"`` or ``[0, 5, 9]`` -> those seeds. UserError names ``seeds``."""
    if isinstance(value, bool):
        raise UserError(f"seeds: expected a count or a list of seeds, got {value!r}")
    if isinstance(value, int):
        count: int | None = value
        seeds: list[int] = []
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "," in text:
                count, seeds = None, [int(s) for s in text.split(",") if s.strip()]
            else:
                count, seeds = int(text), []
        except ValueError:
            raise UserError(f"seeds: {value!r} is neither a count (e.g. 4) nor a comma-separated list (e.g. 0,1,7)") from None
    else:
        count, seeds = None, [int(s) for s in value]
    if count is not None:
        if count < 1:
            raise UserError(f"seeds: the count must be at least 1, got {count} (2 or more to measure diversity)")
        seeds = list(range(count))
    if not seeds:
        raise UserError("seeds: empty; give a count (e.g. 4) or a list of seeds (e.g. 0,1,7)")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"seeds: {seeds} must be distinct non-negative integers")
    return seeds


def parse_reward_spec(rewards: str | Sequence[str] | Mapping[str, Any],
                      reward_args: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Normalise a reward selection to ``{label: {"type": name, "args": {...}}}``.

    Accepts ``"aesthetic,clip"`` (``LABEL=NAME`` items give a reward its own label, e.g. ``"blue=color"``), a list
    of such items, or a mapping such as a config's ``rewards.terms`` (terms with
    weight 0 are skipped: they were switched off). ``reward_args`` are ``label.key=value`` strings (the CLI's
    ``--reward-arg clip.model=/path``); values are read as YAML (numbers, lists, strings).
    """
    import yaml

    spec: dict[str, dict[str, Any]] = {}
    if isinstance(rewards, str):
        rewards = [r for r in (s.strip() for s in rewards.split(",")) if r]
    if isinstance(rewards, Mapping):
        for label, term in rewards.items():
            get = term.get if isinstance(term, Mapping) else lambda k, d=None, t=term: getattr(t, k, d)
            if get("weight", 1.0) == 0:
                continue
            spec[str(label)] = {"type": get("type") or str(label), "args": dict(get("args") or {})}
    else:
        for item in rewards:
            label, _, kind = (part.strip() for part in str(item).partition("="))
            if not label or (_ and not kind):
                raise UserError(f"rewards: {item!r} is not NAME or LABEL=NAME (e.g. clip, or blue=color)")
            if label in spec:
                raise UserError(f"rewards: {label!r} is listed twice; give a second one its own label, e.g. {label}2={kind or label}")
            spec[label] = {"type": kind or label, "args": {}}
    if not spec:
        raise UserError("rewards: none selected; name at least one, e.g. --rewards aesthetic,clip")
    for item in reward_args:
        key, sep, raw = item.partition("=")
        label, dot, arg = key.strip().partition(".")
        if not sep or not dot or not arg:
            raise UserError(f"reward arg {item!r}: expected LABEL.KEY=VALUE, e.g. clip.model=/models/clip-vit-large")
        if label not in spec:
            raise UserError(f"reward arg {item!r}: no reward {label!r} is selected (selected: {', '.join(spec)})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        spec[label]["args"][arg] = value
    return spec
