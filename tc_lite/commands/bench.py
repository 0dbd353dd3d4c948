"""`python -m tc_lite bench memory|speed PRESET [overrides]`: how much GPU memory and time one training step takes.

`bench memory` estimates the peak GPU memory of one training step of the model the preset names from shapes alone
(`tc_lite.memory.estimate_memory`: no GPU, no download, ~10-40 s), by phase and by kind. On a CUDA machine it also
runs real steps (`--measure`, the default there) and prints `torch.cuda.max_memory_allocated` beside the estimate.

`bench speed` times, on whatever device is present: (a) the no-grad sampling phase beside diffusers'
`StableDiffusionPipeline` with the same model, scheduler, steps and CFG; (b) one training step beside the sum of
its parts measured separately; (c) a step with the prefix cache beside one without; (d) steps per hour.
`--model tiny|mid` swaps the preset's model for the built-in tiny one or a mid-size SD-shaped one built in code
(random weights; timing only), so the benchmark runs on a CPU with nothing downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tc_lite.errors import UserError

# A mid-size SD1-shaped model (SD1.5's block structure, narrower, shallower): ~10x cheaper than SD1.5 per pixel.
MID_UNET = {"sample_size": 32, "in_channels": 4, "out_channels": 4, "block_out_channels": [64, 128, 256, 256],
                "layers_per_block": 1, "cross_attention_dim": 256, "attention_head_dim": 8, "norm_num_groups": 32,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
MID_VAE = {"sample_size": 256, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [32, 64, 128, 128],
               "layers_per_block": 1, "norm_num_groups": 32, "down_block_types": ["DownEncoderBlock2D"] * 4,
               "up_block_types": ["UpDecoderBlock2D"] * 4}
MID_TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 256, "intermediate_size": 1024,
                "num_hidden_layers": 4, "num_attention_heads": 4, "projection_dim": 256, "hidden_act": "quick_gelu"}
MID_OVERRIDES = ["sampling.height=256", "sampling.width=256",
                 "rewards.terms.vit.type=tc_lite.commands.bench:RandomVitReward", "rewards.terms.vit.weight=1",
                 "rewards.offload=none", "memory.device=cpu", "memory.precision=fp32"]


# --------------------------------------------------------------------------------------------------- models


def build_mid_components(seed: int = 0) -> Any:
    """The mid-size model (random weights, SD1.5's scheduler and the real CLIP tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tc_lite.models import SDComponents, clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        comps = SDComponents(
            tokenizer=clip_tokenizer(), text_encoder=CLIPTextModel(CLIPTextConfig(**MID_TEXT)),
            unet=UNet2DConditionModel(**MID_UNET), vae=AutoencoderKL(**MID_VAE),
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            source="mid")
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.eval()
    return comps


class RandomVitReward(nn.Module):
    """A randomly initialised ViT-B/32-sized CLIP image tower with a linear head: a reward with realistic cost for
    timing on machines without reward weights. Scores mean nothing."""

    def __init__(self, layers: int = 6, width: int = 384):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                                                       num_hidden_layers=layers, num_attention_heads=6,
                                                       image_size=224, patch_size=32))
        self.head = nn.Linear(width, 1)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from tc_lite.rewards.preprocess import clip_preprocess

        pixels = clip_preprocess(images, 224).to(self.head.weight.dtype)
        return self.head(self.vision(pixel_values=pixels).pooler_output).squeeze(-1).float()


@contextlib.contextmanager
def _model_override(name: str | None) -> Iterator[None]:
    """Make `load_components` (as the Recipe calls it) return the mid-size model."""
    if name != "mid":
        yield
        return
    from tc_lite import train

    original = train.load_components
    train.load_components = lambda *a, **k: build_mid_components()  # type: ignore[assignment]
    try:
        yield
    finally:
        train.load_components = original


# --------------------------------------------------------------------------------------------------- memory


def measure_peak(cfg: Any, log: Callable[[str], None] = print) -> dict[str, int]:
    """Real steady-state peak on CUDA: one warm-up optimizer step, then the peak of the next one."""
    from tc_lite.train import Recipe

    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, steps=2, resume=None, checkpoint_every=0),
            output=dataclasses.replace(cfg.output, dir=tmp, overwrite=True),
            logging=dataclasses.replace(cfg.logging, sample_every=0, progress=False, tensorboard=False),
            eval=dataclasses.replace(cfg.eval, every=0))
        recipe = Recipe(cfg, log=log).setup()
        recipe.train_step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        recipe.train_step()
        torch.cuda.synchronize()
        return {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved()}


def _memory(args: argparse.Namespace) -> int:
    from tc_lite.config import load_config
    from tc_lite.memory import GiB, estimate_memory
    from tc_lite.memory.plan import (
        FRAGMENTATION,
        RESERVE_GIB,
        apply_memory_plan,
        smallest_card_gb,
    )

    cfg = load_config(args.preset, args.overrides)
    if cfg.memory.plan == "auto":  # estimate what the run would use
        cfg = apply_memory_plan(cfg, log=(lambda m: None) if args.json else print)
    measure = args.measure if args.measure is not None else torch.cuda.is_available()
    if measure and not torch.cuda.is_available():
        raise UserError("bench memory --measure: needs a CUDA GPU (PyTorch sees none); the estimate needs none")
    est = estimate_memory(cfg, exact=args.exact)
    out: dict[str, Any] = est.to_dict()
    if cfg.memory.device != "cpu":
        out["smallest_card_gb"] = round(smallest_card_gb(est.peak), 2)
    if measure:
        real = measure_peak(cfg, log=lambda m: None)
        out["measured"] = {**real, "device": torch.cuda.get_device_name(),
                           "ratio_estimate_to_measured": est.peak / real["max_allocated"]}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(est.format())
    if "smallest_card_gb" in out:
        print(f"  smallest card it fits: {out['smallest_card_gb']:.1f} GB (memory.plan's margin: {RESERVE_GIB} GiB "
              f"for the CUDA context, {FRAGMENTATION:.0%} for fragmentation)")
    if "measured" in out:
        m = out["measured"]
        print(f"\nmeasured on {m['device']}: max_memory_allocated {m['max_allocated'] / GiB:.2f} GiB "
              f"(reserved {m['max_reserved'] / GiB:.2f} GiB); estimate / measured = {m['ratio_estimate_to_measured']:.3f}")
    return 0


# --------------------------------------------------------------------------------------------------- speed


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


def speed_report(cfg: Any, model: str | None = None, repeats: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything `bench speed` prints, as a dict (seconds, ratios, targets)."""
    from tc_lite.decode import decode
    from tc_lite.prefix_cache import _StopAfter, for_recipe
    from tc_lite.sampling import DenoisePlan, Denoiser, make_scheduler
    from tc_lite.train import Recipe, StepStats, step_generator

    s = cfg.sampling
    with tempfile.TemporaryDirectory() as tmp, _model_override(model):
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, resume=None, checkpoint_every=0, grad_accum=1),
            sampling=dataclasses.replace(cfg.sampling, prefix_cache="none"),  # (c) switches it on for its step
            output=dataclasses.replace(cfg.output, dir=tmp, overwrite=True),
            logging=dataclasses.replace(cfg.logging, sample_every=0, progress=False, tensorboard=False),
            eval=dataclasses.replace(cfg.eval, every=0))
        r = Recipe(cfg, log=lambda m: None).setup()
        device, comps, B = r.precision.device, r.components, cfg.train.batch_size
        prompts = r.sampler.prompts[:B] if len(r.sampler.prompts) >= B else (r.sampler.prompts * B)[:B]
        f = comps.vae_scale_factor
        shape = (B, comps.latent_channels, s.height // f, s.width // f)
        gen = lambda: torch.Generator().manual_seed(0)

        # (a) the no-grad sampling pass (text encoding + T UNet steps with CFG, latents out) vs diffusers
        def ours_sampling() -> torch.Tensor:
            with torch.no_grad():
                cond, uncond = r.conditioner.tuned(prompts), r.conditioner.tuned([s.negative_prompt])
                noise = r.denoiser.initial_latents(B, comps.latent_channels, s.height // f, s.width // f, gen(), device)
                plan = DenoisePlan(s.steps, 0, s.guidance_scale, False, s.eta)
                return r.denoiser.run(noise, plan, early=cond, late=cond, uncond_early=uncond, uncond_late=uncond)

        pipe = _diffusers_pipeline(comps, r.denoiser.scheduler, r.text_encoder)

        def diffusers_sampling() -> Any:
            with torch.no_grad(), r.precision.autocast():
                return pipe(prompts, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                            negative_prompt=[s.negative_prompt] * B if s.negative_prompt else None,
                            height=s.height, width=s.width, eta=s.eta, output_type="latent",
                            generator=gen(), return_dict=False)[0]

        # (b) one training step vs the sum of its parts
        k = s.grad_steps

        def train_step() -> None:
            stats = StepStats()
            r.micro_step(prompts, step_generator(cfg.train.seed, 0, 0), stats)
            r.optimizer_step()

        prefix_sched = _StopAfter(make_scheduler(s.scheduler, comps.scheduler), s.steps - k)
        prefix_denoiser = Denoiser(comps.unet, prefix_sched, r.precision.autocast)

        def part_prefix() -> torch.Tensor:
            with torch.no_grad():
                cond = r.conditioning(prompts)
                noise = torch.randn(shape, generator=gen()).to(device)
                return prefix_denoiser.run(noise, DenoisePlan(s.steps, 0, s.guidance_scale, False, s.eta), **cond)

        start_latent = part_prefix()

        def part_grad_steps() -> torch.Tensor:
            plan = DenoisePlan(s.steps, k, s.guidance_scale, cfg.memory.checkpoint_unet, s.eta)
            out = r.denoiser.run(start_latent.clone(), plan, start=s.steps - k, generator=gen(), **r.conditioning(prompts))
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
            r.optimizer_step()

        part_fns = {"no-grad steps": part_prefix, "grad steps (fwd, recompute, bwd)": part_grad_steps,
                    "decode fwd+bwd": part_decode, "reward fwd+bwd": part_reward, "optimizer": part_optimizer}
        fns: dict[str, Callable[[], Any]] = {"sampling": ours_sampling, "diffusers": diffusers_sampling,
                                             "step": train_step, **part_fns}

        # (c) a step with the prefix cache (entries already on disk) vs the step above
        if s.encoder_schedule == "two_encoder" and s.scheduler != "dpm++" and s.grad_steps_min is None:
            cache = for_recipe(r, root=Path(tmp) / "prefix")
            cache.prefill(prompts, batch_size=B, log=lambda m: None)

            def cached_step() -> None:
                r.prefix_cache = cache  # Recipe.generate_latents then runs only the last K steps
                try:
                    train_step()
                finally:
                    r.prefix_cache = None

            fns["cached"] = cached_step
        times = interleaved(fns, device, repeats)
        close = getattr(r.rewards, "close", None)
        if close is not None:
            close()

    med = {name: statistics.median(t) for name, t in times.items()}
    rounds = range(repeats)
    parts_sum = [sum(times[n][i] for n in part_fns) for i in rounds]
    ratio = lambda a, b: statistics.median(a[i] / b[i] for i in rounds)
    cached = "cached" in times
    return {
        "device": _device_name(device), "model": model or cfg.model.source, "torch": torch.__version__,
        "repeats": repeats,
        "setting": {"height": s.height, "width": s.width, "batch_size": B, "steps": s.steps, "grad_steps": k,
                    "guidance_scale": s.guidance_scale, "scheduler": s.scheduler, "precision": r.precision.name,
                    "checkpoint_unet": cfg.memory.checkpoint_unet, "checkpoint_vae": cfg.memory.checkpoint_vae},
        "sampling_s": med["sampling"], "diffusers_sampling_s": med["diffusers"],
        "sampling_ratio": ratio(times["sampling"], times["diffusers"]),
        "step_s": med["step"], "parts_s": {n: med[n] for n in part_fns}, "parts_sum_s": statistics.median(parts_sum),
        "step_over_parts": ratio(times["step"], parts_sum),
        "cached_step_s": med["cached"] if cached else None,
        "cached_ratio": ratio(times["cached"], times["step"]) if cached else None,
        "steps_per_hour": 3600 / med["step"], "cached_steps_per_hour": 3600 / med["cached"] if cached else None,
        "targets": {"sampling_ratio": 1.05, "step_over_parts": 1.10, "cached_ratio": 0.2},
    }


def _diffusers_pipeline(comps: Any, scheduler: Any, text_encoder: nn.Module) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=type(scheduler).from_config(scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _device_name(device: torch.device) -> str:
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
    else:
        lines.append("  (c) prefix cache: not applicable (needs two_encoder, ddim/euler, fixed K)")
    lines.append(f"  (d) {rep['steps_per_hour']:.0f} steps/hour" + (
        f"; {rep['cached_steps_per_hour']:.0f} with the prefix cache" if rep["cached_steps_per_hour"] else ""))
    return "\n".join(lines)


def _speed(args: argparse.Namespace) -> int:
    from tc_lite.config import load_config

    overrides = list(args.overrides)
    if args.model == "mid":  # the preset's rewards need downloads: a random ViT reward of realistic cost instead
        terms = load_config(args.preset, overrides).rewards.terms
        overrides = [*(f"rewards.terms.{name}.weight=0" for name in terms if name != "vit"), *MID_OVERRIDES, *overrides]
    elif args.model == "tiny":
        overrides = ["model.source=tiny", *overrides]
    cfg = load_config(args.preset, overrides)
    if not torch.cuda.is_available() and args.model is None and cfg.model.source != "tiny":
        raise UserError("bench speed: no CUDA GPU here, and a full-size model on the CPU takes minutes per step; "
                        "use --model tiny or --model mid (built in code, nothing downloaded)")
    rep = speed_report(cfg, model=args.model, repeats=args.repeats)
    print(json.dumps(rep, indent=2, default=str) if args.json else format_speed(rep))
    return 0


# --------------------------------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="estimate GPU memory, or time the training step, of a preset")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    m = bsub.add_parser("memory", help="estimated peak GPU memory of one training step (no GPU, no download)")
    m.add_argument("preset", help="YAML preset, e.g. presets/aesthetic.yaml")
    m.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=4")
    m.add_argument("--json", action="store_true", help="print JSON instead of the table")
    m.add_argument("--exact", action="store_true", help="trace every grad step instead of extrapolating from three")
    m.add_argument("--measure", dest="measure", action="store_true", default=None,
                   help="also run real steps and print torch.cuda.max_memory_allocated (default on CUDA machines)")
    m.add_argument("--no-measure", dest="measure", action="store_false")
    m.set_defaults(func=_memory)
    s = bsub.add_parser("speed", help="time sampling and a training step against diffusers and their parts")
    s.add_argument("preset")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--model", choices=["tiny", "mid"], default=None,
                   help="replace the preset's model by the tiny or a mid-size model built in code (CPU timing)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_speed)
