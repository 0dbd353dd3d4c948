"""Preflight: problems outside the config's own values (reward args, LoRA targets, prompt files, model paths), all
reported at once and before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tc_lite.config import Config, load_config
from tc_lite.errors import ConfigError
from tc_lite.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def problems(*overrides: str, preset: Path | None = None) -> list[str]:
    cfg = load_config(preset, list(overrides))
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert e.value.exit_code == 2
    return e.value.problems


@pytest.fixture
def custom_rewards(tmp_path, monkeypatch):
    """An importable module of custom rewards, unique per test (so no stale copy sits in sys.modules)."""
    name = f"preflight_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        CONSTANT = 3

        class NeedsScale:
            def __init__(self, scale, bias=0.0):
                self.scale = scale
            def __call__(self, images, prompts):
                return images.mean((1, 2, 3)) * self.scale

        class NotCallable:
            def __init__(self, scale=1.0):
                pass

        def brightness(images, prompts):
            return images.mean((1, 2, 3))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_shipped_preset_passes(preset):
    preflight(load_config(preset))


def test_unknown_reward_arg_is_named_with_a_suggestion():
    (msg,) = problems("rewards.terms.clip.args.modle=x")
    assert msg.startswith("rewards.terms.clip.args.modle: not an argument of reward 'clip'")
    assert "did you mean 'model'" in msg and "accepted: model, arch, tokenizer" in msg


def test_unknown_reward_name_is_named_with_a_suggestion():
    (msg,) = problems("rewards.terms.clipp.weight=1")
    assert msg.startswith("rewards.terms.clipp: unknown reward 'clipp'") and "did you mean 'clip'" in msg
    (msg,) = problems("rewards.terms.x.type=aesthetc")
    assert msg.startswith("rewards.terms.x.type: unknown reward 'aesthetc'") and "did you mean 'aesthetic'" in msg


def test_switched_off_rewards_are_not_checked():
    preflight(load_config(None, ["rewards.terms.clip.weight=0", "rewards.terms.r.type=color",
                                 "rewards.terms.bad.type=nowhere:Nothing", "rewards.terms.bad.weight=0"]))


def test_missing_required_custom_reward_arg(custom_rewards):
    (msg,) = problems(f"rewards.terms.mine.type={custom_rewards}:NeedsScale")
    assert msg.startswith("rewards.terms.mine.args.scale: required by reward") and "rewards.terms.mine.args.scale=" in msg
    preflight(load_config(None, [f"rewards.terms.mine.type={custom_rewards}:NeedsScale", "rewards.terms.mine.args.scale=2"]))
    preflight(load_config(None, [f"rewards.terms.fn.type={custom_rewards}:brightness"]))  # the function is the reward


@pytest.mark.parametrize("target, needles", [
    ("no_such_package_xyz.rewards:Mine", ["cannot import module 'no_such_package_xyz.rewards'", "ModuleNotFoundError",
                                          "PYTHONPATH"]),
    ("{mod}:Missing", ["has no attribute 'Missing'"]),
    ("{mod}:CONSTANT", ["is not a class or factory function"]),
    ("{mod}:NotCallable", ["cannot be called as reward(images, prompts)"]),
])
def test_custom_reward_that_cannot_be_used(custom_rewards, target, needles):
    (msg,) = problems(f"rewards.terms.mine.type={target.format(mod=custom_rewards)}")
    assert msg.startswith("rewards.terms.mine.type: ")
    assert all(n in msg for n in needles), msg


def test_bad_and_duplicate_lora_targets():
    found = problems("lora.targets=[q_proj,q_proj,k_prj]")
    assert found[0].startswith("lora.targets[2]: 'k_prj' is not") and "did you mean 'k_proj'" in found[0]
    assert found[1].startswith("lora.targets: 'q_proj' is listed 2 times")
    assert len(found) == 2
    preflight(load_config(None, ["lora.mode=full", "lora.targets=[nonsense]"]))  # full fine-tune: targets unused


def test_lora_encoders_must_be_the_family_slots():
    found = problems("model.source=tiny-sdxl", "lora.encoders=[te1,te3]", "lora.per_encoder={tex: {rank: 4}}")
    assert found[0].startswith("lora.encoders[1]: 'te3' is not a text encoder of SDXL") and "te1, te2" in found[0]
    assert found[1].startswith("lora.per_encoder.tex: not a text encoder of SDXL")
    (msg,) = problems("lora.encoders=[te2]")  # SD1 has one encoder, "te"
    assert msg.startswith("lora.encoders[0]: 'te2' is not a text encoder of SD1.x") and "did you mean 'te'" in msg
    preflight(load_config(None, ["model.source=tiny-sdxl", "lora.per_encoder={te2: {mode: full}}",
                                 "lora.encoders=[te2]", "lora.targets=[nonsense]"]))  # full encoder only: no targets


def test_refused_model_families_are_named_before_loading(tmp_path):
    from safetensors.torch import save_file
    import torch

    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(refiner))
    (msg,) = problems(f"model.source={refiner}")
    assert "looks like the SDXL refiner" in msg and "train the SDXL base model instead" in msg


def test_the_family_lora_targets_are_the_ones_peft_injects():
    from tc_lite.families import FAMILIES
    from tc_lite.lora import DEFAULT_TARGETS

    assert list(FAMILIES["sd1"].lora_targets) == DEFAULT_TARGETS


def test_missing_prompts_file_and_bad_column(tmp_path):
    (msg,) = problems(f"data.prompts={tmp_path / 'nope.txt'}")
    assert msg.startswith("data.prompts: prompts file") and "nope.txt" in msg and "does not exist" in msg
    table = tmp_path / "p.csv"
    table.write_text("text\na cat\n")
    (msg,) = problems(f"data.prompts={table}", "data.column=prompt")
    assert msg.startswith("data.prompts: ") and "no column 'prompt'" in msg


def test_missing_eval_prompts_only_when_evaluating(tmp_path):
    missing = tmp_path / "heldout.txt"
    (msg,) = problems("eval.every=10", f"eval.prompts={missing}")
    assert msg.startswith("eval.prompts: prompts file") and "heldout.txt" in msg
    preflight(load_config(None, ["eval.every=0", f"eval.prompts={missing}"]))


def test_missing_model_path_and_config_dir(tmp_path):
    (msg,) = problems(f"model.source={tmp_path / 'model.safetensors'}")
    assert msg.startswith("model.source: ") and "model.safetensors" in msg and "does not exist" in msg
    (msg,) = problems("model.source=./models/sd15")
    assert msg.startswith("model.source: './models/sd15' does not exist")
    (msg,) = problems(f"model.config_dir={tmp_path / 'configs'}")
    assert msg.startswith("model.config_dir: ") and "does not exist" in msg
    preflight(load_config(None, ["model.source=some-org/some-model"]))  # a hub id: resolved when it loads


def test_several_problems_reported_together(tmp_path):
    cfg = load_config(None, ["rewards.terms.clip.args.modle=x", "lora.targets=[q_prj]",
                             f"data.prompts={tmp_path / 'a.txt'}", "eval.every=5", f"eval.prompts={tmp_path / 'b.txt'}",
                             f"model.source={tmp_path / 'm'}/"])
    with pytest.raises(ConfigError) as e:
        preflight(cfg, source="my.yaml")
    keys = [m.split(":")[0] for m in e.value.problems]
    assert keys == ["rewards.terms.clip.args.modle", "lora.targets[0]", "data.prompts", "eval.prompts", "model.source"]
    assert "5 problem(s) in my.yaml" in str(e.value)


def test_defaults_pass_quickly():
    cfg = Config()
    preflight(cfg)  # the first call pays for importing the reward modules (torch)
    start = time.perf_counter()
    preflight(cfg)
    assert time.perf_counter() - start < 1.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_cli_reports_a_bad_reward_arg_before_loading_any_model():
    start = time.perf_counter()
    r = _cli("run.py", "presets/clip.yaml", "rewards.terms.clip.args.modle=x")
    elapsed = time.perf_counter() - start
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "rewards.terms.clip.args.modle" in r.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s"  # ~2 s: no model, no diffusers/peft import


def test_cli_preflight_imports_no_model_library():
    code = ("import sys; from tc_lite.cli import main; rc = main(['train', 'presets/clip.yaml', "
            "'rewards.terms.clip.args.modle=x']); "
            "print(sorted(m for m in ('diffusers', 'peft', 'transformers', 'tc_lite.train') if m in sys.modules)); "
            "sys.exit(rc)")
    r = _cli("-c", code)
    assert r.returncode == 2 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
