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


@pytest.mark.parametrize("overrides, needle", [
    (["logging.sample_prompts=[]"], "logging.sample_prompts: empty while logging.sample_every > 0"),
    (["eval.every=5", "eval.seeds=[]"], "eval.seeds: empty while eval.every > 0"),
])
def test_empty_sample_prompts_and_eval_seeds(overrides, needle):
    assert any(needle in m for m in problems(None, overrides))
    load_config(None, [*overrides, "logging.sample_every=0", "eval.every=0"])  # fine once the feature is off


def test_a_wrongly_typed_value_hides_no_combination_problem():
    found = problems(None, ["sampling.steps=abc", "sampling.prefix_cache=lazy", "sampling.scheduler=dpm++",
                            "sampling.height=500", "memory.device=cpu", "memory.precision=fp16", "train.steps=true"])
    assert any(m.startswith("sampling.steps: expected an integer") for m in found)
    assert any(m.startswith("train.steps: expected an integer") for m in found)
    assert any("DPM++ carries a multistep history" in m for m in found)
    assert any("sampling.height: 500 is not a multiple of 8" in m for m in found)
    assert any("memory.precision: fp16 needs a CUDA GPU" in m for m in found)
    # the checks that read a wrongly typed value are skipped, not run on it (no "5 > sampling.steps (abc)")
    assert not any(m.startswith(("sampling.grad_steps:", "optim.warmup_steps:")) for m in found), found


def test_a_wrongly_typed_choice_skips_only_its_checks():
    found = problems(None, ["sampling.prefix_cache=lazzy", "sampling.scheduler=dpm++", "sampling.grad_steps=30"])
    assert [m.split(":")[0] for m in found] == ["sampling.prefix_cache", "sampling.grad_steps"], found


@pytest.mark.parametrize("preset, override, where", [
    (None, "train.steps.x=1", "train.steps"),
    (ROOT / "presets" / "tiny-cpu.yaml", "sampling.height.foo=2", "sampling.height"),  # the preset sets the value
    (None, "sampling.height.foo=2", "sampling.height"),
    (None, "lora.targets.x=q_proj", "lora.targets"),
    (None, "model.source.a.b=1", "model.source"),
])
def test_an_override_into_a_single_value_is_an_error(preset, override, where):
    (msg,) = problems(preset, [override])
    key = override.split("=")[0]
    assert msg.startswith(f"{key}: {where} is a single value") and f"{where}=VALUE" in msg, msg


def test_an_override_into_a_non_mapping_free_form_value_is_an_error():
    (msg,) = problems(ROOT / "presets" / "tiny-cpu.yaml", ["rewards.terms.redness.args.target.x=1"])
    assert msg.startswith("rewards.terms.redness.args.target.x: rewards.terms.redness.args.target is [1.0, 0.0, 0.0]")


def test_overrides_into_unknown_sections_and_free_form_args():
    (msg,) = problems(None, ["sampling.stepz.x=1"])
    assert msg.startswith("sampling.stepz: unknown key") and "did you mean 'steps'" in msg
    (msg,) = problems(None, ["samplin.steps=3"])
    assert msg.startswith("samplin: unknown key") and "did you mean 'sampling'" in msg
    cfg = load_config(None, ["rewards.terms.clip.args.arch.embed_dim=768", "rewards.terms.extra.weight=2"])
    assert cfg.rewards.terms["clip"].args == {"arch": {"embed_dim": 768}} and cfg.rewards.terms["extra"].weight == 2


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n", "~\n"])
def test_an_empty_preset_is_an_error_that_says_how_to_start_from_the_defaults(tmp_path, text):
    p = write(tmp_path, "x.yaml", text)
    (msg,) = problems(p)
    assert msg.startswith(f"{p}: the preset is empty") and "inherit:" in msg and "base.yaml" in msg


def test_an_empty_inherited_parent_is_an_error(tmp_path):
    write(tmp_path, "empty.yaml", "# nothing yet\n")
    child = write(tmp_path, "child.yaml", "inherit: empty.yaml\ntrain: {steps: 3}\n")
    (msg,) = problems(child)
    assert msg.startswith(f"{tmp_path / 'empty.yaml'}: the preset is empty")
    sub = tmp_path / "sub"
    sub.mkdir()
    (msg,) = problems(write(sub, "y.yaml", ""))
    import os

    rel = os.path.relpath(ROOT / "presets" / "base.yaml", sub)
    assert f"`inherit: {rel}`" in msg or f"`inherit: {ROOT / 'presets' / 'base.yaml'}`" in msg


def test_the_package_keeps_every_name_imported_before_the_split():
    import tc_lite.config as config

    for name in ("Config", "load_config", "save_config", "RewardTerm", "MemoryConfig", "OptimConfig", "EvalConfig",
                 "ModelConfig", "LoraConfig", "SamplingConfig", "RewardsConfig", "TrainConfig", "DataConfig",
                 "OutputConfig", "LoggingConfig", "load_raw", "parse_override", "_build", "_convert",
                 "_check_combinations", "_suggest", "_type_name", "_fix_yaml_floats", "_read_yaml", "_merge"):
        assert hasattr(config, name), name


def test_no_config_module_exceeds_400_lines():
    for path in (ROOT / "tc_lite" / "config").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path
