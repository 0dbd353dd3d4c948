"""The checks `scripts/gpu_check.sh` runs (`tc_lite.bench.gpu_check` runs them, each on its own, within a budget).

Every GPU check runs the real code path -- `Recipe.setup()` and `Recipe.train_step()`, `bench speed` -- on the
full-size SD1.5 architecture with random weights (`tc_lite.bench.models.build_sd15_components`; the SDXL checks
on full-size SDXL base, `build_sdxl_components`) and random-weight rewards of the right architectures
(`tc_lite.bench.random_rewards`): the memory and the time of the real models, nothing downloaded. Estimates beside measurements come from `tc_lite.memory.estimate_memory` on the preset as
written (it knows the built-in rewards' shapes).

A check returns a dict: `summary` (one line for the markdown table), its numbers, and `warning` when it ran but
something deserves a look (the estimate more than 10% under the measured peak, non-finite losses, ...); it raises
`Unavailable` when its subject is not installed or not supported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "presets"
GiB = 2**30
MEASURE_TOLERANCE = 1.10  # warn when the measured peak exceeds the estimate by more than this factor


class Unavailable(Exception):
    """What a check exercises is not installed or not supported on this machine (recorded, not a failure)."""


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    budget_s: float
    run: Callable[["Context"], dict[str, Any]]
    min_s: float = 0.0  # skipped (not cut short) when less of the run's total budget is left


@dataclass
class Context:
    """What every check may read: overrides appended to every config (`--smoke` shrinks the GPU checks to run
    anywhere, for developing them), and whether a CUDA GPU is the target."""

    extra_overrides: list[str] = field(default_factory=list)
    cuda: bool = False


def _preset(name: str) -> str:
    return str(PRESETS / name)


def _half() -> str:
    """bf16 where the card has it (fp16 and bf16 take the same bytes; bf16 steps are never skipped), else fp16."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def _config(ctx: Context, preset: str, overrides: list[str]) -> Any:
    from tc_lite.config import load_config

    return load_config(_preset(preset), [*overrides, *ctx.extra_overrides])


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GiB, 3)


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def _steps(ctx: Context, cfg: Any, steps: int, model: str = "sd15") -> dict[str, Any]:
    from tc_lite.bench.memory import run_steps
    from tc_lite.bench.random_rewards import random_rewards

    return run_steps(random_rewards(cfg), steps, model=model, measure_from=1)


def _room_for(est: Any) -> None:
    """Unavailable when the card is smaller than the estimate plus the CUDA context (an OOM would say nothing)."""
    if not torch.cuda.is_available():
        return
    from tc_lite.memory.plan import RESERVE_GIB, smallest_card_gb

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if total < est.peak + RESERVE_GIB * GiB:
        raise Unavailable(f"this card has {total / GiB:.1f} GiB; the estimate is {est.peak_gib:.2f} GiB "
                          f"(cards from {smallest_card_gb(est.peak):.1f} GB)")


def _estimate_and_measure(ctx: Context, preset: str, overrides: list[str], steps: int = 2,
                          model: str = "sd15") -> dict[str, Any]:
    """`bench memory` with real steps: the estimate of `preset` beside the measured steady-state peak."""
    from tc_lite.memory import estimate_memory

    cfg = _config(ctx, preset, [f"memory.precision={_half()}", *overrides])
    s = cfg.sampling  # the no-grad prefix shortened to one step: memory does not depend on it (docs/memory.md)
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(s, steps=min(s.steps, s.grad_steps + 1)))
    est = estimate_memory(cfg)
    _room_for(est)
    run = _steps(ctx, cfg, steps, model)
    measured = run["max_allocated"]
    out: dict[str, Any] = {
        "preset": f"presets/{preset}", "overrides": overrides, "model": model, "precision": run["precision"],
        "sampling_steps": cfg.sampling.steps, "grad_steps": cfg.sampling.grad_steps,
        "estimate_gib": round(est.peak_gib, 3), "estimate_phase": est.peak_phase, "estimate_s": round(est.seconds, 1),
        "measured_gib": _gib(measured), "reserved_gib": _gib(run["max_reserved"]),
        "estimate_over_measured": round(est.peak / measured, 3) if measured else None,
        "step_s": round(run["step_s"][-1], 3), "loss_finite": _finite(run["loss"]), "run": run,
    }
    if measured:
        out["summary"] = (f"estimate {est.peak_gib:.2f} GiB, measured {measured / GiB:.2f} GiB (reserved "
                          f"{run['max_reserved'] / GiB:.2f}); estimate/measured {est.peak / measured:.3f}; "
                          f"step {run['step_s'][-1]:.2f} s")
        if measured > est.peak * MEASURE_TOLERANCE:
            out["warning"] = f"measured peak exceeds the estimate by {measured / est.peak - 1:.0%}"
    else:
        out["summary"] = f"estimate {est.peak_gib:.2f} GiB; not measured (no CUDA); step {run['step_s'][-1]:.2f} s"
    if not out["loss_finite"]:
        out["warning"] = f"non-finite loss: {run['loss']}"
    return out


# ------------------------------------------------------------------------------------------------- GPU checks


def memory_check(preset: str, overrides: list[str] | None = None) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: _estimate_and_measure(ctx, preset, list(overrides or []))


def sdxl_memory_check(preset: str, overrides: list[str] | None = None) -> Callable[[Context], dict[str, Any]]:
    """An SDXL preset's estimate beside two real steps of full-size SDXL base with random weights (the estimate's
    first check against a GPU: docs/memory.md labels every SDXL number estimated until this has run)."""

    def run(ctx: Context) -> dict[str, Any]:
        out = _estimate_and_measure(ctx, preset, list(overrides or []), model="sdxl")
        out["vae_dtype"] = out["run"].get("vae_dtype")
        return out

    return run


def precision_check(name: str, steps: int = 4) -> Callable[[Context], dict[str, Any]]:
    """A few steps in fp16 (with the GradScaler) or bf16: losses finite? steps skipped? the scale."""

    def run(ctx: Context) -> dict[str, Any]:
        if name == "bf16" and ctx.cuda and not torch.cuda.is_bf16_supported():
            raise Unavailable("this GPU has no bf16 support")
        cfg = _config(ctx, "aesthetic.yaml", [f"memory.precision={name}", "train.grad_accum=1"])
        r = _steps(ctx, cfg, steps)
        skipped = sum(r["skipped"])
        finite = sum(math.isfinite(v) for v in r["loss"])
        scale = f", loss scale {r['scale']:g}" if r["scale"] is not None else ""
        out = {"precision": r["precision"], "steps": steps, "finite_losses": finite, "skipped_steps": skipped,
               "scale": r["scale"], "loss": r["loss"], "grad_norm": r["grad_norm"],
               "step_s": round(r["step_s"][-1], 3), "max_allocated_gib": _gib(r["max_allocated"]),
               "summary": f"{r['precision']}: {finite}/{steps} losses finite, {skipped} skipped{scale}; "
                          f"step {r['step_s'][-1]:.2f} s"}
        if finite < steps:
            out["warning"] = "non-finite losses"
        elif skipped == steps or (name != "fp16" and skipped):
            out["warning"] = "every step was skipped" if skipped == steps else "steps were skipped"
        return out

    return run


def adamw8bit_check(ctx: Context) -> dict[str, Any]:
    """8-bit AdamW (bitsandbytes) on the full text encoder, where its memory saving matters."""
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a native library built for another CUDA
        raise Unavailable(f"bitsandbytes not installed ({type(e).__name__}: {e})".replace("\n", " ")[:300]) from None
    out = _estimate_and_measure(ctx, "aesthetic.yaml", ["lora.mode=full", "optim.name=adamw8bit"], steps=3)
    out["optimizer"] = out["run"]["optimizer"]
    out["bitsandbytes"] = getattr(bitsandbytes, "__version__", "?")
    out["summary"] = f"{out['optimizer']}, lora.mode=full: {out['summary']}"
    if out["optimizer"] != "AdamW8bit":
        out["warning"] = f"the optimizer is {out['optimizer']}, not AdamW8bit"
    return out


def xformers_check(ctx: Context) -> dict[str, Any]:
    from tc_lite.precision import xformers_available

    try:
        import xformers
    except Exception:
        raise Unavailable("xformers not installed (PyTorch SDPA is used; it is as memory-efficient)") from None
    if not xformers_available():
        raise Unavailable(f"xformers {getattr(xformers, '__version__', '?')} is installed but xformers.ops does not "
                          "import (built for another torch/CUDA?)")
    cfg = _config(ctx, "aesthetic.yaml", [f"memory.precision={_half()}", "memory.attention=xformers",
                                          "train.grad_accum=1"])
    r = _steps(ctx, cfg, 2)
    out = {"attention": r["attention"], "xformers": getattr(xformers, "__version__", "?"),
           "max_allocated_gib": _gib(r["max_allocated"]), "step_s": round(r["step_s"][-1], 3),
           "loss_finite": _finite(r["loss"]),
           "summary": f"attention {r['attention']}: peak {_gib(r['max_allocated'])} GiB, step {r['step_s'][-1]:.2f} s"}
    if r["attention"] != "xformers":
        out["warning"] = f"asked for xformers, ran {r['attention']}"
    return out


def offload_check(mode: str) -> Callable[[Context], dict[str, Any]]:
    """All four rewards offloaded `cpu` (one model on the GPU at a time) or `sequential` (layer by layer)."""

    def run(ctx: Context) -> dict[str, Any]:
        out = _estimate_and_measure(ctx, "all-rewards.yaml", [f"rewards.offload={mode}", "train.grad_accum=1"])
        out["summary"] = f"offload {mode}: {out['summary']}"
        return out

    return run


def speed_check(overrides: list[str] | None = None, repeats: int = 3) -> Callable[[Context], dict[str, Any]]:
    """`bench speed presets/aesthetic.yaml --model sd15`: Renderer vs diffusers, step vs parts, cached step."""

    def run(ctx: Context) -> dict[str, Any]:
        from tc_lite.bench.speed import speed_config, speed_report

        cfg = speed_config(_preset("aesthetic.yaml"), [*(overrides or []), *ctx.extra_overrides], "sd15")
        rep = speed_report(cfg, model="sd15", repeats=repeats, log=lambda m: None)
        return _speed_result(rep)

    return run


def _speed_result(rep: dict[str, Any]) -> dict[str, Any]:
    from tc_lite.bench.speed import format_speed

    cached = f", {rep['cached_steps_per_hour']:,.0f} cached" if rep["cached_steps_per_hour"] else ""
    c = f"{rep['cached_ratio']:.3f}x" if rep["cached_ratio"] is not None else "n/a"
    s = rep["setting"]
    out = {"report": rep, "text": format_speed(rep),
           "summary": (f"T={s['steps']} K={s['grad_steps']} B={s['batch_size']}: (a) sampling/diffusers "
                       f"{rep['sampling_ratio']:.3f}x, (b) step/parts {rep['step_over_parts']:.3f}x, (c) cached/full "
                       f"{c}; (d) {rep['steps_per_hour']:,.0f} steps/h{cached}; step {rep['step_s']:.2f} s")}
    over = [f"({k}) {rep[key]:.3f}x over its target {rep['targets'][key]}" for k, key in (("a", "sampling_ratio"),
                                                                          ("b", "step_over_parts"))
            if rep[key] > rep["targets"][key]]
    if rep.get("cached_error"):
        over.append(f"(c) the prefix cache failed: {rep['cached_error']}")
    if over:
        out["warning"] = "; ".join(over)
    return out


GPU_CHECKS = [
    Check("memory/aesthetic", "bench memory presets/aesthetic.yaml (real steps)", 75, memory_check("aesthetic.yaml")),
    Check("memory/all-rewards", "bench memory presets/all-rewards.yaml (real steps)", 100,
          memory_check("all-rewards.yaml")),
    Check("memory/aesthetic-b4-12gb", "bench memory presets/aesthetic-b4-12gb.yaml (real steps)", 75,
          memory_check("aesthetic-b4-12gb.yaml")),
    Check("precision/fp16", "4 fp16 steps with the loss scaler", 60, precision_check("fp16")),
    Check("precision/bf16", "4 bf16 steps", 60, precision_check("bf16")),
    Check("optim/adamw8bit", "8-bit AdamW (bitsandbytes), lora.mode=full", 75, adamw8bit_check),
    Check("attention/xformers", "memory.attention=xformers", 45, xformers_check),
    Check("offload/cpu", "all-rewards, rewards.offload=cpu (accum 1)", 60, offload_check("cpu")),
    Check("offload/sequential", "all-rewards, rewards.offload=sequential (accum 1)", 90, offload_check("sequential")),
    Check("speed/aesthetic", "bench speed presets/aesthetic.yaml --model sd15 (T=25, K=5)", 120, speed_check()),
    Check("speed/t50-k1", "bench speed, T=50 K=1 (the prefix cache's target setting)", 90,
          speed_check(["sampling.steps=50", "sampling.grad_steps=1"], repeats=2)),
    # last, so the SD1.5 checks keep their time; skipped (with the command to run it alone) when < 90 s are left
    Check("memory/sdxl-12gb", "bench memory presets/sdxl-12gb.yaml (real steps, full-size SDXL)", 150,
          sdxl_memory_check("sdxl-12gb.yaml"), min_s=90),
]
# Not in the default run (time): --only memory/sdxl-aesthetic. fp16 on any card, so SDXL's VAE decodes in fp32.
SDXL_EXTRA_CHECKS = [
    Check("memory/sdxl-aesthetic", "bench memory presets/sdxl-aesthetic.yaml, fp16 (VAE in fp32), full-size SDXL",
          180, sdxl_memory_check("sdxl-aesthetic.yaml", ["memory.precision=fp16"]), min_s=120),
]
# Not in the default run (time): --only memory/aesthetic-te-unet, the UNet LoRA preset's estimate vs real steps.
UNET_EXTRA_CHECKS = [
    Check("memory/aesthetic-te-unet", "bench memory presets/aesthetic-te-unet.yaml (real steps, TE + UNet LoRA)", 75,
          memory_check("aesthetic-te-unet.yaml")),
]


# ------------------------------------------------------------------------------------------------- CPU subset


def tiny_estimate_check(ctx: Context) -> dict[str, Any]:
    from tc_lite.memory import estimate_memory

    est = estimate_memory(_config(ctx, "tiny-cpu.yaml", ["memory.device=auto"]))
    return {"estimate_gib": round(est.peak_gib, 4), "estimate_phase": est.peak_phase,
            "estimate_s": round(est.seconds, 2),
            "summary": f"tiny model, GPU target: estimated peak {est.peak / 2**20:.1f} MiB in {est.peak_phase}"}


def tiny_steps_check(ctx: Context) -> dict[str, Any]:
    from tc_lite.bench.memory import run_steps

    r = run_steps(_config(ctx, "tiny-cpu.yaml", ["sampling.steps=4", "sampling.grad_steps=1"]), 2)
    out = {"loss": r["loss"], "skipped": r["skipped"], "step_s": r["step_s"], "device": r["device"],
           "summary": f"2 tiny steps on {r['device']} ({r['precision']}): losses "
                      f"{', '.join(f'{v:.4f}' for v in r['loss'])}; {r['step_s'][-1]:.3f} s/step"}
    if not _finite(r["loss"]):
        out["warning"] = "non-finite loss"
    return out


def tiny_speed_check(ctx: Context) -> dict[str, Any]:
    from tc_lite.bench.speed import speed_config, speed_report

    cfg = speed_config(_preset("tiny-cpu.yaml"), ["sampling.steps=4", "sampling.grad_steps=1", "train.batch_size=2"],
                       "tiny")
    rep = speed_report(cfg, model="tiny", repeats=1, log=lambda m: None)
    out = _speed_result(rep)
    if not rep.get("cached_error"):
        out.pop("warning", None)  # one round on a shared CPU: ratios are noise, not a finding
    return out


CPU_CHECKS = [
    Check("estimate/tiny", "bench memory presets/tiny-cpu.yaml (estimate only)", 45, tiny_estimate_check),
    Check("steps/tiny", "2 training steps of the tiny model", 45, tiny_steps_check),
    Check("speed/tiny", "bench speed presets/tiny-cpu.yaml, 1 repeat", 60, tiny_speed_check),
]

CHECKS = {c.name: c for c in [*GPU_CHECKS, *SDXL_EXTRA_CHECKS, *UNET_EXTRA_CHECKS, *CPU_CHECKS]}
