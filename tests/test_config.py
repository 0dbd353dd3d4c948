"""Presets: strict parsing, inheritance, overrides, and every shipped preset loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tc_lite.config import Config, load_config, save_config
from tc_lite.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(path=None, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert e.value.exit_code == 2
    return e.value.problems


def test_base_preset_documents_exactly_the_defaults():
    assert load_config(ROOT / "presets" / "base.yaml") == Config()


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_shipped_preset_loads(preset):
    assert isinstance(load_config(preset), Config)


def test_every_key_of_the_schema_is_documented_in_base_yaml():
    import yaml

    raw = yaml.safe_load((ROOT / "presets" / "base.yaml").read_text())
    for section, values in Config().to_dict().items():
        assert section in raw, section
        missing = set(values) - set(raw[section])
        assert not missing, f"{section}: {missing} not in base.yaml"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    p = write(tmp_path, "a.yaml", "sampling:\n  grad_stepz: 2\n")
    (msg,) = problems(p)
    assert "sampling.grad_stepz" in msg and "did you mean 'grad_steps'" in msg


def test_all_problems_reported_at_once(tmp_path):
    p = write(tmp_path, "a.yaml", "optim: {lr: fast}\ntrain: {batch_size: 0, steps: 2.5}\nbogus: 1\n")
    found = problems(p, ["sampling.guidance_scale=nan"])
    keys = sorted(m.split(":")[0] for m in found)
    assert keys == ["bogus", "optim.lr", "sampling.guidance_scale", "train.batch_size", "train.steps"]


def test_wrong_types(tmp_path):
    p = write(tmp_path, "a.yaml", "memory: {checkpoint_unet: 'yes'}\nlora: {targets: q_proj}\nsampling: {scheduler: plms}\n")
    found = " | ".join(problems(p))
    assert "memory.checkpoint_unet: expected true/false" in found
    assert "lora.targets: expected a list of a string" in found
    assert "sampling.scheduler: expected one of 'ddim', 'euler', 'dpm++'" in found


@pytest.mark.parametrize("overrides, needle", [
    (["sampling.steps=4", "sampling.grad_steps=5"], "sampling.grad_steps: 5 > sampling.steps (4)"),
    (["memory.device=cpu", "memory.precision=fp16"], "memory.precision: fp16 needs a CUDA GPU"),
    (["memory.device=cpu", "memory.attention=xformers"], "memory.attention: xformers needs a CUDA GPU"),
    (["sampling.height=500"], "sampling.height: 500 is not a multiple of 8"),
    (["sampling.grad_steps_min=4", "sampling.grad_steps=2"], "sampling.grad_steps_min: 4 > sampling.grad_steps"),
    (["rewards.terms.clip.weight=0"], "rewards.terms: no reward with a non-zero weight"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.lr=0"], "optim.lr: 0.0 is below the minimum"),
])
def test_impossible_combinations(overrides, needle):
    assert any(needle in m for m in problems(None, overrides)), problems(None, overrides)


def test_overrides_typed_and_strict():
    cfg = load_config(None, ["optim.lr=1e-4", "train.steps=7", "lora.targets=[q_proj,v_proj]", "sampling.negative_prompt=blurry"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.sampling.negative_prompt == "blurry"
    assert any("no_equals" in m for m in problems(None, ["no_equals"]))
    assert any(m.startswith("optim.lrr:") for m in problems(None, ["optim.lrr=1"]))


def test_inheritance_merges_sections_and_reward_terms(tmp_path):
    write(tmp_path, "parent.yaml", "sampling: {steps: 10, grad_steps: 2}\nrewards:\n  terms:\n    clip: {weight: 0.5}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = write(sub, "child.yaml", "inherit: ../parent.yaml\nsampling: {steps: 12}\nrewards:\n  terms:\n    aesthetic: {weight: 1.0}\n")
    cfg = load_config(child, ["rewards.terms.clip.weight=0.25"])
    assert (cfg.sampling.steps, cfg.sampling.grad_steps) == (12, 2)
    assert {k: t.weight for k, t in cfg.rewards.terms.items()} == {"clip": 0.25, "aesthetic": 1.0}


def test_inherit_cycle_and_missing_parent(tmp_path):
    write(tmp_path, "a.yaml", "inherit: b.yaml\n")
    write(tmp_path, "b.yaml", "inherit: a.yaml\n")
    assert any("inherit cycle" in m for m in problems(tmp_path / "a.yaml"))
    write(tmp_path, "c.yaml", "inherit: nowhere.yaml\n")
    assert any("nowhere.yaml: preset file not found" in m for m in problems(tmp_path / "c.yaml"))


def test_malformed_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "bad.yaml", "optim:\n  lr: [1e-4\n")
    (msg,) = problems(p)
    assert "not valid YAML (line" in msg


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-5", "rewards.terms.aesthetic.weight=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
