"""The denoising loop with truncated backpropagation (conditioning comes from `tc_lite.conditioning`).

The first T−K steps run under `no_grad` (their gradients explode or vanish, and storing them would not fit);
only the last K steps build a graph, each UNet call wrapped in non-reentrant activation checkpointing so the
memory cost is one UNet call's activations whatever K is. The scheduler's `step` stays outside the checkpoint:
it mutates scheduler state, and a recomputation must not advance it twice.

`DenoisePlan.checkpoint_blocks` (`memory.checkpoint_unet_blocks`) goes one level finer: during a grad step's UNet
call, forward and recomputation alike, diffusers' own block checkpointing (`enable_gradient_checkpointing`) is on,
so the recomputation in backward keeps only each block's inputs plus one block's activations instead of the whole
call's (SDXL at 1024²: ~8 GiB less), for one more forward of every block.

With the two-encoder schedule (the official TextCraftor code) the early steps are conditioned by the ORIGINAL
encoder and the last K by the tuned one, so the latent reached after step T−K does not depend on the trained
weights at all (the prefix can be cached; see DESIGN.md §1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, Callable, ContextManager

import torch
from torch.utils.checkpoint import checkpoint

from .conditioning import Cond
from .precision import autocast_for

__all__ = ["SCHEDULERS", "Cond", "DenoisePlan", "Denoiser", "DriftPenalty", "blockwise_checkpointing",
           "make_scheduler"]

SCHEDULERS = ("ddim", "euler", "dpm++")


def make_scheduler(name: str, base: Any) -> Any:
    """A fresh scheduler of the requested kind, sharing the model's noise schedule (betas, spacing, offset)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = dict(base.config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULERS}")


@dataclass
class DenoisePlan:
    """What one denoising pass does: T steps, the last `grad_steps` with gradients, classifier-free guidance."""

    steps: int
    grad_steps: int
    guidance_scale: float
    checkpoint: bool = True
    eta: float = 0.0
    checkpoint_blocks: bool = False  # grad steps' UNet calls also checkpoint block by block (see the module docstring)


@contextlib.contextmanager
def blockwise_checkpointing(unet: torch.nn.Module, on: bool) -> Iterator[None]:
    """diffusers' per-block checkpointing switched on for one UNet call (a no-op when `on` is false). Scoped to the
    call, not left on the module, so no-grad sampling and rendering never see it and the previous state returns."""
    was = bool(getattr(unet, "is_gradient_checkpointing", False))
    if not on or was:
        yield
        return
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()


class DriftPenalty:
    """How far a trained UNet's noise predictions drift from the base UNet's (`unet.drift_weight`).

    In every grad step the `Denoiser` also runs the UNet under `original` (its LoRA off), without gradients, on the
    same latents and conditioning, and records mean((eps_tuned − eps_base)²); `take` returns their mean over the
    denoise and forgets them. A KL-like anchor (for Gaussian steps of equal variance the KL is this squared
    difference, scaled), which keeps the tuned model near the base where the reward does not pull.
    """

    def __init__(self, weight: float, original: Callable[[], ContextManager]):
        self.weight = weight
        self.original = original
        self.terms: list[torch.Tensor] = []

    def observe(self, tuned: torch.Tensor, base: Callable[[], torch.Tensor]) -> None:
        with torch.no_grad(), self.original():
            ref = base()
        self.terms.append(((tuned - ref) ** 2).mean())

    def take(self) -> torch.Tensor | None:
        if not self.terms:
            return None
        out, self.terms = torch.stack(self.terms).mean(), []
        return out


class Denoiser:
    """Runs the scheduler loop; the same object serves training (grad tail) and plain sampling (grad_steps=0)."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 drift: DriftPenalty | None = None):
        self.unet = unet
        self.scheduler = scheduler
        self.autocast = autocast_for(unet, autocast)  # none for a frozen half-precision UNet: it runs natively
        self.dtype = next(unet.parameters()).dtype
        self.drift = drift  # observes the grad steps' UNet calls (a trained UNet's drift from the base)

    def _eps(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, guidance: float,
             use_checkpoint: bool, blocks: bool = False, drift: DriftPenalty | None = None) -> torch.Tensor:
        n = latents.shape[0]
        both = Cond.cat(uncond.expand(n), cond)
        x = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)

        added = None if both.added is None else {k: v.to(self.dtype) for k, v in both.added.items()}

        def call(x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:  # also the recomputation in backward
            with self.autocast(), blockwise_checkpointing(self.unet, blocks):
                out = self.unet(x.to(self.dtype), t, encoder_hidden_states=hidden.to(self.dtype),
                                added_cond_kwargs=added).sample
            return out.float()

        if use_checkpoint:
            out = checkpoint(call, x, both.hidden, use_reentrant=False)
        else:
            out = call(x, both.hidden)
        if drift is not None:
            drift.observe(out, lambda: call(x, both.hidden))
        e_uncond, e_cond = out.chunk(2)
        return e_uncond + guidance * (e_cond - e_uncond)

    def run(self, latents: torch.Tensor, plan: DenoisePlan, *, early: Cond, late: Cond, uncond_early: Cond,
            uncond_late: Cond, generator: torch.Generator | None = None, start: int = 0,
            stop: int | None = None) -> torch.Tensor:
        """Denoise. `early`/`uncond_early` condition the no-grad steps, `late`/`uncond_late` the last `grad_steps`.

        `latents` is pure noise when `start == 0`, else the latent reached after step `start` (a cached prefix:
        exact for the single-step schedulers DDIM and Euler; DPM++ keeps a history the prefix does not carry).
        `stop` ends the loop before step `stop` (the prefix cache computes the latent after step T−K that way).
        """
        sched = self.scheduler
        sched.set_timesteps(plan.steps, device=latents.device)
        if start == 0:
            latents = latents * sched.init_noise_sigma
        elif hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        split = plan.steps - plan.grad_steps
        step_kwargs: dict[str, Any] = {}
        if "eta" in sched.step.__code__.co_varnames:
            step_kwargs = {"eta": plan.eta, "generator": generator}
        for i, t in enumerate(sched.timesteps):
            if stop is not None and i >= stop:
                break
            if i < start:
                continue
            grad = i >= split
            cond, uncond = (late, uncond_late) if grad else (early, uncond_early)
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                eps = self._eps(latents, t, cond, uncond, plan.guidance_scale, plan.checkpoint and grad,
                                plan.checkpoint_blocks and grad, self.drift if torch.is_grad_enabled() else None)
                latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        return latents
