"""What a run shows and leaves behind: the progress bar, metrics.jsonl, and labelled sample grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class MetricsLog:
    """One JSON object per optimizer step, appended and flushed so a crash loses at most the current line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class NullMetricsLog:
    """What a process that does not write (data parallel, not the main one) logs to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class ProgressBar:
    """tqdm bar with reward, loss and (on CUDA) peak GPU memory; a no-op when disabled."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        post = {"reward": f"{record['reward']:.4g}", "loss": f"{record['loss']:.4g}"}
        if "gpu_mem_gb" in record:
            post["mem"] = f"{record['gpu_mem_gb']:.1f}G"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def make_grid(images: torch.Tensor, rows: int, labels: list[str] | None = None, path: Path | None = None,
              min_cell: int = 128):
    """Tile [N,3,H,W] images in [0,1] into `rows` rows, each labelled on the left; save atomically as PNG."""
    from PIL import Image, ImageDraw

    from .io import atomic_path

    n, _, h, w = images.shape
    cols = max(1, (n + rows - 1) // rows)
    scale = max(1, -(-min_cell // max(h, w)))  # tiny models' 16-px images are upscaled to be visible
    ch, cw = h * scale, w * scale
    label_w = 160 if labels else 0
    canvas = Image.new("RGB", (label_w + cols * cw, rows * ch), "white")
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        tile = Image.fromarray(arr[i]).resize((cw, ch), Image.NEAREST)
        canvas.paste(tile, (label_w + (i % cols) * cw, (i // cols) * ch))
    if labels:
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(labels[:rows]):
            draw.multiline_text((4, r * ch + 4), _wrap(text, 24), fill="black")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            canvas.save(tmp, format="PNG")
    return canvas


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:6])
