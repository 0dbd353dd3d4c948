"""When the prefix cache may be used: the one place that decides it (the config check and the cache both ask here).

Kept free of torch so that checking a preset stays instant."""

from __future__ import annotations

from typing import Any

__all__ = ["prefix_cache_problems"]


def prefix_cache_problems(sampling: Any, adapters: Any = None, unet_mode: str = "none") -> list[str]:
    """Why the prefix cache cannot be used with these settings (empty: it can). The one place that decides it;
    the config check (before any adapter exists: `unet_mode`) and the cache itself (`adapters`) both ask here."""
    problems = []
    if unet_mode != "none" and not any(a.affects_prefix for a in adapters or ()):
        problems.append("sampling.prefix_cache: a UNet LoRA (unet.mode=lora) changes every denoising step, the no-grad "
                        "prefix included, while it trains, so a cached prefix would be stale; set "
                        "sampling.prefix_cache=none")
    if sampling.encoder_schedule != "two_encoder":
        problems.append("sampling.prefix_cache: needs sampling.encoder_schedule=two_encoder (only then do the early "
                        "steps not depend on the trained weights)")
    if sampling.scheduler == "dpm++":
        problems.append("sampling.prefix_cache: DPM++ carries a multistep history the cached latent does not hold; "
                        "use sampling.scheduler=ddim or euler")
    if sampling.grad_steps_min is not None:
        problems.append("sampling.prefix_cache: random truncation (grad_steps_min) changes where the prefix ends; "
                        "unset one of them")
    for a in adapters or ():
        if a.affects_prefix:
            problems.append(f"sampling.prefix_cache: the {a.kind} on {a.key} changes the no-grad prefix while it "
                            "trains, so a cached prefix would be stale; turn the cache off")
    return problems
