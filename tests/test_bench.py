"""`python -m tc_lite bench memory|speed`: the commands run, print what they promise, and refuse what cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tc_lite.cli import main
from tc_lite.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "presets" / "tiny-cpu.yaml")


def test_bench_memory_json_and_table(capsys):
    assert main(["bench", "memory", TINY, "train.batch_size=2", "--json", "--no-measure"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] > sum(out["resident_bytes"].values()) > 0
    assert out["setting"]["batch_size"] == 2 and "measured" not in out
    phases = [p["phase"] for p in out["phases"]]
    assert phases[:2] == ["encode", "sampling"] and phases[-1] == "optimizer"
    assert set(out["peak_kinds_bytes"]) == {"parameters", "activations", "gradients", "optimizer"}
    assert main(["bench", "memory", TINY, "--no-measure"]) == 0
    table = capsys.readouterr().out
    assert "estimated peak GPU memory" in table and "grad steps backward" in table
    assert "smallest card" not in table  # the tiny preset runs on the CPU: no card to size


def test_bench_memory_names_the_smallest_card(capsys):
    from tc_lite.memory.plan import budget_bytes

    assert main(["bench", "memory", TINY, "memory.device=auto", "--json", "--no-measure"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(budget_bytes(out["smallest_card_gb"]) - out["peak_bytes"]) < 0.01 * 2**30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_bench_memory_measure_needs_cuda(capsys):
    assert main(["bench", "memory", TINY, "--measure"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_reports_config_errors(capsys):
    assert main(["bench", "memory", TINY, "sampling.grad_stepz=2"]) == 2
    assert "did you mean 'grad_steps'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_bench_speed_refuses_a_full_model_on_the_cpu(capsys):
    assert main(["bench", "speed", str(ROOT / "presets" / "aesthetic.yaml")]) == 1
    assert "--model tiny or --model mid" in capsys.readouterr().err


def test_speed_report_on_the_tiny_model(tmp_path, tiny_components):
    from tc_lite.commands.bench import format_speed, speed_report  # the CLI module re-exports tc_lite.bench.speed

    cfg = load_config(TINY, [f"output.dir={tmp_path}", "sampling.steps=4", "sampling.grad_steps=1",
                             "train.batch_size=1"])
    rep = speed_report(cfg, repeats=1)
    assert rep["sampling_s"] > 0 and rep["diffusers_sampling_s"] > 0 and rep["step_s"] > 0
    assert set(rep["parts_s"]) == {"no-grad steps", "grad steps (fwd, recompute, bwd)", "decode fwd+bwd",
                                   "reward fwd+bwd", "optimizer"}
    assert rep["cached_step_s"] is not None and rep["steps_per_hour"] > 0
    text = format_speed(rep)
    assert "(a)" in text and "(b)" in text and "(c)" in text and "steps/hour" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_bench_speed_refuses_random_sd15_on_the_cpu(capsys):
    assert main(["bench", "speed", str(ROOT / "presets" / "aesthetic.yaml"), "--model", "sd15"]) == 1
    assert "--model tiny or --model mid" in capsys.readouterr().err


def test_run_steps_reports_each_step(tmp_path):
    from tc_lite.bench.memory import run_steps

    cfg = load_config(TINY, ["sampling.steps=3", "sampling.grad_steps=1", "train.batch_size=1"])
    r = run_steps(cfg, 2)
    assert len(r["step_s"]) == len(r["loss"]) == len(r["skipped"]) == 2 and r["skipped"] == [False, False]
    assert r["precision"] == "fp32" and r["scale"] is None and r["optimizer"] == "AdamW" and r["attention"] == "sdpa"
    assert r["max_allocated"] is None  # no CUDA: nothing to measure


def test_sd15_with_random_weights_has_sd15s_shapes():
    from tc_lite.bench.models import build_sd15_components

    comps = build_sd15_components(torch.float16, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert round(count(comps.unet) / 1e6) == 860 and round(count(comps.text_encoder) / 1e6) == 123
    assert round(count(comps.vae) / 1e6) == 84
    assert comps.unet.dtype == torch.float16 and not any(p.requires_grad for p in comps.unet.parameters())
    assert comps.vae_scale_factor == 8 and comps.latent_channels == 4 and len(comps.tokenizer) == 49408


def test_random_rewards_replace_the_built_ins_in_a_config():
    from tc_lite.bench.random_rewards import FACTORY, random_rewards

    cfg = random_rewards(load_config(str(ROOT / "presets" / "all-rewards.yaml"), ["rewards.terms.clip.weight=0"]))
    terms = cfg.rewards.terms
    assert terms["clip"].type is None  # switched off: left alone
    assert all(terms[n].type == FACTORY and terms[n].args["kind"] == n for n in ("aesthetic", "pickscore", "hpsv2"))
    assert terms["hpsv2"].args["version"] == "v2.0"  # the reward's own args travel along, ignored
    from tc_lite.preflight import preflight_problems

    assert preflight_problems(cfg) == []


def test_random_rewards_are_the_built_in_code_on_random_towers(monkeypatch):
    """Each kind scores [B] finite values with gradients to the images; aesthetic and clip share one tower (the
    CLIP shapes are shrunk here: the real ViT-L/H take 10-20 s each to initialise on a CPU)."""
    from tc_lite.bench import random_rewards as rr

    small = {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "patch_size": 14, "image_size": 224},
             "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "max_position_embeddings": 77, "vocab_size": 49408},
             "projection_dim": 16}
    monkeypatch.setattr(rr, "CLIP_ARCHITECTURES", {"ViT-L/14": small, "ViT-H/14": small})
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    rewards = {kind: rr.RandomReward(kind, version="v2.0") for kind in ("aesthetic", "clip", "pickscore", "hpsv2")}
    for kind, reward in rewards.items():
        scores = reward(images, ["a cat", "a dog"])
        assert scores.shape == (2,) and torch.isfinite(scores).all(), kind
        (grad,) = torch.autograd.grad(scores.sum(), images)
        assert grad.abs().sum() > 0, kind
    assert rewards["aesthetic"].net.vision_model is rewards["clip"].model.vision_model
    assert rewards["pickscore"].model.vision_model is not rewards["clip"].model.vision_model
