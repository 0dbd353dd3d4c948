"""`load_config`: a preset (with its parents) plus overrides, typed and checked, every problem in one ConfigError."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError
from .checks import check_combinations
from .parse import _build, _fix_yaml_floats, apply_override, load_raw, parse_override
from .schema import Config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (or the defaults), apply overrides, and validate everything; raise ConfigError with every problem."""
    problems: list[str] = []
    raw = load_raw(path, problems) if path is not None else {}
    for item in overrides:
        parsed = parse_override(item, problems)
        if parsed is not None:
            apply_override(raw, *parsed, Config, problems)
    raw = _fix_yaml_floats(raw)
    cfg = _build(Config, raw, "", problems)
    check_combinations(cfg, problems)  # each check skips itself when a value it reads has the wrong type
    if problems:
        raise ConfigError(problems, source=str(path) if path else "config")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (after inheritance and overrides) so a run can be reproduced from its folder."""
    from ..io import save_text_atomic

    save_text_atomic(yaml.safe_dump(cfg.to_dict(), sort_keys=False), Path(path))
