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
    from tc_lite.commands.bench import format_speed, speed_report

    cfg = load_config(TINY, [f"output.dir={tmp_path}", "sampling.steps=4", "sampling.grad_steps=1",
                             "train.batch_size=1"])
    rep = speed_report(cfg, repeats=1)
    assert rep["sampling_s"] > 0 and rep["diffusers_sampling_s"] > 0 and rep["step_s"] > 0
    assert set(rep["parts_s"]) == {"no-grad steps", "grad steps (fwd, recompute, bwd)", "decode fwd+bwd",
                                   "reward fwd+bwd", "optimizer"}
    assert rep["cached_step_s"] is not None and rep["steps_per_hour"] > 0
    text = format_speed(rep)
    assert "(a)" in text and "(b)" in text and "(c)" in text and "steps/hour" in text
