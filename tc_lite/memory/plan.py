"""`memory.plan: auto`: pick the fastest memory settings whose estimated peak fits the card.

The candidates form a ladder from fastest to leanest; every rung saves memory over the one before, at some cost in
speed, so the first rung that fits is the fastest that fits, and a binary search finds it with ~3 estimates:

1. everything on the device, nothing recomputed (the user's batch);
2. `rewards.offload: cpu` -- reward weights (0.6-1.8 GiB each) in host RAM except while they score (~a few % time);
3. `memory.checkpoint_vae: true` -- the decoder's activations at full resolution recomputed (~+10% time);
4. `memory.checkpoint_unet: true` -- one UNet call's activations whatever K is (~+10-30% time);
5. `train.batch_size` halved, `train.grad_accum` doubled, down to batch 1 -- the same effective batch;
6. `memory.checkpoint_unet_blocks: true` -- the UNet call's recompute holds one block's activations (SDXL at
   1024²: -8.8 GiB; one more UNet forward per grad step, ~+12% of a step at K=5, T=25);
7. `rewards.offload: sequential` -- reward weights layer by layer (slowest).

Block checkpointing only pays where the grad steps' backward is the peak (SDXL; at SD1.5 512² the VAE's is), so a
plan that ends on a rung with it checks once whether the same settings fit without it, and then drops it.

K (`sampling.grad_steps`) is never lowered: it changes what is trained, and once UNet calls are checkpointed memory
does not depend on it. Nor is anything else the run trains or samples changed (the adapters, the resolution, the
prefix cache, which a UNet LoRA rules out): every rung is valid where the user's config is. Attention is PyTorch
SDPA (fused, O(N) memory; xformers saves nothing more on current GPUs).
The budget leaves room for what the estimate does not count: `vram_gb` less 0.75 GiB (CUDA context, kernels, cuBLAS
workspace) less 8% (allocator fragmentation). Estimates are cached on disk, so a restart plans instantly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tc_lite.config import Config
from tc_lite.errors import UserError
from tc_lite.memory.estimate import GiB, MemoryEstimate, estimate_memory

RESERVE_GIB = 0.75
FRAGMENTATION = 0.08
_CACHE_VERSION = "memory-estimate-v6"  # bump when the estimator changes what it counts


def budget_bytes(vram_gb: float) -> int:
    """What an estimate may reach on a card with `vram_gb` GiB (as cards and nvidia-smi count them)."""
    return int((vram_gb * (1 - FRAGMENTATION) - RESERVE_GIB) * GiB)


def smallest_card_gb(peak_bytes: int) -> float:
    """The smallest card (GB, as `memory.vram_gb`) whose budget holds `peak_bytes`: `budget_bytes` inverted."""
    return (peak_bytes / GiB + RESERVE_GIB) / (1 - FRAGMENTATION)


def _budget_line(vram: float, budget: int) -> str:
    return (f"memory plan for a {vram:.3g} GB card: budget {budget / GiB:.2f} GiB (less {RESERVE_GIB} GiB for the CUDA "
            f"context and {FRAGMENTATION:.0%} for fragmentation)")


@dataclass
class MemoryPlan:
    """The adjusted config, whether it fits, and one line per decision (printed at start-up)."""

    config: Config
    fits: bool
    peak: int
    budget: int
    reasons: list[str] = field(default_factory=list)
    vram_gb: float | None = None  # the card planned for (given, or detected)


@dataclass(frozen=True)
class _Rung:
    offload: str
    checkpoint_vae: bool
    checkpoint_unet: bool
    batch_size: int
    grad_accum: int
    checkpoint_unet_blocks: bool = False

    def apply(self, cfg: Config) -> Config:
        return dataclasses.replace(
            cfg,
            rewards=dataclasses.replace(cfg.rewards, offload=self.offload),
            memory=dataclasses.replace(cfg.memory, checkpoint_vae=self.checkpoint_vae,
                                       checkpoint_unet=self.checkpoint_unet,
                                       checkpoint_unet_blocks=self.checkpoint_unet_blocks, attention="sdpa"
                                       if cfg.memory.attention == "xformers" else cfg.memory.attention),
            train=dataclasses.replace(cfg.train, batch_size=self.batch_size, grad_accum=self.grad_accum))


def ladder(cfg: Config) -> list[_Rung]:
    """The candidate settings from fastest to leanest (see the module docstring)."""
    b, a = cfg.train.batch_size, cfg.train.grad_accum
    rungs = [_Rung("none", False, False, b, a), _Rung("cpu", False, False, b, a), _Rung("cpu", True, False, b, a),
             _Rung("cpu", True, True, b, a)]
    want = b * a
    while b > 1:
        b = b // 2
        a = -(-want // b)  # an odd batch cannot keep the effective batch exactly: round up, never shrink it
        rungs.append(_Rung("cpu", True, True, b, a))
    rungs.append(_Rung("cpu", True, True, b, a, checkpoint_unet_blocks=True))
    rungs.append(_Rung("sequential", True, True, b, a, checkpoint_unet_blocks=True))
    return rungs


def _cache_key(cfg: Config) -> str:
    import diffusers
    import transformers

    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("model", "lora", "unet", "sampling", "rewards")}
    relevant["memory"] = {k: v for k, v in d["memory"].items() if k not in ("plan", "vram_gb")}
    relevant["optim"] = d["optim"]["name"]
    relevant["train"] = {"batch_size": d["train"]["batch_size"], "accumulating": d["train"]["grad_accum"] > 1}
    relevant["versions"] = [_CACHE_VERSION, torch.__version__, diffusers.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_estimate(cfg: Config, estimator: Callable[[Config], MemoryEstimate] = estimate_memory,
                    use_cache: bool = True) -> dict[str, Any]:
    """`estimator(cfg).to_dict()`, read from / written to the tc-lite cache folder."""
    from tc_lite.io import save_json_atomic
    from tc_lite.models._cache import cache_root

    path = cache_root() / "memory" / f"{_cache_key(cfg)}.json"
    if use_cache and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    result = estimator(cfg).to_dict()
    if use_cache:
        save_json_atomic(result, path)
    return result


def _describe(rung: _Rung, base: Config, est: dict[str, Any]) -> list[str]:
    out = []
    if rung.offload != "none":
        out.append(f"rewards.offload={rung.offload}: reward weights stay in host RAM and visit the GPU only while "
                   "they score" + (" (layer by layer: slowest)" if rung.offload == "sequential" else ""))
    else:
        out.append("rewards.offload=none: reward models stay on the GPU (fastest)")
    out.append(f"memory.checkpoint_vae={str(rung.checkpoint_vae).lower()}: " + (
        "decoder blocks recomputed in backward (~+10% time)" if rung.checkpoint_vae else "no decoder recompute"))
    k = base.sampling.grad_steps
    out.append(f"memory.checkpoint_unet={str(rung.checkpoint_unet).lower()}: " + (
        f"the {k} grad steps hold one UNet call's activations between them; K={k} kept (memory is flat in K)"
        if rung.checkpoint_unet else f"K={k} grad steps keep their activations (fits without recompute)"))
    if rung.checkpoint_unet_blocks:
        out.append("memory.checkpoint_unet_blocks=true: each UNet call's recompute holds one block's activations "
                   "(one more UNet forward per grad step)")
    if (rung.batch_size, rung.grad_accum) != (base.train.batch_size, base.train.grad_accum):
        out.append(f"train.batch_size={rung.batch_size}, train.grad_accum={rung.grad_accum}: effective batch "
                   f"{rung.batch_size * rung.grad_accum} (was {base.train.batch_size} x {base.train.grad_accum})")
    out.append("memory.attention=sdpa: PyTorch's fused attention, O(N) memory")
    return out


def _upcast_hint(cfg: Config, est: dict[str, Any]) -> str:
    """What to say first when the estimate decodes with a VAE upcast to fp32 on half-precision weights (SDXL's)."""
    setting = est.get("setting", {})
    if setting.get("vae_dtype") != "fp32" or str(setting.get("precision", "")).startswith("fp32"):
        return ""
    return ("the VAE decodes in fp32 here (memory.vae_precision: it overflows in fp16): an fp16-safe VAE "
            "(model.vae=madebyollin/sdxl-vae-fp16-fix) or memory.precision=bf16 on a card that has it halves that; or ")


def plan_memory(cfg: Config, vram_gb: float | None = None, *,
                estimator: Callable[[Config], MemoryEstimate] = estimate_memory, use_cache: bool = True) -> MemoryPlan:
    """The fastest rung of `ladder(cfg)` whose estimate fits `vram_gb` (default `cfg.memory.vram_gb`)."""
    base = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, plan="manual"))
    if base.memory.device == "cpu":
        return MemoryPlan(base, True, 0, 0, ["memory.plan=auto: memory.device is cpu; nothing to plan (it sizes GPUs)"])
    vram = vram_gb if vram_gb is not None else cfg.memory.vram_gb
    if vram is None:
        vram = detected_vram_gb()
    if vram is None:
        raise UserError("memory.vram_gb: memory.plan=auto sizes the run for a GPU, and PyTorch sees none here to "
                        "measure; give the card's memory in GB, e.g. memory.vram_gb=8")
    budget = budget_bytes(vram)
    rungs = ladder(base)
    peaks: dict[int, dict[str, Any]] = {}

    def peak(i: int) -> int:
        if i not in peaks:
            peaks[i] = cached_estimate(rungs[i].apply(base), estimator, use_cache)
        return int(peaks[i]["peak_bytes"])

    lo, hi = 0, len(rungs) - 1  # find the first rung that fits (peaks do not increase along the ladder)
    if peak(hi) > budget:
        lean = rungs[hi].apply(base)
        return MemoryPlan(lean, False, peak(hi), budget, vram_gb=vram, reasons=[
            _budget_line(vram, budget),
            (f"does not fit: even the leanest settings need {peak(hi) / GiB:.2f} GiB (batch {rungs[hi].batch_size}, "
            "everything checkpointed and offloaded); " + _upcast_hint(base, peaks[hi]) + "lower sampling.height/width "
            "(memory grows with the pixel count) or use a card with more memory")])
    while lo < hi:
        mid = (lo + hi) // 2
        if peak(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    faster = lo - 1 if lo > 0 and lo - 1 in peaks else None  # the rung before, when it was estimated
    if rungs[lo].checkpoint_unet_blocks:  # only where it pays (see the module docstring)
        without = dataclasses.replace(rungs[lo], checkpoint_unet_blocks=False)
        if without not in rungs:
            rungs.append(without)
        if peak(rungs.index(without)) <= budget:
            lo = rungs.index(without)
    chosen, est = rungs[lo], peaks[lo]
    reasons = [_budget_line(vram, budget),
               *_describe(chosen, base, est),
               f"estimated peak {peak(lo) / GiB:.2f} GiB (in {est['peak_phase']})"
               + (f"; the next faster settings need {peak(faster) / GiB:.2f} GiB" if faster is not None else "")]
    return MemoryPlan(chosen.apply(base), True, peak(lo), budget, reasons, vram_gb=vram)


def detected_vram_gb() -> float | None:
    """The current CUDA card's total memory in GiB (what `memory.vram_gb` means), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB


def apply_memory_plan(cfg: Config, log: Callable[[str], None] = print, **plan_kwargs: Any) -> Config:
    """What `Recipe.setup` calls first when `memory.plan: auto`: log the decisions, return the adjusted config,
    or stop with a UserError naming the fix when nothing fits. `plan_kwargs` go to `plan_memory`."""
    if cfg.memory.plan != "auto":
        return cfg
    plan = plan_memory(cfg, **plan_kwargs)
    for line in plan.reasons:
        log(line)
    if not plan.fits:
        raise UserError(f"memory.vram_gb={plan.vram_gb:.3g}: {plan.reasons[-1]}")
    return plan.config
