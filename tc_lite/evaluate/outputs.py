"""What an evaluation leaves behind: the scores collected chunk by chunk (``Collector``: scores, embeddings, grid
thumbnails, one row per image, optionally every image), and the files written at the end (``write_outputs``:
summary.json, scores.jsonl, grids, scores.png, report.md / report.html), described by ``EvalResult``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tc_lite.evaluate.stats import summarize

_THUMB = 256  # grid cells are at most this many pixels on a side (keeps report.html small)


@dataclass
class EvalResult:
    """What ``evaluate`` produced: the summary (also in summary.json) and where each file went."""

    summary: dict[str, Any]
    out_dir: Path
    report_md: Path
    report_html: Path
    summary_json: Path
    scores_jsonl: Path
    grids: list[Path] = field(default_factory=list)

    def table(self) -> str:
        """The scores table as plain text (for a terminal or a notebook cell)."""
        s = self.summary
        width = max(len(m["name"]) for m in s["models"])
        lines = ["model".ljust(width) + "".join(f"  {r:>22}" for r in s["rewards"]) + "  diversity"]
        for m in s["models"]:
            cells = "".join(f"  {m['scores'][r]['mean']:>12.5g} ± {m['scores'][r]['se']:<7.2g}" for r in s["rewards"])
            div = "n/a" if m["diversity"] is None else f"{m['diversity']:.4g}"
            lines.append(m["name"].ljust(width) + cells + f"  {div}" + ("  (possible collapse)" if m["collapse"] else ""))
            for r in s["rewards"]:
                w = m["win_rate"].get(r)
                if w:
                    lines.append(f"  vs base, {r}: win rate {100 * w['rate']:.0f}%, Δ {w['delta']:+.4g} ± {w['delta_se']:.2g}")
        return "\n".join(lines)


class Collector:
    """Keeps what the report needs as chunks are scored (scores, embeddings, grid thumbnails, rows), nothing more:
    memory does not grow with the images, only with a few numbers per image."""

    def __init__(self, out: Path, model_names: list[str], prompts: list[str], seeds: list[int], labels: list[str],
                 grid_prompts: int, save_images: bool):
        self.out, self.model_names, self.prompts, self.seeds, self.labels = out, model_names, prompts, seeds, labels
        self.save_images = save_images
        self.scores = {m: {r: torch.zeros(len(prompts), len(seeds)) for r in labels} for m in model_names}
        self.embeds: dict[str, list[torch.Tensor]] = {m: [] for m in model_names}
        self.n_grid = min(grid_prompts, len(prompts))
        self.thumbs: list[list[torch.Tensor]] = [[] for _ in range(self.n_grid)]  # per grid prompt: [S,3,h,w] per model
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, idx: list[int], images: torch.Tensor, parts: Mapping[str, torch.Tensor],
            embeds: torch.Tensor) -> None:
        """One model's images of prompts ``idx`` (prompt-major, every seed), their reward parts and embeddings."""
        n_seeds = len(self.seeds)
        scores = self.scores[name]
        for r in self.labels:
            scores[r][idx] = parts[r].float().cpu().view(len(idx), n_seeds)
        self.embeds[name].append(embeds.view(len(idx), n_seeds, -1))
        for k, i in enumerate(idx):
            block = images[k * n_seeds : (k + 1) * n_seeds]
            if i < self.n_grid:
                self.thumbs[i].append(_thumbs(block))
            for si, seed in enumerate(self.seeds):
                self.rows.append({"model": name, "prompt_index": i, "prompt": self.prompts[i], "seed": seed,
                                  **{r: float(scores[r][i, si]) for r in self.labels}})
                if self.save_images:
                    _save_image(block[si], self.out / "images" / name / f"p{i:04d}_s{seed}.png")

    def write(self, metric: str, metric_text: str, header: dict[str, Any], t_start: float,
              log: Callable[[str], None]) -> EvalResult:
        return write_outputs(self.out, self.model_names, self.prompts, self.seeds, self.labels, self.scores,
                             {m: torch.cat(v) for m, v in self.embeds.items()}, metric, metric_text, self.thumbs,
                             self.rows, header=header, t_start=t_start, log=log)


def _thumbs(images: torch.Tensor) -> torch.Tensor:
    h, w = images.shape[-2:]
    if max(h, w) > _THUMB:
        scale = _THUMB / max(h, w)
        images = F.interpolate(images, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _save_grid(cells: torch.Tensor, names: list[str], seeds: list[int], path_stem: Path) -> Path:
    """cells [M, S, 3, h, w] uint8 -> one grid, rows = models (labelled left), columns = seeds (labelled on top);
    PNG for small cells, JPEG for photo-sized ones (a 4x3 grid of 256 px cells is ~0.2 MB instead of ~2 MB)."""
    from PIL import Image, ImageDraw

    from tc_lite.io import atomic_path
    from tc_lite.outputs import make_grid

    m, s = cells.shape[:2]
    body = make_grid(cells.flatten(0, 1).float() / 255.0, rows=m)  # unlabelled: the cell size is width / S
    cw, ch = body.width // s, body.height // m
    left, top = 120, 18
    canvas = Image.new("RGB", (left + body.width, top + body.height), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, seed in enumerate(seeds):
        draw.text((left + j * cw + 4, 3), f"seed {seed}", fill="black")
    for i, name in enumerate(names):
        draw.text((4, top + i * ch + 4), name[:18], fill="black")
    small = max(cells.shape[-2:]) <= 128
    path = path_stem.with_suffix(".png" if small else ".jpg")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG" if small else "JPEG", quality=90)
    return path


def _save_image(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    from tc_lite.io import atomic_path

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def write_outputs(out: Path, model_names: list[str], prompts: list[str], seeds: list[int], labels: list[str],
                  scores: dict[str, dict[str, torch.Tensor]], embeds: dict[str, torch.Tensor], metric: str,
                  metric_text: str, thumbs: list[list[torch.Tensor]], rows: list[dict[str, Any]],
                  header: dict[str, Any], t_start: float, log: Callable[[str], None]) -> EvalResult:
    import json

    from tc_lite.io import save_json_atomic, save_text_atomic
    from tc_lite.plots import plot_eval
    from tc_lite.report import write_report

    grid_paths = []
    grids = []
    for i, per_model in enumerate(thumbs):
        path = _save_grid(torch.stack(per_model), model_names, seeds, out / "grids" / f"p{i:03d}")
        grid_paths.append(path)
        grids.append({"prompt": prompts[i], "path": path.relative_to(out).as_posix()})
    summary: dict[str, Any] = {
        **header,
        "num_prompts": len(prompts),
        "seeds": seeds,
        "rewards": labels,
        "models": summarize(scores, embeds, metric),
        "diversity_metric": metric_text,
        "grids": grids,
        "sec": round(time.perf_counter() - t_start, 2),
    }
    summary["plot"] = plot_eval(summary, out / "scores.png").relative_to(out).as_posix()
    summary_path = save_json_atomic(summary, out / "summary.json")
    scores_path = save_text_atomic("".join(json.dumps(r) + "\n" for r in rows), out / "scores.jsonl")
    md, page = write_report(summary, out)
    result = EvalResult(summary, out, md, page, summary_path, scores_path, grid_paths)
    log(result.table())
    for m in summary["models"]:
        if m["collapse"]:
            log(f"warning: {m['name']}: diversity {m['diversity']:.3g} is {m['diversity_ratio']:.0%} of the base "
                "model's; look at the grids for repeated images (possible collapse / reward hacking)")
    log(f"eval: report {page} ({summary['sec']:.0f} s)")
    return result
