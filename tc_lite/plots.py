"""Training curves from a run folder: reward, each reward part, loss (and held-out eval) as PNG files.

Reads ``metrics.jsonl`` (one object per logged optimizer step, written by the recipe) and, when present,
``eval.jsonl`` (held-out evaluations, see ``tc_lite.tracking``), and writes ``<run>/plots/*.png``. It is called
at the end of a training run and on demand (``python -m tc_lite plot RUN_DIR``), so a run that crashed or is still
going can be inspected too: a half-written last line is skipped.

Why these choices:

* Per-step rewards are noisy (one batch of prompts per step), so every curve shows the raw values faintly and an
  exponential moving average on top (TensorBoard's debiased EMA, so the start is not dragged toward 0).
* Reward parts live on different scales (aesthetic ~5, CLIP x100 ~25, colour ~0.2), so each part gets its own
  panel instead of sharing one axis where the small ones would look flat.
* Matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global backend switch, so calling this
  from a notebook does not break its inline plots, and it works headless.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tc_lite.errors import UserError

__all__ = ["PLOT_FILES", "ema", "plot_curves", "plot_eval", "plot_run", "read_jsonl", "series"]

# What plot_run writes (eval.png only when eval.jsonl exists).
PLOT_FILES = ("reward.png", "reward_parts.png", "loss.png", "eval.png")
_DEFAULT_SMOOTHING = 0.9


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object in ``path``; a torn or garbled line (a run killed mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def series(rows: Sequence[dict[str, Any]], key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) for the rows where ``key`` holds a finite number (skipped steps log NaN/inf; those are dropped)."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        y = _number(row.get(key))
        if y is None:
            continue
        x = _number(row.get(x_key))
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


def ema(values: Sequence[float], weight: float = _DEFAULT_SMOOTHING) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider); ``weight=0`` returns the input."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1.0 - weight) * v
        norm = weight * norm + (1.0 - weight)
        out.append(acc / norm)
    return out


def _new_figure(n_panels: int, title: str) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n_panels]


def _panel(ax: Any, x: list[float], y: list[float], label: str, smoothing: float, color: str = "C0") -> None:
    if len(y) > 1 and smoothing > 0:
        ax.plot(x, y, color=color, alpha=0.25, linewidth=1)
        ax.plot(x, ema(y, smoothing), color=color, linewidth=2, label=f"{label} (EMA {smoothing:g})")
    else:
        ax.plot(x, y, color=color, linewidth=2, marker="o" if len(y) < 30 else None, label=label)
    ax.set_title(label)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tc_lite.io import atomic_path

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _reward_parts(rows: Sequence[dict[str, Any]], prefix: str = "reward/") -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k.startswith(prefix):
                names.setdefault(k, None)
    return list(names)


def plot_curves(rows: Sequence[dict[str, Any]], out_dir: Path, smoothing: float = _DEFAULT_SMOOTHING,
                eval_rows: Sequence[dict[str, Any]] = (), title: str = "") -> list[Path]:
    """Write the PNGs for already-read metric rows; returns the paths written (see ``PLOT_FILES``)."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    prefix = f"{title}: " if title else ""

    x, y = series(rows, "reward")
    if y:
        fig, (ax,) = _new_figure(1, f"{prefix}reward (weighted total, higher is better)")
        _panel(ax, x, y, "reward", smoothing)
        written.append(_save(fig, out_dir / "reward.png"))

    parts = [k for k in _reward_parts(rows) if series(rows, k)[1]]
    if parts:
        fig, axes = _new_figure(len(parts), f"{prefix}each reward (unweighted)")
        for i, (ax, key) in enumerate(zip(axes, parts, strict=True)):
            _panel(ax, *series(rows, key), key.split("/", 1)[1], smoothing, color=f"C{i % 10}")
        written.append(_save(fig, out_dir / "reward_parts.png"))

    loss_keys = [k for k in ("loss", "grad_norm", "lr") if series(rows, k)[1]]
    if loss_keys:
        fig, axes = _new_figure(len(loss_keys), f"{prefix}optimisation")
        for i, (ax, key) in enumerate(zip(axes, loss_keys, strict=True)):
            _panel(ax, *series(rows, key), key, smoothing if key != "lr" else 0.0, color=f"C{(i + 3) % 10}")
        written.append(_save(fig, out_dir / "loss.png"))

    if eval_rows:
        keys = ["reward"] + _reward_parts(eval_rows)
        keys = [k for k in keys if series(eval_rows, k)[1]]
        if keys:
            fig, axes = _new_figure(len(keys), f"{prefix}held-out evaluation (no smoothing)")
            for i, (ax, key) in enumerate(zip(axes, keys, strict=True)):
                _panel(ax, *series(eval_rows, key), key.split("/", 1)[-1], 0.0, color=f"C{i % 10}")
                best = [r for r in eval_rows if r.get("best")]
                if best and key == "reward":
                    ax.axvline(best[-1]["step"], color="k", linestyle=":", label="best")
                    ax.legend(fontsize=8)
            written.append(_save(fig, out_dir / "eval.png"))
    return written


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, smoothing: float = _DEFAULT_SMOOTHING) -> list[Path]:
    """Plot a run folder's ``metrics.jsonl`` (and ``eval.jsonl``) to ``<run>/plots/`` (or ``out_dir``).

    Raises UserError when the folder holds no metrics yet, naming what was expected.
    """
    run = Path(run_dir).expanduser()
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"plot: smoothing must be in [0, 1) (0 = raw values), got {smoothing}")
    if not run.is_dir():
        raise UserError(f"plot: run folder {str(run)!r} does not exist; pass the output.dir of a training run")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"plot: {str(metrics)!r} not found; is {str(run)!r} a tc-lite run folder (output.dir)? "
                        "metrics.jsonl appears after the first logged step")
    rows = read_jsonl(metrics)
    eval_path = run / "eval.jsonl"
    eval_rows = read_jsonl(eval_path) if eval_path.is_file() else []
    if not rows and not eval_rows:
        raise UserError(f"plot: {str(metrics)!r} holds no complete step yet; try again after a few steps")
    return plot_curves(rows, Path(out_dir) if out_dir is not None else run / "plots", smoothing,
                       eval_rows=eval_rows, title=run.name)


def plot_eval(summary: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of an evaluation summary (``tc_lite.evaluate``): one panel per reward, one bar per model, ± SE.

    Panels, not one shared axis, because rewards live on different scales; the y range hugs the bars (a zero
    baseline would hide a 5.26 -> 5.88 aesthetic gain).
    """
    rewards, models = summary["rewards"], summary["models"]
    fig, axes = _new_figure(max(1, len(rewards)), "mean ± standard error per reward")
    names = [m["name"] for m in models]
    for ax, r in zip(axes, rewards, strict=True):
        means = [m["scores"][r]["mean"] for m in models]
        ses = [m["scores"][r]["se"] for m in models]
        ax.bar(range(len(models)), means, yerr=ses, capsize=4, color=[f"C{i % 10}" for i in range(len(models))])
        lo = min(a - b for a, b in zip(means, ses, strict=True))
        hi = max(a + b for a, b in zip(means, ses, strict=True))
        pad = 0.15 * (hi - lo) or 0.05 * max(1e-6, abs(hi))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(models)), names, rotation=20 if len(models) > 3 else 0)
        ax.set_title(r)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, Path(path))
