"""`bench speed`: times, on whatever device is present, (a) the no-grad sampling pass (the one `Renderer`) beside
diffusers' `StableDiffusionPipeline` with the same model, scheduler, steps and CFG; (b) one training step (the
recipe's `TrainStep`) beside the sum of its parts measured separately; (c) a step whose latent source is the prefix
cache beside one with fresh noise; (d) steps per hour."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from tc_lite.errors import UserError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every `fn` per round, the functions taking turns within each round.

    Why interleaved: on a shared machine the load drifts; taking turns exposes both sides of a ratio to the same
    load, and the median of per-round ratios is then far steadier than a ratio of separate medians.
    """
    clock = _clock(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t = clock()
            fn()
            _sync(device)
            times[name].append(clock() - t)
    return times


def _clock(device: torch.device) -> Callable[[], float]:
    """Wall time on a GPU; on the CPU, the process's CPU time, which time stolen by other tenants of a shared
    machine does not inflate (all threads summed: ~threads x wall time when they are all busy)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def _bench_cfg(cfg: Any, out_dir: str) -> Any:
    from tc_lite.bench.memory import quiet_config

    cfg = quiet_config(cfg, out_dir, grad_accum=1)
    return dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, prefix_cache="none"))  # (c) swaps one in


def _step_functions(r: Any, prompts: list[str], cfg: Any) -> tuple[dict[str, Callable[[], Any]], list[str], str | None]:
    """(a)-(c) as functions of the set-up recipe `r`; returns them, the names of the parts of (b), and why the
    prefix cache of (c) could not be built (None when it was, or when the settings rule it out)."""
    from tc_lite.decode import decode
    from tc_lite.prefix_cache import build_prefix_cache
    from tc_lite.prefix_rules import prefix_cache_problems
    from tc_lite.step import StepStats, step_generator

    s, comps, trainer, B = cfg.sampling, r.components, r.trainer, len(prompts)
    gen = lambda: torch.Generator().manual_seed(0)
    seeds = list(range(B))
    k = s.grad_steps

    def ours_sampling() -> torch.Tensor:  # text encoding + T UNet steps with CFG, latents out
        with torch.no_grad():
            cond, uncond = r.encoder.tuned(prompts), r.encoder.uncond_tuned(s.negative_prompt)
            return r.renderer.latents(seeds, early=cond, uncond_early=uncond)

    pipe = _diffusers_pipeline(r)

    def diffusers_sampling() -> Any:
        with torch.no_grad(), r.precision.autocast():
            return pipe(prompts, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                        negative_prompt=[s.negative_prompt] * B if s.negative_prompt else None,
                        height=s.height, width=s.width, eta=s.eta, output_type="latent",
                        generator=gen(), return_dict=False)[0]

    def train_step() -> None:
        trainer.micro_step(prompts, step_generator(cfg.train.seed, 0, 0), StepStats())
        trainer.optimizer_step()

    def part_prefix() -> torch.Tensor:
        with torch.no_grad():
            cond = trainer.conditioning(prompts)
            return r.renderer.latents(seeds, early=cond["early"], uncond_early=cond["uncond_early"], stop=s.steps - k)

    start_latent = part_prefix()

    def part_grad_steps() -> torch.Tensor:
        from tc_lite.sampling import DenoisePlan

        plan = DenoisePlan(s.steps, k, s.guidance_scale, cfg.memory.checkpoint_unet, s.eta,
                           checkpoint_blocks=cfg.memory.checkpoint_unet_blocks)  # as the step's
        out = trainer.denoiser.run(start_latent.clone(), plan, start=s.steps - k, generator=gen(),
                                   **trainer.conditioning(prompts))
        out.float().square().mean().backward()  # recompute + backward through the UNet calls and the encoder
        r.optimizer.zero_grad(set_to_none=True)
        return out.detach()

    end_latent = part_grad_steps()

    def part_decode() -> torch.Tensor:
        x = end_latent.clone().requires_grad_(True)
        images = decode(comps.vae, x, r.precision.autocast)
        images.mean().backward()
        return images.detach()

    images = part_decode()

    def part_reward() -> None:
        x = images.clone().requires_grad_(True)
        total, _ = r.rewards(x, prompts)
        (-total.mean()).backward()

    def part_optimizer() -> None:
        for p in r.params:
            p.grad = torch.zeros_like(p)
        trainer.optimizer_step()

    parts = {"no-grad steps": part_prefix, "grad steps (fwd, recompute, bwd)": part_grad_steps,
             "decode fwd+bwd": part_decode, "reward fwd+bwd": part_reward, "optimizer": part_optimizer}
    fns: dict[str, Callable[[], Any]] = {"sampling": ours_sampling, "diffusers": diffusers_sampling,
                                         "step": train_step, **parts}
    cache_error = None
    if not prefix_cache_problems(s, r.adapters):  # (c): the same step with the cache as its latent source
        try:
            cache = build_prefix_cache(cfg, r.family, comps, r.adapters, r.encoder, r.precision, r.out)
            cache.prefill(prompts, batch_size=B, log=lambda m: None)
        except Exception as e:  # noqa: BLE001 -- (a), (b) and (d) still mean something; the report names the error
            cache_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        else:

            def cached_step() -> None:
                fresh, trainer.latents = trainer.latents, cache
                try:
                    train_step()
                finally:
                    trainer.latents = fresh

            fns["cached"] = cached_step
    return fns, list(parts), cache_error


def speed_report(cfg: Any, model: str | None = None, repeats: int = 3,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything `bench speed` prints, as a dict (seconds, ratios, targets)."""
    from tc_lite.bench.memory import close_recipe
    from tc_lite.bench.models import model_override
    from tc_lite.train import Recipe

    s = cfg.sampling
    with tempfile.TemporaryDirectory() as tmp, model_override(model):
        cfg = _bench_cfg(cfg, tmp)
        r = Recipe(cfg, log=lambda m: None).setup()
        B = cfg.train.batch_size
        prompts = r.sampler.prompts[:B] if len(r.sampler.prompts) >= B else (r.sampler.prompts * B)[:B]
        try:
            fns, part_names, cache_error = _step_functions(r, prompts, cfg)
            times = interleaved(fns, r.precision.device, repeats)
        finally:
            close_recipe(r)

    med = {name: statistics.median(t) for name, t in times.items()}
    rounds = range(repeats)
    parts_sum = [sum(times[n][i] for n in part_names) for i in rounds]
    ratio = lambda a, b: statistics.median(a[i] / b[i] for i in rounds)
    cached = "cached" in times
    return {
        "device": device_name(r.precision.device), "model": model or cfg.model.source, "torch": torch.__version__,
        "repeats": repeats,
        "setting": {"height": s.height, "width": s.width, "batch_size": B, "steps": s.steps, "grad_steps": s.grad_steps,
                    "guidance_scale": s.guidance_scale, "scheduler": s.scheduler, "precision": r.precision.name,
                    "checkpoint_unet": cfg.memory.checkpoint_unet, "checkpoint_vae": cfg.memory.checkpoint_vae},
        "sampling_s": med["sampling"], "diffusers_sampling_s": med["diffusers"],
        "sampling_ratio": ratio(times["sampling"], times["diffusers"]),
        "step_s": med["step"], "parts_s": {n: med[n] for n in part_names},
        "parts_sum_s": statistics.median(parts_sum), "step_over_parts": ratio(times["step"], parts_sum),
        "cached_step_s": med["cached"] if cached else None, "cached_error": cache_error,
        "cached_ratio": ratio(times["cached"], times["step"]) if cached else None,
        "steps_per_hour": 3600 / med["step"], "cached_steps_per_hour": 3600 / med["cached"] if cached else None,
        "targets": {"sampling_ratio": 1.05, "step_over_parts": 1.10, "cached_ratio": 0.2},
    }


def _diffusers_pipeline(r: Any) -> Any:
    """diffusers' pipeline of the family on the recipe's own modules, with a fresh copy of the render scheduler."""
    scheduler = r.renderer.denoiser.scheduler
    pipe = r.family.pipeline(r.components, scheduler=type(scheduler).from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_speed(rep: dict[str, Any]) -> str:
    s = rep["setting"]
    ok = lambda v, t: "ok" if v is not None and v <= t else "over target"
    clock = "process CPU time (all threads)" if rep["device"].startswith("CPU") else "wall time"
    lines = [
        (f"bench speed on {rep['device']} (torch {rep['torch']}), model {rep['model']}; {clock}, median of "
         f"{rep['repeats']} interleaved rounds"),
        (f"  {s['height']}x{s['width']}, batch {s['batch_size']}, T={s['steps']} K={s['grad_steps']}, CFG "
         f"{s['guidance_scale']:g}, {s['scheduler']}, {s['precision']}, checkpoint unet={s['checkpoint_unet']} "
         f"vae={s['checkpoint_vae']}"),
        (f"  (a) no-grad sampling: {rep['sampling_s']:.3f} s vs diffusers {rep['diffusers_sampling_s']:.3f} s "
         f"= {rep['sampling_ratio']:.3f}x (target <= 1.05: {ok(rep['sampling_ratio'], 1.05)})"),
        (f"  (b) training step: {rep['step_s']:.3f} s vs sum of parts {rep['parts_sum_s']:.3f} s "
         f"= {rep['step_over_parts']:.3f}x (target <= 1.10: {ok(rep['step_over_parts'], 1.10)})"),
    ]
    lines += [f"        {name:<34}{t:.3f} s" for name, t in rep["parts_s"].items()]
    if rep["cached_step_s"] is not None:
        lines.append(f"  (c) step with prefix cache: {rep['cached_step_s']:.3f} s = {rep['cached_ratio']:.3f}x of "
                     f"a full step (target <= 0.2 at T=50, K=1; the floor is about (K grad steps + decode + "
                     f"reward) / (T steps + the same))")
    elif rep.get("cached_error"):
        lines.append(f"  (c) prefix cache: FAILED to build ({rep['cached_error']})")
    else:
        lines.append("  (c) prefix cache: not applicable (needs two_encoder, ddim/euler, fixed K)")
    lines.append(f"  (d) {rep['steps_per_hour']:.0f} steps/hour" + (
        f"; {rep['cached_steps_per_hour']:.0f} with the prefix cache" if rep["cached_steps_per_hour"] else ""))
    return "\n".join(lines)


def speed_config(preset: str, overrides: list[str], model: str | None) -> Any:
    """The config `bench speed` times: the preset, with a model built in code where `model` says so."""
    from tc_lite.bench.models import MID_OVERRIDES
    from tc_lite.config import load_config

    overrides = list(overrides)
    if model == "mid":  # the preset's rewards need downloads: a random ViT reward of realistic cost instead
        terms = load_config(preset, overrides).rewards.terms
        overrides = [*(f"rewards.terms.{name}.weight=0" for name in terms if name != "vit"), *MID_OVERRIDES, *overrides]
    elif model == "tiny":
        overrides = ["model.source=tiny", *overrides]
    cfg = load_config(preset, overrides)
    if model in ("sd15", "sdxl"):  # full size with random weights: the rewards too (tc_lite.bench.random_rewards)
        from tc_lite.bench.random_rewards import random_rewards

        cfg = random_rewards(cfg)
    return cfg


def run_speed(args: argparse.Namespace) -> int:
    cfg = speed_config(args.preset, args.overrides, args.model)
    if not torch.cuda.is_available() and args.model in (None, "sd15", "sdxl") and not cfg.model.source.startswith("tiny"):
        raise UserError("bench speed: no CUDA GPU here, and a full-size model on the CPU takes minutes per step; "
                        "use --model tiny or --model mid (built in code, nothing downloaded)")
    rep = speed_report(cfg, model=args.model, repeats=args.repeats)
    print(json.dumps(rep, indent=2, default=str) if args.json else format_speed(rep))
    return 0
