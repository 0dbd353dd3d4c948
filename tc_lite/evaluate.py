"""Does the LoRA help? Generate with the base model and each LoRA on the same prompts and seeds, score every image
with every reward, and write ``report.md`` / ``report.html`` (see ``tc_lite.report``) plus the raw numbers.

What is compared, and why it is fair:

* Every model renders every (prompt, seed) from the *same initial noise* (``tc_lite.inference.sample_images``
  seeds each image by its seed alone), so base and tuned images of a pair differ only by the text embedding; the
  win rate and the mean difference are paired statistics over these pairs.
* The base model is the LoRA at weight 0, which ``tc_lite.inference`` guarantees is the untouched encoder.
* Rewards score the images as they are (no hinge ``target``, no weights): each reward's own number, comparable with
  the paper's Table 1 when the same reward models and prompts (Parti-Prompts TSV) are used.
* Diversity: for each prompt, the mean pairwise distance between the images of its different seeds, averaged over
  prompts. With a reward that exposes ``image_embeds(images) -> [B, D]`` (the built-in ``clip`` reward does) the
  distance is ``1 - cosine`` of those CLIP image embeddings; otherwise a pixel-space fallback, the RMS difference
  of the images downsampled to 32x32 (values in [0, 1]). A tuned model whose diversity falls below
  ``COLLAPSE_RATIO`` x the base model's is flagged: reward hacking tends to make every seed look alike. A flag is a
  reason to look at the grids, not a verdict; one seed gives no diversity at all (n/a).

Work is streamed prompt chunk by prompt chunk, so memory does not grow with the number of prompts: only the scores,
the embeddings (a few KB per image) and small thumbnails of the grid prompts are kept.

Outputs in ``out_dir``: ``report.md``, ``report.html`` (self-contained), ``summary.json`` (every number of the
report), ``scores.jsonl`` (one line per model x prompt x seed), ``grids/`` (side-by-side images), ``scores.png``,
and with ``save_images`` every image under ``images/<model>/``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tc_lite.errors import UserError

__all__ = [
    "COLLAPSE_RATIO",
    "EvalResult",
    "diversity",
    "evaluate",
    "evaluate_run",
    "parse_reward_spec",
    "parse_seeds",
    "summarize",
]

COLLAPSE_RATIO = 0.7  # tuned diversity below 70% of the base model's is flagged as possible collapse
_PIXEL_SIDE = 32  # pixel-space diversity fallback: images downsampled to 32x32
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


# --------------------------------------------------------------------------------------------------- parsing


def parse_seeds(value: int | str | Sequence[int]) -> list[int]:
    """``4`` or ``"4"`` -> seeds 0..3; ``"0,5,9"`` or ``[0, 5, 9]`` -> those seeds. UserError names ``seeds``."""
    if isinstance(value, bool):
        raise UserError(f"seeds: expected a count or a list of seeds, got {value!r}")
    if isinstance(value, int):
        count: int | None = value
        seeds: list[int] = []
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "," in text:
                count, seeds = None, [int(s) for s in text.split(",") if s.strip()]
            else:
                count, seeds = int(text), []
        except ValueError:
            raise UserError(f"seeds: {value!r} is neither a count (e.g. 4) nor a comma-separated list (e.g. 0,1,7)") from None
    else:
        count, seeds = None, [int(s) for s in value]
    if count is not None:
        if count < 1:
            raise UserError(f"seeds: the count must be at least 1, got {count} (2 or more to measure diversity)")
        seeds = list(range(count))
    if not seeds:
        raise UserError("seeds: empty; give a count (e.g. 4) or a list of seeds (e.g. 0,1,7)")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"seeds: {seeds} must be distinct non-negative integers")
    return seeds


def parse_reward_spec(rewards: str | Sequence[str] | Mapping[str, Any],
                      reward_args: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Normalise a reward selection to ``{label: {"type": name, "args": {...}}}``.

    Accepts ``"aesthetic,clip"`` (``LABEL=NAME`` items give a reward its own label, e.g. ``"blue=color"``), a list
    of such items, or a mapping such as a config's ``rewards.terms`` (terms with
    weight 0 are skipped: they were switched off). ``reward_args`` are ``label.key=value`` strings (the CLI's
    ``--reward-arg clip.model=/path``); values are read as YAML (numbers, lists, strings).
    """
    import yaml

    spec: dict[str, dict[str, Any]] = {}
    if isinstance(rewards, str):
        rewards = [r for r in (s.strip() for s in rewards.split(",")) if r]
    if isinstance(rewards, Mapping):
        for label, term in rewards.items():
            get = term.get if isinstance(term, Mapping) else lambda k, d=None, t=term: getattr(t, k, d)
            if get("weight", 1.0) == 0:
                continue
            spec[str(label)] = {"type": get("type") or str(label), "args": dict(get("args") or {})}
    else:
        for item in rewards:
            label, _, kind = (part.strip() for part in str(item).partition("="))
            if not label or (_ and not kind):
                raise UserError(f"rewards: {item!r} is not NAME or LABEL=NAME (e.g. clip, or blue=color)")
            if label in spec:
                raise UserError(f"rewards: {label!r} is listed twice; give a second one its own label, e.g. {label}2={kind or label}")
            spec[label] = {"type": kind or label, "args": {}}
    if not spec:
        raise UserError("rewards: none selected; name at least one, e.g. --rewards aesthetic,clip")
    for item in reward_args:
        key, sep, raw = item.partition("=")
        label, dot, arg = key.strip().partition(".")
        if not sep or not dot or not arg:
            raise UserError(f"reward arg {item!r}: expected LABEL.KEY=VALUE, e.g. clip.model=/models/clip-vit-large")
        if label not in spec:
            raise UserError(f"reward arg {item!r}: no reward {label!r} is selected (selected: {', '.join(spec)})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        spec[label]["args"][arg] = value
    return spec


# --------------------------------------------------------------------------------------------------- statistics


def _mean_se(x: torch.Tensor) -> dict[str, Any]:
    x = x.double().flatten()
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": float(x.mean()), "se": se, "n": n}


def _win_rate(tuned: torch.Tensor, base: torch.Tensor) -> dict[str, Any]:
    t, b = tuned.double().flatten(), base.double().flatten()
    d = t - b
    n = d.numel()
    wins, ties = int((d > 0).sum()), int((d == 0).sum())
    return {
        "rate": (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "delta": float(d.mean()),
        "delta_se": float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0,
    }


def diversity(embeddings: torch.Tensor, metric: str) -> float | None:
    """Mean over prompts of the mean pairwise distance across seeds; ``embeddings`` is [P, S, D].

    ``metric="cosine"``: 1 - cos of L2-normalised embeddings; ``"rms"``: RMS difference per dimension. None with
    fewer than two seeds (there is no pair to compare).
    """
    _, s, d = embeddings.shape
    if s < 2:
        return None
    e = embeddings.double()
    if metric == "cosine":
        e = F.normalize(e, dim=-1)
        dist = 1.0 - e @ e.transpose(1, 2)
    elif metric == "rms":
        dist = torch.cdist(e, e) / math.sqrt(d)
    else:
        raise ValueError(f"unknown diversity metric {metric!r}")
    iu = torch.triu_indices(s, s, offset=1)
    return float(dist[:, iu[0], iu[1]].mean())


def summarize(scores: Mapping[str, Mapping[str, torch.Tensor]], embeddings: Mapping[str, torch.Tensor],
              metric: str) -> list[dict[str, Any]]:
    """Per model (the first is the base): mean ± SE per reward, paired win rate vs base, diversity and its flag.

    ``scores[model][reward]`` is a [P, S] tensor; ``embeddings[model]`` is [P, S, D].
    """
    names = list(scores)
    base = names[0]
    base_div = diversity(embeddings[base], metric)
    models = []
    for name in names:
        div = diversity(embeddings[name], metric)
        ratio = div / base_div if div is not None and base_div else None
        models.append({
            "name": name,
            "scores": {r: _mean_se(v) for r, v in scores[name].items()},
            "win_rate": {} if name == base else {r: _win_rate(v, scores[base][r]) for r, v in scores[name].items()},
            "diversity": div,
            "diversity_ratio": ratio,
            "collapse": bool(name != base and ratio is not None and ratio < COLLAPSE_RATIO),
        })
    return models


# --------------------------------------------------------------------------------------------------- setup


def _model_names(loras: Sequence[Any], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(loras):
            raise UserError(f"names: {len(names)} name(s) for {len(loras)} LoRA(s); give one per LoRA")
        out = list(names)
    else:
        out = [Path(src).stem if isinstance(src, (str, Path)) else f"lora{i + 1}" for i, src in enumerate(loras)]
    seen: dict[str, int] = {"base": 1}
    unique = []
    for n in out:
        base_name = re.sub(r"\s+", "_", str(n)) or "lora"
        k = seen.get(base_name, 0)
        seen[base_name] = k + 1
        unique.append(base_name if k == 0 else f"{base_name}_{k + 1}")
    return ["base", *unique]


def _check_loras(loras: Sequence[Any]) -> None:
    for src in loras:
        if isinstance(src, (str, Path)):
            p = Path(src).expanduser()
            if not p.exists():
                raise UserError(f"--lora {str(src)!r}: file not found; pass a LoRA .safetensors written by tc-lite "
                                "(kohya, diffusers or peft format) or a full-encoder file")


def _resolve_precision(device: str, precision: str) -> Any:
    from tc_lite.config import MemoryConfig
    from tc_lite.precision import resolve_precision

    return resolve_precision(MemoryConfig(device=device, precision=precision))  # type: ignore[arg-type]


def _load_pipeline(model: Any, prec: Any, log: Callable[[str], None], options: Mapping[str, Any]) -> Any:
    from tc_lite.models import freeze_and_cast, load_components
    from tc_lite.models.components import SDComponents
    from tc_lite.precision import set_attention

    comps = model if isinstance(model, SDComponents) else load_components(str(model), dtype=prec.weight_dtype, **options)
    freeze_and_cast(comps, prec.weight_dtype)
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.to(prec.device).eval()
    set_attention(comps.unet, "sdpa", prec.device, warn=log)
    return comps


def _build_rewards(spec: Mapping[str, Mapping[str, Any]], prec: Any, offload: str) -> Any:
    from tc_lite.rewards import RewardMix, build_reward

    entries = []
    for label, term in spec.items():
        try:
            reward = build_reward(term["type"], args=dict(term.get("args") or {}))
        except UserError as e:
            if label == term["type"]:
                raise  # the registry's message already names the reward
            raise UserError(f"rewards: {label}: {e}") from None
        entries.append((label, reward, 1.0))
    offload = offload if prec.device.type == "cuda" else "none"
    # Scores are the product here, so no bf16: fp16 (3 more mantissa bits) on a GPU, fp32 on the CPU.
    dtype = torch.float16 if prec.device.type == "cuda" else torch.float32
    return RewardMix(entries, device=prec.device, dtype=dtype, offload=offload)


def _embedder(mix: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], str, str]:
    """(embed(images) -> [B, D], metric, description): a CLIP image embedding when a reward offers one."""
    from tc_lite.rewards import on_device

    candidates = []
    for label, reward, _ in mix.entries:
        owner = reward if hasattr(reward, "image_embeds") else getattr(reward, "fn", None)
        if owner is not None and callable(getattr(owner, "image_embeds", None)):
            candidates.append((label != "clip", label, reward, owner))
    if candidates:
        _, label, reward, owner = min(candidates, key=lambda c: c[0])

        @torch.no_grad()
        def embed(images: torch.Tensor) -> torch.Tensor:
            with on_device(reward.module(), mix.device):
                return owner.image_embeds(images.to(mix.device, torch.float32)).float().cpu()

        return embed, "cosine", (f"Diversity: mean pairwise 1 − cosine similarity of the CLIP image embeddings "
                                 f"(reward '{label}') of the same prompt's images across seeds, averaged over "
                                 f"prompts; flagged when below {COLLAPSE_RATIO:g} × the base model's.")

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images.float(), size=(_PIXEL_SIDE, _PIXEL_SIDE), mode="area").flatten(1).cpu()

    return pixels, "rms", (f"Diversity: no CLIP reward selected, so the pixel-space fallback: mean pairwise RMS "
                           f"difference of the same prompt's images across seeds, downsampled to "
                           f"{_PIXEL_SIDE}×{_PIXEL_SIDE} (values in [0, 1]), averaged over prompts; flagged when "
                           f"below {COLLAPSE_RATIO:g} × the base model's. Select the clip reward for a semantic measure.")


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


# --------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: Any,
    loras: Sequence[Any] = (),
    prompts: str | Path | Sequence[str] = "builtin:heldout",
    rewards: str | Sequence[str] | Mapping[str, Any] = "clip",
    *,
    seeds: int | str | Sequence[int] = 4,
    out_dir: str | Path = "outputs/eval",
    num_prompts: int | None = None,
    column: str | None = None,
    reward_args: Sequence[str] = (),
    names: Sequence[str] | None = None,
    lora_weight: float = 1.0,
    tuned_steps: int | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    scheduler: str = "ddim",
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str = "",
    device: str = "auto",
    precision: str = "auto",
    reward_offload: str = "cpu",
    batch_size: int = 4,
    grid_prompts: int = 8,
    save_images: bool = False,
    progress: bool = True,
    model_options: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Compare the base model with each LoRA on the same prompts and seeds; write the report into ``out_dir``.

    ``model``: what ``model.source`` takes (hub id, diffusers folder, single file, ``"tiny"``) or loaded
    ``SDComponents``. ``loras``: LoRA / full-encoder files (or tuned encoder modules), each applied at
    ``lora_weight`` (``tuned_steps`` as in ``tc_lite.inference``). ``prompts``: a prompt file (``.txt``, CSV/TSV
    such as Parti-Prompts' ``PartiPrompts.tsv`` with its ``Prompt`` column, ``.jsonl``), ``builtin:NAME``, or a
    list; ``num_prompts`` keeps the first N. ``rewards``: see ``parse_reward_spec``. ``seeds``: a count or a list.
    Height/width default to the model's native size. ``model_options`` go to ``load_components`` (``config_dir``,
    ``allow_pickle``, ``revision``, as in the ``model`` preset section). Everything the user can get wrong raises
    ``UserError``.
    """
    from tqdm.auto import tqdm

    from tc_lite.data import load_prompts
    from tc_lite.inference import (
        default_size,
        encode_prompts,
        sample_images,
        tuned_encoder,
    )

    t_start = time.perf_counter()
    seed_list = parse_seeds(seeds)
    spec = parse_reward_spec(rewards, reward_args)
    if isinstance(prompts, (str, Path)):
        source = str(prompts)
        prompt_list = load_prompts(prompts, column=column)
    else:
        source = "a list"
        prompt_list = [str(p) for p in prompts]
        if not prompt_list:
            raise UserError("prompts: the list is empty; give at least one prompt")
    if num_prompts is not None:
        if num_prompts < 1:
            raise UserError(f"num_prompts: must be at least 1, got {num_prompts}")
        prompt_list = prompt_list[:num_prompts]
    if grid_prompts < 0 or batch_size < 1:
        raise UserError(f"grid_prompts must be >= 0 and batch_size >= 1 (got {grid_prompts}, {batch_size})")
    loras = list(loras)
    _check_loras(loras)
    model_names = _model_names(loras, names)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"out: cannot create {str(out)!r} ({e.strerror}); choose a writable folder") from None

    prec = _resolve_precision(device, precision)
    mix = _build_rewards(spec, prec, reward_offload)  # before the pipeline: a bad reward fails in seconds
    comps = _load_pipeline(model, prec, log, model_options or {})
    embed, metric, metric_text = _embedder(mix)
    tuned = [tuned_encoder(comps.text_encoder, src) for src in loras]  # built once, reused for every chunk
    h, w = height or default_size(comps), width or default_size(comps)
    n_models, n_seeds = len(model_names), len(seed_list)
    log(f"eval: {comps.source or model} on {prec.device} ({prec.name}); {len(prompt_list)} prompts x {n_seeds} seeds "
        f"x {n_models} models ({', '.join(model_names)}); rewards {', '.join(spec)}")

    labels = list(spec)
    scores = {m: {r: torch.zeros(len(prompt_list), n_seeds) for r in labels} for m in model_names}
    embeds: dict[str, list[torch.Tensor]] = {m: [] for m in model_names}
    n_grid = min(grid_prompts, len(prompt_list))
    thumbs: list[list[torch.Tensor]] = [[] for _ in range(n_grid)]  # per grid prompt: [S,3,h,w] per model
    rows: list[dict[str, Any]] = []
    chunk = max(1, batch_size // n_seeds) if n_seeds <= batch_size else 1
    bar = tqdm(total=len(prompt_list) * n_seeds * n_models, disable=not progress, unit="img", desc="eval")
    for start in range(0, len(prompt_list), chunk):
        idx = list(range(start, min(start + chunk, len(prompt_list))))
        texts = [prompt_list[i] for i in idx]
        emb = encode_prompts(comps, texts, tuned, negative_prompt=negative_prompt)
        for mi, name in enumerate(model_names):
            weights = [lora_weight if j == mi - 1 else 0.0 for j in range(len(tuned))]
            images = sample_images(comps, emb, seed_list, weights, tuned_steps=tuned_steps if mi else None,
                                   steps=steps, guidance=guidance, scheduler=scheduler, height=h, width=w,
                                   batch_size=batch_size, autocast=prec.autocast)
            per_image_prompts = [t for t in texts for _ in seed_list]
            with torch.no_grad():
                _, parts = mix(images, per_image_prompts)
            for r in labels:
                scores[name][r][idx] = parts[r].float().cpu().view(len(idx), n_seeds)
            embeds[name].append(embed(images).view(len(idx), n_seeds, -1))
            for k, i in enumerate(idx):
                block = images[k * n_seeds : (k + 1) * n_seeds]
                if i < n_grid:
                    thumbs[i].append(_thumbs(block))
                for si, seed in enumerate(seed_list):
                    rows.append({"model": name, "prompt_index": i, "prompt": prompt_list[i], "seed": seed,
                                 **{r: float(scores[name][r][i, si]) for r in labels}})
                    if save_images:
                        _save_image(block[si], out / "images" / name / f"p{i:04d}_s{seed}.png")
            bar.update(len(idx) * n_seeds)
    bar.close()

    return _write_outputs(
        out, model_names, prompt_list, seed_list, labels, scores,
        {m: torch.cat(v) for m, v in embeds.items()}, metric, metric_text, thumbs, rows,
        header={"model": str(comps.source or model), "prompts_source": source,
                "loras": [str(s) if isinstance(s, (str, Path)) else f"<{type(s).__name__}>" for s in loras],
                "reward_spec": spec,
                "settings": {"scheduler": scheduler, "steps": steps, "guidance_scale": guidance, "height": h,
                             "width": w, "negative_prompt": negative_prompt,
                             "lora_weight": lora_weight if loras else None, "tuned_steps": tuned_steps,
                             "device": str(prec.device), "precision": prec.name}},
        t_start=t_start, log=log)


def _write_outputs(out: Path, model_names: list[str], prompts: list[str], seeds: list[int], labels: list[str],
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


def evaluate_run(run_dir: str | Path, *, loras: Sequence[Any] | None = None, **overrides: Any) -> EvalResult:
    """Evaluate a finished training run with its own settings: model, sampling size/steps/CFG, rewards, LoRA.

    Reads ``<run>/config.yaml``; the LoRAs default to the run's exported ``<output.name>.safetensors`` and, when
    early stopping kept one, ``<output.name>_best.safetensors`` (final and best side by side); the prompts
    to the run's ``eval.prompts`` (the held-out list) and ``eval.num_prompts``, the output folder to
    ``<run>/eval``; seeds stay ``evaluate``'s default (4: diversity needs several). Any keyword of ``evaluate``
    overrides these.
    """
    from tc_lite.config import load_config

    run = Path(run_dir).expanduser()
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"run: {str(cfg_path)!r} not found; pass the output.dir of a tc-lite training run")
    cfg = load_config(cfg_path)
    if loras is None:
        final = run / f"{cfg.output.name}.safetensors"
        if cfg.lora.mode == "full":
            final = run / f"{cfg.output.name}_text_encoder.safetensors"
        if not final.is_file():
            raise UserError(f"run: {str(final)!r} not found; the run has not finished (or pass the LoRA file "
                            "explicitly)")
        best = run / f"{cfg.output.name}_best.safetensors"  # written on each new held-out best (eval.patience > 0)
        loras = [final, best] if best.is_file() else [final]
    s = cfg.sampling
    settings: dict[str, Any] = dict(
        prompts=cfg.eval.prompts, num_prompts=cfg.eval.num_prompts, rewards=cfg.rewards.terms,
        out_dir=run / "eval", steps=s.steps,
        guidance=s.guidance_scale, scheduler=s.scheduler, height=s.height, width=s.width,
        negative_prompt=s.negative_prompt, device=cfg.memory.device,
        precision=cfg.memory.precision, reward_offload="none" if cfg.rewards.offload == "none" else "cpu",
        model_options={"config_dir": cfg.model.config_dir, "allow_pickle": cfg.model.allow_pickle,
                       "revision": cfg.model.revision},
    )
    settings.update(overrides)
    model = settings.pop("model", cfg.model.source)
    return evaluate(model, loras, **settings)
