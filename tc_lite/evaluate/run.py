"""Running an evaluation: ``evaluate`` (base model vs LoRAs under ``EvalSettings``) and ``evaluate_run`` (a
finished training run with its own settings). Everything that touches the diffusion model lives in ``_Renderer``;
the rest streams prompt chunks through it, scores them and hands them to the ``Collector``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tc_lite.errors import UserError
from tc_lite.evaluate.outputs import Collector, EvalResult
from tc_lite.evaluate.scoring import build_rewards, embedder
from tc_lite.evaluate.settings import EvalSettings, EvalSettingsError


class _Renderer:
    """Loads the pipeline through its family, builds the tuned encoders and renders prompt chunks.

    Everything model-specific goes through the family (``tc_lite.families``) and ``tc_lite.inference``, here and
    only here. ``render`` yields one image
    batch per model, base first; every model renders a (prompt, seed) from the same initial noise (``sample_images``
    seeds each image by its seed alone) and the base model is the LoRAs at weight 0, the untouched encoder.
    """

    def __init__(self, model: Any, loras: Sequence[Any], settings: EvalSettings, prec: Any,
                 log: Callable[[str], None]):
        from tc_lite.config import ModelConfig
        from tc_lite.families import family_of, load_model
        from tc_lite.inference import default_size, tuned_encoders
        from tc_lite.models import freeze_and_cast
        from tc_lite.models.components import SDComponents
        from tc_lite.precision import set_attention

        options = dict(settings.model_options or {})
        if isinstance(model, SDComponents):
            comps = model
        else:
            comps = load_model(ModelConfig(source=str(model), **options), prec.weight_dtype)[1]
        freeze_and_cast(comps, prec.weight_dtype)  # the VAE in fp32 where fp16 would overflow (SDXL's)
        for m in (comps.unet, comps.vae, *family_of(comps).encoders(comps).values()):
            m.to(prec.device).eval()
        set_attention(comps.unet, "sdpa", prec.device, warn=log)
        self.comps, self.settings, self.autocast = comps, settings, prec.autocast
        self.source = str(comps.source or model)
        self.tuned = [tuned_encoders(comps, src) for src in loras]  # built once, reused for every chunk
        from tc_lite.unet_mix import UNetLoRAMix

        self.unet_loras = UNetLoRAMix(comps.unet, loras)  # the UNet parts of files that tuned it too
        self.height = settings.height or default_size(comps)
        self.width = settings.width or default_size(comps)

    def render(self, texts: list[str], seeds: list[int]) -> Iterator[torch.Tensor]:
        """For the base model, then each LoRA: float images [len(texts) * len(seeds), 3, H, W] in [0, 1] on the
        CPU, prompt-major (image ``p * len(seeds) + s`` is prompt p with seed s)."""
        from tc_lite.inference import encode_prompts, sample_images

        s = self.settings
        emb = encode_prompts(self.comps, texts, self.tuned, negative_prompt=s.negative_prompt,
                             size=(self.height, self.width))
        for mi in range(1 + len(self.tuned)):
            weights = [s.lora_weight if j == mi - 1 else 0.0 for j in range(len(self.tuned))]
            yield sample_images(self.comps, emb, seeds, weights, tuned_steps=s.tuned_steps if mi else None,
                                steps=s.steps, guidance=s.guidance, scheduler=s.scheduler, height=self.height,
                                width=self.width, batch_size=s.batch_size, autocast=self.autocast,
                                unet_loras=self.unet_loras)


def _describe(source: Any) -> Any:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, dict) and all(isinstance(v, (str, Path)) for v in source.values()):
        return {k: str(v) for k, v in source.items()}
    return f"<{type(source).__name__}>"


def run_result(cfg: Any, run: Path, best: bool = False) -> Any:
    """What `export_trained` wrote (its final result, or with `best` the held-out best), as one tuned source: the
    kohya file when everything trained as a LoRA; a fully trained encoder's file; slot -> file when several files
    make the model (SDXL encoders trained in full). None for a missing best; a UserError for a missing final."""
    from tc_lite.adapters import selected_slots
    from tc_lite.export.trained import result_paths
    from tc_lite.families import family_for

    family = family_for(cfg.model)
    kohya, full = result_paths(cfg, family, run, path=run / f"{cfg.output.name}_best.safetensors" if best else None)
    files = {s.name: full.get(s.name, kohya) for s in selected_slots(cfg.lora, family)}
    if cfg.unet.mode == "lora":  # the UNet LoRA is in the kohya file (`tc_lite.unet_mix` applies it)
        files["unet"] = kohya
    missing = sorted({str(f) for f in files.values() if not f.is_file()})
    if missing:
        if best:
            return None
        raise UserError(f"run: {missing[0]!r} not found; the run has not finished (or pass the LoRA file "
                        "explicitly)")
    return next(iter(files.values())) if len(set(files.values())) == 1 else files


def _resolve_precision(device: str, precision: str) -> Any:
    from tc_lite.config import MemoryConfig
    from tc_lite.precision import resolve_precision

    return resolve_precision(MemoryConfig(device=device, precision=precision))  # type: ignore[arg-type]


def _make_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"out: cannot create {str(out)!r} ({e.strerror}); choose a writable folder") from None
    return out


def evaluate(model: Any, loras: Sequence[Any] = (), settings: EvalSettings | None = None, *,
             log: Callable[[str], None] = print) -> EvalResult:
    """Compare the base model with each LoRA on the same prompts and seeds; write the report into
    ``settings.out_dir``.

    ``model``: what ``model.source`` takes (hub id, diffusers folder, single file, ``"tiny"``) or loaded
    ``SDComponents``. ``loras``: LoRA / full-encoder files (or tuned encoder modules), each applied at
    ``settings.lora_weight``. ``settings``: an ``EvalSettings`` (default: ``EvalSettings()``), validated first:
    every problem, LoRA files and names included, is reported in one ``UserError`` before anything is loaded.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    settings = EvalSettings() if settings is None else settings
    if not isinstance(settings, EvalSettings):
        raise TypeError(f"settings: expected an EvalSettings, got {type(settings).__name__}")
    loras = list(loras)
    plan = settings.resolve(loras)
    out = _make_out_dir(settings.out_dir)

    prec = _resolve_precision(settings.device, settings.precision)
    mix = build_rewards(plan.reward_spec, prec, settings.reward_offload)  # before the pipeline: fails in seconds
    renderer = _Renderer(model, loras, settings, prec, log)
    embed, metric, metric_text = embedder(mix)
    prompts, seeds, names, labels = plan.prompts, plan.seeds, plan.model_names, list(plan.reward_spec)
    n_models, n_seeds = len(names), len(seeds)
    log(f"eval: {renderer.source} on {prec.device} ({prec.name}); {len(prompts)} prompts x {n_seeds} seeds "
        f"x {n_models} models ({', '.join(names)}); rewards {', '.join(labels)}")

    collector = Collector(out, names, prompts, seeds, labels, settings.grid_prompts, settings.save_images)
    chunk = max(1, settings.batch_size // n_seeds) if n_seeds <= settings.batch_size else 1
    bar = tqdm(total=len(prompts) * n_seeds * n_models, disable=not settings.progress, unit="img", desc="eval")
    try:
        for start in range(0, len(prompts), chunk):
            idx = list(range(start, min(start + chunk, len(prompts))))
            texts = [prompts[i] for i in idx]
            per_image_prompts = [t for t in texts for _ in seeds]
            for name, images in zip(names, renderer.render(texts, seeds)):
                with torch.no_grad():
                    _, parts = mix(images, per_image_prompts)
                collector.add(name, idx, images, parts, embed(images))
                bar.update(len(idx) * n_seeds)
    finally:
        renderer.unet_loras.close()  # the caller's components (when given) leave as they came
    bar.close()

    s = settings
    header = {"model": renderer.source, "prompts_source": plan.prompts_source,
              "loras": [_describe(x) for x in loras],
              "reward_spec": plan.reward_spec,
              "settings": {"scheduler": s.scheduler, "steps": s.steps, "guidance_scale": s.guidance,
                           "height": renderer.height, "width": renderer.width, "negative_prompt": s.negative_prompt,
                           "lora_weight": s.lora_weight if loras else None, "tuned_steps": s.tuned_steps,
                           "device": str(prec.device), "precision": prec.name}}
    return collector.write(metric, metric_text, header, t_start=t_start, log=log)


def run_settings(cfg: Any, run: Path) -> EvalSettings:
    """The eval settings a training run implies: its held-out prompts, rewards, sampling, memory and model options;
    the output folder ``<run>/eval``; seeds stay the default (4: diversity needs several)."""
    s = cfg.sampling
    return EvalSettings(
        prompts=cfg.eval.prompts, num_prompts=cfg.eval.num_prompts, rewards=cfg.rewards.terms,
        out_dir=run / "eval", steps=s.steps,
        guidance=s.guidance_scale, scheduler=s.scheduler, height=s.height, width=s.width,
        negative_prompt=s.negative_prompt, device=cfg.memory.device,
        precision=cfg.memory.precision, reward_offload="none" if cfg.rewards.offload == "none" else "cpu",
        model_options={"config_dir": cfg.model.config_dir, "allow_pickle": cfg.model.allow_pickle,
                       "revision": cfg.model.revision},
    )


def evaluate_run(run_dir: str | Path, *, loras: Sequence[Any] | None = None, log: Callable[[str], None] = print,
                 **overrides: Any) -> EvalResult:
    """Evaluate a finished training run with its own settings: model, sampling size/steps/CFG, rewards, LoRA.

    Reads ``<run>/config.yaml`` (``run_settings``); the LoRAs default to the run's exported
    ``<output.name>.safetensors`` and, when early stopping kept one, ``<output.name>_best.safetensors`` (final
    and best side by side). ``overrides`` are ``EvalSettings`` fields (``num_prompts=8``, ``seeds=2``, ...) plus
    ``model`` (another base model); an unknown name is a ``UserError`` naming it, reported together with any
    invalid value.
    """
    from tc_lite.config import load_config

    run = Path(run_dir).expanduser()
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"run: {str(cfg_path)!r} not found; pass the output.dir of a tc-lite training run")
    cfg = load_config(cfg_path)
    if loras is None:
        final = run_result(cfg, run)
        best = run_result(cfg, run, best=True)  # each new held-out best (eval.patience > 0)
        loras = [final, best] if best is not None else [final]
    overrides = dict(overrides)
    model = overrides.pop("model", cfg.model.source)
    unknown = EvalSettings.unknown_names(list(overrides))
    known = {k: v for k, v in overrides.items() if k in EvalSettings.field_names()}
    settings = dataclasses.replace(run_settings(cfg, run), **known)
    if unknown:
        raise EvalSettingsError([*unknown, *settings.problems(loras)])
    return evaluate(model, loras, settings, log=log)
