"""`scripts/gpu_check.sh` (`python -m tc_lite.bench.gpu_check`): the CPU subset writes its JSON and markdown, device
names become file names, and a failing, missing or overlong check is recorded while the others still run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tc_lite.bench import gpu_check
from tc_lite.bench.gpu_check import run_all, sanitize_device_name, write_report
from tc_lite.bench.gpu_checks import CPU_CHECKS, GPU_CHECKS, Check, Context, Unavailable

RECORD_KEYS = {"name", "title", "status", "budget_s", "wall_s", "summary", "result", "error"}


def test_cpu_subset_writes_json_and_markdown(tmp_path, capsys):
    t0 = time.perf_counter()
    assert gpu_check.main(["--out", str(tmp_path), "--cpu"]) == 0
    assert time.perf_counter() - t0 < 60
    report = json.loads((tmp_path / "cpu-only.json").read_text())
    assert {"schema", "device", "device_slug", "cuda", "mode", "note", "started_at", "finished_at", "wall_s",
            "total_budget_s", "environment", "counts", "checks"} <= set(report)
    assert report["device_slug"] == "cpu-only" and report["cuda"] is False and report["mode"] == "cpu-subset"
    assert [c["name"] for c in report["checks"]] == [c.name for c in CPU_CHECKS]
    for rec in report["checks"]:
        assert set(rec) == RECORD_KEYS
        assert rec["status"] == "ok", rec
        assert 0 < rec["wall_s"] <= rec["budget_s"]
    assert report["counts"]["ok"] == len(CPU_CHECKS)
    assert "torch" in report["environment"] and "bitsandbytes" in report["environment"]
    speed = report["checks"][2]["result"]["report"]
    assert speed["steps_per_hour"] > 0 and speed["repeats"] == 1 and speed["cached_step_s"] is not None
    md = (tmp_path / "cpu-only.md").read_text()
    assert md.startswith("# tc-lite GPU check: CPU only")
    assert "| check | status | result | time / budget (s) |" in md
    assert all(f"`{c.name}`" in md for c in CPU_CHECKS)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in report["note"] and "no CUDA GPU" in md
        assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H200", "nvidia-h200"),
    ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
    ("NVIDIA A100-SXM4-80GB", "nvidia-a100-sxm4-80gb"),
    ("  Tesla V100-PCIE-16GB ", "tesla-v100-pcie-16gb"),
    ("AMD Instinct MI300X (gfx942:sramecc+:xnack-)", "amd-instinct-mi300x-gfx942-sramecc-xnack"),
    ("../../etc/passwd", "etc-passwd"),
    ("", "unknown-gpu"),
    (None, "unknown-gpu"),
    ("***", "unknown-gpu"),
    ("x" * 100, "x" * 64),
])
def test_device_names_become_file_names(name, slug):
    assert sanitize_device_name(name) == slug


def _fake(name: str, fn, budget: float = 10.0) -> Check:
    return Check(name, f"fake {name}", budget, fn)


def test_a_failing_check_is_recorded_and_the_rest_continue(tmp_path):
    ran = []

    def ok(ctx):
        ran.append("ok")
        return {"summary": "fine", "value": float("nan")}

    def boom(ctx):
        raise RuntimeError("boom: out of something")

    def missing(ctx):
        raise Unavailable("bitsandbytes not installed")

    def doubtful(ctx):
        return {"summary": "ran", "warning": "measured peak exceeds the estimate by 20%"}

    def hangs(ctx):
        try:
            time.sleep(30)
        except Exception:  # a check's own broad except must not swallow the timeout
            pass
        return {"summary": "never"}

    def last(ctx):
        ran.append("last")
        return {"summary": "still ran"}

    checks = [_fake("ok", ok), _fake("boom", boom), _fake("missing", missing), _fake("doubtful", doubtful),
              _fake("hangs", hangs, budget=1.0), _fake("last", last)]
    report = {"schema": gpu_check.SCHEMA, "device": "test", "device_slug": "test-device", "cuda": False,
              "mode": "test", "note": "a test", "started_at": "now", "total_budget_s": 100.0,
              "environment": gpu_check.environment(False)}
    updates = []
    run_all(checks, Context(), isolate=False, total_budget=100.0, report=report,
            on_update=lambda r: updates.append(len(r["checks"])), progress=lambda m: None)
    status = {r["name"]: r["status"] for r in report["checks"]}
    assert status == {"ok": "ok", "boom": "failed", "missing": "unavailable", "doubtful": "warn", "hangs": "timeout",
                      "last": "ok"}
    assert ran == ["ok", "last"] and updates[:6] == [1, 2, 3, 4, 5, 6]
    recs = {r["name"]: r for r in report["checks"]}
    assert "RuntimeError: boom: out of something" in recs["boom"]["error"] and "boom" in recs["boom"]["summary"]
    assert recs["missing"]["summary"] == "bitsandbytes not installed" and recs["missing"]["error"] is None
    assert "20%" in recs["doubtful"]["summary"]
    assert recs["hangs"]["wall_s"] < 5 and "budget" in recs["hangs"]["error"]
    assert recs["ok"]["result"]["value"] == "nan"  # strict JSON
    assert report["counts"] == {"ok": 2, "warn": 1, "unavailable": 1, "failed": 1, "timeout": 1, "skipped": 0}
    json_path, md_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["counts"]["failed"] == 1
    md = md_path.read_text()
    assert "## Errors" in md and "### boom" in md and "RuntimeError: boom" in md
    assert "| fake boom (`boom`) | failed |" in md


def test_the_total_budget_skips_what_no_longer_fits():
    report: dict = {}
    run_all([_fake("a", lambda ctx: {"summary": "x"})], Context(), isolate=False, total_budget=0.0, report=report,
            progress=lambda m: None)
    assert report["checks"][0]["status"] == "skipped" and "total budget" in report["checks"][0]["summary"]


def test_a_check_runs_in_its_own_process():
    rec = gpu_check.run_isolated(CPU_CHECKS[1], Context(), budget=60.0)  # steps/tiny
    assert rec["status"] == "ok", rec
    assert set(rec) == RECORD_KEYS and rec["result"]["device"] == "cpu"


def test_the_gpu_checks_cover_the_issue_within_eight_minutes(capsys):
    names = [c.name for c in GPU_CHECKS]
    for wanted in ("memory/aesthetic", "memory/all-rewards", "memory/aesthetic-b4-12gb", "precision/fp16",
                   "precision/bf16", "optim/adamw8bit", "attention/xformers", "offload/cpu", "offload/sequential",
                   "speed/aesthetic"):
        assert wanted in names
    assert gpu_check.TOTAL_BUDGET_S <= 8 * 60 - 10
    assert gpu_check.main(["--list"]) == 0
    assert "offload/sequential" in capsys.readouterr().out


def test_a_check_that_needs_more_time_than_is_left_is_skipped_with_the_command_to_run_it():
    report: dict = {}
    ran = []
    long = Check("memory/long", "needs 50 s", 100.0, lambda ctx: ran.append(1) or {"summary": "x"}, min_s=50.0)
    run_all([long], Context(), isolate=False, total_budget=20.0, report=report, progress=lambda m: None)
    rec = report["checks"][0]
    assert not ran and rec["status"] == "skipped"
    assert "needs 50 s" in rec["summary"] and "--only memory/long" in rec["summary"]


def test_the_sdxl_checks_measure_full_size_sdxl_without_downloads(capsys):
    """memory/sdxl-12gb is in the GPU run (last, with a minimum time), memory/sdxl-aesthetic on request; the model
    they build is SDXL base from the configs the estimator reads (here on 'meta': 3.5B random weights are a GPU's
    job), including the fp16-safe VAE's force_upcast: false for sdxl-12gb."""
    from tc_lite.bench.gpu_checks import CHECKS, SDXL_EXTRA_CHECKS
    from tc_lite.bench.models import build_sdxl_components
    from tc_lite.config import load_config
    from tc_lite.families import FAMILIES
    from tc_lite.memory.architectures import resolve_architecture

    assert GPU_CHECKS[-1].name == "memory/sdxl-12gb" and GPU_CHECKS[-1].min_s >= 60
    assert [c.name for c in SDXL_EXTRA_CHECKS] == ["memory/sdxl-aesthetic"] and "memory/sdxl-aesthetic" in CHECKS
    assert "memory/aesthetic-te-unet" in CHECKS and "memory/aesthetic-te-unet" not in [c.name for c in GPU_CHECKS]
    assert gpu_check.main(["--list"]) == 0
    assert "memory/sdxl-aesthetic" in capsys.readouterr().out
    for preset, upcast in (("sdxl-12gb.yaml", False), ("sdxl-aesthetic.yaml", True)):
        cfg = load_config(Path(__file__).resolve().parents[1] / "presets" / preset)
        comps = build_sdxl_components(cfg.model, torch.float16, device="meta")
        with torch.device("meta"):
            ref = FAMILIES["sdxl"].meta_components(resolve_architecture(cfg))
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
            assert count(getattr(comps, name)) == count(getattr(ref, name)), name
        assert comps.vae.config.force_upcast is upcast and comps.unet.dtype == torch.float16
        assert comps.tokenizer_2.pad_token == "!" and comps.family == "sdxl"
