"""Training curves from metrics.jsonl / eval.jsonl: the files appear, bad lines are survived, errors name the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tc_lite.cli import main
from tc_lite.errors import UserError
from tc_lite.plots import ema, plot_eval, plot_run, read_jsonl, series


def write_run(run: Path, steps: int = 30, parts: tuple[str, ...] = ("redness", "clip"), torn: bool = True) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": -0.01 * s, "reward": 0.01 * s, "grad_norm": 1.0 + math.sin(s), "lr": 1e-3,
               "grad_steps": [2], "skipped": False}
        for i, p in enumerate(parts):
            rec[f"reward/{p}"] = 0.01 * s + 10 * i
        if s == 5:
            rec["loss"] = float("nan")  # a skipped non-finite step: JSON writes NaN
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 31, "rew'  # a run killed mid-write
    (run / "metrics.jsonl").write_text(text)
    return run


def is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_plot_run_writes_curves_and_survives_torn_and_nan_lines(tmp_path):
    run = write_run(tmp_path / "run")
    paths = plot_run(run)
    assert [p.name for p in paths] == ["reward.png", "reward_parts.png", "loss.png"]
    assert all(p.parent == run / "plots" and is_png(p) for p in paths)
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 30  # the torn last line is skipped
    x, y = series(rows, "loss")
    assert 5 not in x and len(y) == 29  # NaN dropped, not plotted as a gap-maker or a crash


def test_eval_curve_when_eval_jsonl_exists(tmp_path):
    run = write_run(tmp_path / "run", torn=False)
    (run / "eval.jsonl").write_text("".join(
        json.dumps({"step": s, "reward": 0.1 * s, "reward/redness": 0.1 * s, "best": True}) + "\n" for s in (0, 10, 20)))
    paths = plot_run(run, out_dir=tmp_path / "elsewhere", smoothing=0.0)
    assert [p.name for p in paths] == ["reward.png", "reward_parts.png", "loss.png", "eval.png"]
    assert all(p.parent == tmp_path / "elsewhere" for p in paths)


def test_ema_is_debiased_and_zero_weight_is_identity():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no drag toward 0 at the start
    assert ema([1.0, 5.0, 3.0], 0.0) == [1.0, 5.0, 3.0]
    smooth = ema([0.0] * 10 + [1.0] * 10, 0.8)
    assert 0.0 < smooth[12] < 1.0 and smooth[-1] > smooth[12]
    with pytest.raises(ValueError):
        ema([1.0], 1.0)


def test_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plot_run(tmp_path / "nope")
    with pytest.raises(UserError, match="metrics.jsonl.*not found"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no complete step yet"):
        plot_run(tmp_path)
    with pytest.raises(UserError, match="smoothing"):
        plot_run(write_run(tmp_path / "r"), smoothing=1.5)


def test_plot_command(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    assert "reward.png" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "error: plot: run folder" in capsys.readouterr().err


def test_plot_eval_bar_chart(tmp_path):
    summary = {"rewards": ["aesthetic", "clip"], "models": [
        {"name": "base", "scores": {"aesthetic": {"mean": 5.26, "se": 0.02}, "clip": {"mean": 26.0, "se": 0.3}}},
        {"name": "tuned", "scores": {"aesthetic": {"mean": 5.88, "se": 0.02}, "clip": {"mean": 26.0, "se": 0.3}}},
    ]}
    assert is_png(plot_eval(summary, tmp_path / "scores.png"))
