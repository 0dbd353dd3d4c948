"""Evaluation: the eval command and API on the tiny model, the held-out evaluation during training, TensorBoard.

The eval tests check what the report promises: base and tuned images share their noise (the pairing is real), the
numbers in summary.json / scores.jsonl / the report agree, a Parti-Prompts TSV is read, weight 0 is the base model
exactly, and every user mistake is one message naming the argument.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tc_lite.cli import main
from tc_lite.config import EvalConfig, load_config, save_config
from tc_lite.errors import UserError
from tc_lite.evaluate import EvalSettings, evaluate, evaluate_run, parse_reward_spec, parse_seeds
from tc_lite.tracking import HeldOutEval, NullTracker, TensorBoardTracker, make_tracker

ROOT = Path(__file__).resolve().parents[1]
RED = {"type": "color", "args": {"target": [1.0, 0.0, 0.0]}}


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_components) -> Path:
    """A kohya LoRA for the tiny encoder with random (non-zero) up weights, so it really changes the images."""
    from tc_lite.export import write_kohya
    from tc_lite.lora import add_lora, kohya_state_dict, lora_layers

    te = add_lora(copy.deepcopy(tiny_components.text_encoder), rank=2, alpha=2.0, init_seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(te):
            b = layer.lora_B["tc_lite"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
    path = tmp_path_factory.mktemp("lora") / "red_boost.safetensors"
    return write_kohya(kohya_state_dict(te), path, metadata={})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP saved with save_pretrained (as tests/rewards builds it), for the CLIP-embedding path."""
    from transformers import CLIPConfig, CLIPModel

    from tests.rewards.tiny_rewards import clip_tokenizer

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(small, image_size=224, patch_size=32), projection_dim=16)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def parti_tsv(tmp_path) -> Path:
    """Parti-Prompts' layout: a `Prompt` column among others (PartiPrompts.tsv)."""
    rows = [("a red square", "Abstract", "Basic", ""), ("a blue circle", "Abstract", "Basic", "note"),
            ("a green bar", "Abstract", "Basic", ""), ("a white square", "Abstract", "Basic", "")]
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text("Prompt\tCategory\tChallenge\tNote\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------- eval API


def test_evaluate_pairs_seeds_scores_every_reward_and_writes_the_report(tmp_path, parti_tsv, lora_file, clip_dir,
                                                                         tiny_components):
    from tc_lite.inference import generate
    from tc_lite.rewards import build_reward

    logs: list[str] = []
    settings = EvalSettings(prompts=parti_tsv, num_prompts=3, seeds=[3, 7], steps=3,
                            rewards={"red": RED, "clip": {"type": "clip", "args": {"model": str(clip_dir)}}},
                            out_dir=tmp_path / "ev", grid_prompts=2, save_images=True, progress=False)
    res = evaluate("tiny", [lora_file], settings, log=logs.append)
    s = res.summary
    assert [m["name"] for m in s["models"]] == ["base", "red_boost"]
    assert s["rewards"] == ["red", "clip"] and s["num_prompts"] == 3 and s["seeds"] == [3, 7]
    assert (s["settings"]["height"], s["settings"]["width"]) == (16, 16)  # the tiny model's native size

    # Files, and the numbers agree between scores.jsonl, summary.json and the report.
    assert json.loads(res.summary_json.read_text())["models"] == s["models"]
    rows = [json.loads(line) for line in res.scores_jsonl.read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2 and {r["prompt"] for r in rows} == {"a red square", "a blue circle", "a green bar"}
    base_red = [r["red"] for r in rows if r["model"] == "base"]
    assert s["models"][0]["scores"]["red"]["mean"] == pytest.approx(sum(base_red) / len(base_red))
    assert f"{s['models'][0]['scores']['red']['mean']:.5g}" in res.report_md.read_text()
    assert res.report_html.read_text().count("data:image/png;base64,") == 2 + 1  # 2 grids + the chart
    assert [p.name for p in res.grids] == ["p000.png", "p001.png"]
    assert len(list((tmp_path / "ev" / "images").rglob("*.png"))) == 12
    assert "CLIP image embeddings" in s["diversity_metric"] and s["models"][0]["diversity"] > 0

    # Pairing: each row is exactly what inference.generate gives for that prompt and seed, base and tuned.
    color = build_reward("color", args=RED["args"])
    for loras, name in (([], "base"), ([(lora_file, 1.0)], "red_boost")):
        img = generate(tiny_components, ["a blue circle"], seeds=[7], loras=loras, steps=3, height=16, width=16)
        row = next(r for r in rows if r["model"] == name and r["prompt_index"] == 1 and r["seed"] == 7)
        assert float(color(img, ["a blue circle"])[0]) == pytest.approx(row["red"], abs=1e-5)
    tuned = [r["red"] for r in rows if r["model"] == "red_boost"]
    assert tuned != base_red  # the LoRA changes the images
    assert any("report" in line for line in logs)


def test_eval_command_reads_rewards_args_and_weight_zero_is_the_base_model(tmp_path, lora_file, capsys):
    out = tmp_path / "ev"
    code = main(["eval", "--model", "tiny", "--lora", str(lora_file), "--names", "zero", "--weight", "0",
                 "--prompts", "builtin:tiny", "--num-prompts", "2", "--rewards", "blue=color",
                 "--reward-arg", "blue.target=[0,0,1]", "--seeds", "2",
                 "--steps", "2", "--grid-prompts", "1", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    w = s["models"][1]["win_rate"]["blue"]
    assert s["models"][1]["name"] == "zero" and w["ties"] == w["n"] == 4 and w["delta"] == 0.0
    assert s["reward_spec"]["blue"] == {"type": "color", "args": {"target": [0, 0, 1]}}
    assert "RMS difference" in s["diversity_metric"]  # no CLIP reward: the documented pixel fallback
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


def test_eval_command_on_a_run_folder_uses_its_settings(tmp_path, lora_file, capsys):
    run = tmp_path / "run"
    cfg = load_config(ROOT / "presets" / "tiny-cpu.yaml", [f"output.dir={run}", "eval.prompts=builtin:tiny"])
    save_config(cfg, run / "config.yaml")
    assert main(["eval", "--run", str(run), "--no-progress"]) == 1
    assert "has not finished" in capsys.readouterr().err
    (run / "tiny_cpu.safetensors").write_bytes(lora_file.read_bytes())
    assert main(["eval", "--run", str(run), "--num-prompts", "1", "--seeds", "2", "--steps", "2",
                 "--grid-prompts", "0", "--no-progress"]) == 0
    s = json.loads((run / "eval" / "summary.json").read_text())
    assert s["rewards"] == ["redness"]  # the run's reward terms (clip has weight 0 in tiny-cpu: skipped)
    assert s["settings"]["guidance_scale"] == cfg.sampling.guidance_scale and s["prompts_source"] == "builtin:tiny"


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--rewards", "color", "--lora", "missing.safetensors"], "missing.safetensors': file not found"),
    (["--model", "tiny", "--rewards", "no_such_reward"], "unknown reward 'no_such_reward'"),
    (["--model", "tiny"], "--rewards is required"),
    (["--rewards", "color"], "give --model SRC"),
    (["--model", "tiny", "--rewards", "color", "--seeds", "0,x"], "seeds:"),
    (["--model", "tiny", "--rewards", "color", "--reward-arg", "clip.model=x"], "no reward 'clip' is selected"),
    (["--model", "tiny", "--rewards", "color", "--prompts", "nope.tsv"], "nope.tsv"),
])
def test_eval_command_errors_name_the_argument(tmp_path, argv, message, capsys):
    assert main(["eval", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) != 0
    assert message in capsys.readouterr().err


def test_eval_settings_report_every_problem_at_once(tmp_path, lora_file):
    assert EvalSettings().problems() == [] and EvalSettings().replace(seeds=2).seeds == 2
    bad = EvalSettings(seeds="0,x", num_prompts=0, batch_size=0, grid_prompts=-1, steps=0, guidance=0.5,
                       precision="fp8", reward_offload="gpu", names=["a", "b"], rewards="color")
    with pytest.raises(UserError) as info:
        bad.validate([lora_file, tmp_path / "missing.safetensors"])
    message = str(info.value)
    assert message.startswith("9 problems in the eval settings:\n  - seeds: ")
    for field in ("seeds:", "num_prompts:", "batch_size:", "grid_prompts:", "steps:", "guidance:", "precision:",
                  "reward_offload:", "missing.safetensors': file not found"):
        assert field in message, field
    assert len(info.value.problems) == 9 and "names: 2 name(s) for 2 LoRA(s)" not in message
    with pytest.raises(UserError, match="^names: 2 name"):
        EvalSettings(names=["a", "b"], rewards="color").validate([lora_file])
    with pytest.raises(UserError, match=r"^num_prompt: unknown eval setting \(did you mean num_prompts\?\)$"):
        EvalSettings().replace(num_prompt=3)
    with pytest.raises(UserError, match="^num_prompts: must be at least 1, got 0$"):  # one problem reads as itself
        evaluate("tiny", [], EvalSettings(num_prompts=0, rewards="color"))


def test_evaluate_run_unknown_override_and_bad_values_in_one_error(tmp_path, lora_file):
    run = tmp_path / "run"
    cfg = load_config(ROOT / "presets" / "tiny-cpu.yaml", [f"output.dir={run}", "eval.prompts=builtin:tiny"])
    save_config(cfg, run / "config.yaml")
    (run / "tiny_cpu.safetensors").write_bytes(lora_file.read_bytes())
    with pytest.raises(UserError) as info:
        evaluate_run(run, num_promts=2, sharpen=True, seeds=0, batch_size=0, progress=False)
    problems = info.value.problems
    assert problems[0] == "num_promts: unknown eval setting (did you mean num_prompts?)"
    assert problems[1].startswith("sharpen: unknown eval setting; known settings: out_dir, prompts,")
    assert [p.split(":")[0] for p in problems[2:]] == ["seeds", "batch_size"]
    assert not (run / "eval").exists()  # nothing ran
    with pytest.raises(UserError, match="^steps: must be an integer >= 1, got 0$"):  # known names: evaluate checks
        evaluate_run(run, steps=0)


def test_parse_seeds_and_reward_spec():
    assert parse_seeds(3) == parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0, 5,9") == parse_seeds([0, 5, 9]) == [0, 5, 9]
    for bad in (0, "", "1,1", [-1], True):
        with pytest.raises(UserError, match="seeds"):
            parse_seeds(bad)
    assert parse_reward_spec("aesthetic, clip") == {"aesthetic": {"type": "aesthetic", "args": {}},
                                                    "clip": {"type": "clip", "args": {}}}
    cfg = load_config(ROOT / "presets" / "tiny-cpu.yaml")
    assert parse_reward_spec(cfg.rewards.terms) == {"redness": {"type": "color", "args": {"target": [1.0, 0.0, 0.0]}}}
    assert parse_reward_spec("clip", ["clip.model=/m"])["clip"]["args"] == {"model": "/m"}
    assert parse_reward_spec("blue=color")["blue"] == {"type": "color", "args": {}}
    for bad, args in (("", ()), ("clip,clip", ()), ("clip", ["model=/m"]), ("blue=", ())):
        with pytest.raises(UserError):
            parse_reward_spec(bad, args)


# --------------------------------------------------------------------------------------------------- training


def fake_render(quality: list[float]):
    """render(prompts, seeds): grey images pushed toward red by the current `quality[0]` (the 'weights')."""

    def render(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        n = len(prompts) * len(seeds)
        img = torch.full((n, 3, 8, 8), 0.5)
        img[:, 0] += quality[0]
        return img.clamp(0, 1)

    return render


def color_mix():
    from tc_lite.rewards import RewardMix, build_reward

    return RewardMix([("red", build_reward("color", args={"target": [1, 0, 0]}), 1.0)], device="cpu", offload="none")


def test_held_out_eval_logs_improvement_and_stops_after_patience(tmp_path):
    cfg = EvalConfig(every=10, prompts="builtin:heldout", num_prompts=3, seeds=[0, 1], patience=2)
    logs: list[str] = []
    ev = HeldOutEval(cfg, tmp_path, log=logs.append, batch_size=4)
    assert len(ev.prompts) == 3 and ev.due(0) and not ev.due(5) and ev.due(10)
    quality, mix = [0.0], color_mix()
    results = []
    for step, q in ((0, 0.0), (10, 0.2), (20, 0.1), (30, 0.2), (40, 0.3)):
        quality[0] = q
        assert ev.maybe_evaluate(step + 1, fake_render(quality), mix) is None  # not an eval step
        results.append(ev.maybe_evaluate(step, fake_render(quality), mix))
        if ev.should_stop:
            break
    assert [r["best"] for r in results] == [True, True, False, False]  # 0.2 again is not an improvement
    assert ev.should_stop and step == 30 and ev.best_step == 10
    assert results[1]["num_images"] == 6 and results[1]["reward/red"] == pytest.approx(results[1]["reward"])
    assert "early stop" in ev.stop_message() and any("held-out reward" in line for line in logs)
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 10, 20, 30] and lines[-1]["bad_evals"] == 2

    # Resume at step 20: lines after it are dropped and best/patience rebuilt from the file.
    again = HeldOutEval(cfg, tmp_path, log=logs.append, resume_step=20)
    assert (again.best_step, again.bad_evals, again.due(20), again.due(30)) == (10, 1, False, True)
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0, 10, 20]


def test_held_out_eval_disabled_and_bad_input(tmp_path):
    off = HeldOutEval(EvalConfig(every=0), tmp_path)
    assert not off.due(0) and not off.should_stop and not (tmp_path / "eval.jsonl").exists()
    with pytest.raises(UserError, match="eval.prompts: .*missing.txt"):
        HeldOutEval(EvalConfig(every=5, prompts=str(tmp_path / "missing.txt")), tmp_path)
    with pytest.raises(UserError, match="eval.seeds"):
        HeldOutEval(EvalConfig(every=5, seeds=[]), tmp_path)
    logs: list[str] = []
    HeldOutEval(EvalConfig(every=5, prompts="builtin:tiny", num_prompts=2), tmp_path, log=logs.append,
                train_prompts=["a red square"])
    assert any("also training prompts" in line for line in logs)


def test_held_out_eval_with_the_recipe_render(tmp_path, tiny_components):
    """The integration the recipe makes: its own render (tuned encoder on every step) and its RewardMix."""
    from tc_lite.train import Recipe

    cfg = load_config(ROOT / "presets" / "tiny-cpu.yaml", [f"output.dir={tmp_path / 'run'}", "logging.progress=false",
                                                            "eval.every=1", "eval.prompts=builtin:tiny",
                                                            "eval.num_prompts=2", "eval.seeds=[0,1]"])
    recipe = Recipe(cfg, log=lambda s: None).setup()
    ev = HeldOutEval(cfg.eval, recipe.out, log=lambda s: None)
    record = ev.evaluate(0, recipe.render, recipe.rewards)
    images = recipe.render(ev.prompts, [0, 1])
    expected = float(recipe.rewards(images, [p for p in ev.prompts for _ in (0, 1)])[0].mean())
    assert record["reward"] == pytest.approx(expected, abs=1e-6) and record["num_images"] == 4
    assert all(p.grad is None for p in recipe.params)  # no gradients from evaluation


# --------------------------------------------------------------------------------------------------- TensorBoard


class FakeWriter:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, tuple, int]] = []
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, image, step):
        self.images.append((tag, tuple(image.shape), step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tracker_is_a_noop_when_disabled_or_missing(tmp_path, monkeypatch):
    assert isinstance(make_tracker(False, tmp_path / "tb"), NullTracker)
    monkeypatch.setattr("tc_lite.tracking.tensorboard_available", lambda: False)
    logs: list[str] = []
    tracker = make_tracker(True, tmp_path / "tb", log=logs.append)
    assert isinstance(tracker, NullTracker) and "pip install tensorboard" in logs[0]
    tracker.log_scalars({"reward": 1.0}, 1)
    tracker.close()
    assert not (tmp_path / "tb").exists()


def test_tensorboard_tracker_logs_numeric_fields(tmp_path):
    from PIL import Image

    writer = FakeWriter()
    tracker = TensorBoardTracker(tmp_path, writer=writer)
    tracker.log_scalars({"step": 3, "reward": 0.5, "reward/red": 0.25, "grad_steps": [2], "skipped": False,
                         "loss": float("nan")}, 3)
    tracker.log_scalars({"reward": 0.7}, 3, prefix="eval/")
    tracker.log_image("samples", Image.new("RGB", (8, 4)), 3)
    tracker.close()
    assert writer.scalars == [("reward", 0.5, 3), ("reward/red", 0.25, 3), ("eval/reward", 0.7, 3)]
    assert writer.images == [("samples", (3, 4, 8), 3)] and writer.closed


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (pip install tensorboard)")
    tracker = make_tracker(True, tmp_path / "tb")
    assert isinstance(tracker, TensorBoardTracker)
    tracker.log_scalars({"reward": 0.5}, 1)
    tracker.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------------------- recipe integration


def _recipe_integrated() -> bool:
    from tc_lite.train import Recipe

    return hasattr(Recipe, "evaluate") and hasattr(Recipe, "write_plots")


@pytest.mark.skipif(not _recipe_integrated(), reason="train.py does not call tc_lite.tracking yet (issue 7 patch)")
def test_training_evaluates_held_out_prompts_stops_early_and_plots(tmp_path, tiny_components):
    """A reward capped far below anything reachable never improves, so patience 2 stops the run after step 2."""
    from tc_lite.train import run_training

    out = tmp_path / "run"
    cfg = load_config(ROOT / "presets" / "tiny-cpu.yaml", [
        f"output.dir={out}", "logging.progress=false", "logging.sample_every=0", "train.steps=6",
        "eval.every=1", "eval.patience=2", "eval.prompts=builtin:tiny", "eval.num_prompts=2",
        "rewards.terms.redness.target=-5"])
    logs: list[str] = []
    path = run_training(cfg, log=logs.append)
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 1, 2] and [r["best"] for r in evals] == [True, False, False]
    assert evals[0]["reward"] == pytest.approx(-5.0) and evals[0]["num_images"] == 2
    assert any(line.startswith("early stop") for line in logs) and path.is_file()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert {p.name for p in (out / "plots").glob("*.png")} == {"reward.png", "reward_parts.png", "loss.png", "eval.png"}
