"""`bench memory`: the estimate of one training step's peak GPU memory and, on CUDA, the measured peak beside it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from tc_lite.errors import UserError


def quiet_config(cfg: Any, out_dir: str, **train: Any) -> Any:
    """`cfg` for a benchmark run in `out_dir`: no resume, checkpoints, samples, progress bar or evaluation;
    `train` overrides fields of the train section (steps, grad_accum)."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, resume=None, checkpoint_every=0, **train),
        output=dataclasses.replace(cfg.output, dir=out_dir, overwrite=True),
        logging=dataclasses.replace(cfg.logging, sample_every=0, progress=False, tensorboard=False),
        eval=dataclasses.replace(cfg.eval, every=0))


def close_recipe(recipe: Any) -> None:
    """Give back what a benchmark recipe holds (sequential offload hooks; the GPU's cached blocks)."""
    close = getattr(getattr(recipe, "rewards", None), "close", None)
    if close is not None:
        close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_steps(cfg: Any, steps: int = 2, *, model: str | None = None, measure_from: int = 1,
              log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Set up the Recipe for `cfg` and run `steps` real optimizer steps (`Recipe.train_step`, the TrainStep).

    Returns each step's wall time, loss, whether it was skipped, its grad norm; the loss scaler's scale (fp16),
    the attention and optimizer used; on CUDA the peak memory of the steps from `measure_from` on (the first
    warms up: optimizer state, allocator, kernels). `model`: see `tc_lite.bench.models.model_override`.
    """
    from tc_lite.bench.models import model_override
    from tc_lite.train import Recipe

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp, model_override(model):
        recipe = Recipe(quiet_config(cfg, tmp, steps=max(steps, 1)), log=log).setup()
        try:
            cuda = cuda and recipe.precision.device.type == "cuda"
            records, times = [], []
            for i in range(steps):
                sync()
                if cuda and i == measure_from:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                records.append(recipe.train_step())
                sync()
                times.append(time.perf_counter() - t0)
            scaler = recipe.precision.scaler
            out = {"device": str(recipe.precision.device), "precision": recipe.precision.name,
                   "attention": recipe.attention, "optimizer": type(recipe.optimizer).__name__,
                   "vae_dtype": str(next(recipe.components.vae.parameters()).dtype).removeprefix("torch."),
                   "step_s": times, "loss": [r["loss"] for r in records], "skipped": [r["skipped"] for r in records],
                   "grad_norm": [r["grad_norm"] for r in records],
                   "scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
                   "max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
                   "max_reserved": torch.cuda.max_memory_reserved() if cuda else None}
        finally:
            close_recipe(recipe)
    return out


def measure_peak(cfg: Any, log: Callable[[str], None] = print, model: str | None = None) -> dict[str, Any]:
    """Real steady-state peak on CUDA: one warm-up optimizer step, then the peak of the next one (and its time).
    `model`: a model built in code instead of the preset's (see `tc_lite.bench.models.model_override`)."""
    run = run_steps(cfg, 2, model=model, measure_from=1, log=log)
    return {"max_allocated": run["max_allocated"], "max_reserved": run["max_reserved"], "step_s": run["step_s"][-1],
            "loss": run["loss"][-1], "skipped": run["skipped"][-1]}


def run_memory(args: argparse.Namespace) -> int:
    from tc_lite.config import load_config
    from tc_lite.memory import GiB, estimate_memory
    from tc_lite.memory.plan import (
        FRAGMENTATION,
        RESERVE_GIB,
        apply_memory_plan,
        smallest_card_gb,
    )

    cfg = load_config(args.preset, args.overrides)
    model = getattr(args, "model", None)
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
        from tc_lite.bench.random_rewards import random_rewards

        real = measure_peak(random_rewards(cfg) if model in ("sd15", "sdxl") else cfg, log=lambda m: None, model=model)
        out["measured"] = {**real, "device": torch.cuda.get_device_name(), "model": model or cfg.model.source,
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
        print(f"\nmeasured on {m['device']} ({m['model']}): max_memory_allocated {m['max_allocated'] / GiB:.2f} GiB "
              f"(reserved {m['max_reserved'] / GiB:.2f} GiB); estimate / measured = {m['ratio_estimate_to_measured']:.3f}")
    return 0
