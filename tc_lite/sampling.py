"""Text conditioning and the denoising loop with truncated backpropagation.

The first T−K steps run under `no_grad` (their gradients explode or vanish, and storing them would not fit);
only the last K steps build a graph, each UNet call wrapped in non-reentrant activation checkpointing so the
memory cost is one UNet call's activations whatever K is. The scheduler's `step` stays outside the checkpoint:
it mutates scheduler state, and a recomputation must not advance it twice.

With the two-encoder schedule (the official TextCraftor code) the early steps are conditioned by the ORIGINAL
encoder and the last K by the tuned one, so the latent reached after step T−K does not depend on the trained
weights at all (the prefix can be cached; see DESIGN.md §1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch.utils.checkpoint import checkpoint

from .precision import autocast_for

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
class Cond:
    """Conditioning for one batch. SDXL will add pooled embeddings and time ids in `added` (UNet added_cond_kwargs)."""

    hidden: torch.Tensor  # [B, 77, D]
    added: dict[str, torch.Tensor] | None = None

    @staticmethod
    def cat(a: "Cond", b: "Cond") -> "Cond":
        added = None if a.added is None else {k: torch.cat([a.added[k], b.added[k]]) for k in a.added}
        return Cond(torch.cat([a.hidden, b.hidden]), added)

    def expand(self, n: int) -> "Cond":
        if self.hidden.shape[0] == n:
            return self
        added = None if self.added is None else {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()}
        return Cond(self.hidden.expand(n, *self.hidden.shape[1:]), added)


class TextConditioner:
    """Tokenise and encode prompts with the tuned encoder, or with the original one.

    `original` is a context manager factory under which `encoder` behaves as the untouched base model: with a
    LoRA that is "adapter disabled" (no second copy in memory); for full fine-tuning it swaps in a frozen copy.
    """

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module, device: torch.device,
                 original: Callable[[], ContextManager] = contextlib.nullcontext,
                 original_encoder: torch.nn.Module | None = None):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.device = device
        self.original = original
        self.original_encoder = original_encoder

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    def tuned(self, prompts: list[str]) -> Cond:
        return Cond(self.encoder(self.tokenize(prompts))[0])

    @torch.no_grad()
    def base(self, prompts: list[str]) -> Cond:
        if self.original_encoder is not None:
            return Cond(self.original_encoder(self.tokenize(prompts))[0])
        with self.original():
            return Cond(self.encoder(self.tokenize(prompts))[0])


@dataclass
class DenoisePlan:
    """What one denoising pass does: T steps, the last `grad_steps` with gradients, classifier-free guidance."""

    steps: int
    grad_steps: int
    guidance_scale: float
    checkpoint: bool = True
    eta: float = 0.0


class Denoiser:
    """Runs the scheduler loop; the same object serves training (grad tail) and plain sampling (grad_steps=0)."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any, autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        self.unet = unet
        self.scheduler = scheduler
        self.autocast = autocast_for(unet, autocast)  # none for a frozen half-precision UNet: it runs natively
        self.dtype = next(unet.parameters()).dtype

    def initial_latents(self, n: int, channels: int, height: int, width: int, generator: torch.Generator,
                        device: torch.device) -> torch.Tensor:
        shape = (n, channels, height, width)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    def _eps(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, guidance: float,
             use_checkpoint: bool) -> torch.Tensor:
        n = latents.shape[0]
        both = Cond.cat(uncond.expand(n), cond)
        x = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)

        added = None if both.added is None else {k: v.to(self.dtype) for k, v in both.added.items()}

        def call(x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                out = self.unet(x.to(self.dtype), t, encoder_hidden_states=hidden.to(self.dtype),
                                added_cond_kwargs=added).sample
            return out.float()

        if use_checkpoint:
            out = checkpoint(call, x, both.hidden, use_reentrant=False)
        else:
            out = call(x, both.hidden)
        e_uncond, e_cond = out.chunk(2)
        return e_uncond + guidance * (e_cond - e_uncond)

    def run(self, latents: torch.Tensor, plan: DenoisePlan, *, early: Cond, late: Cond, uncond_early: Cond,
            uncond_late: Cond, generator: torch.Generator | None = None, start: int = 0) -> torch.Tensor:
        """Denoise. `early`/`uncond_early` condition the no-grad steps, `late`/`uncond_late` the last `grad_steps`.

        `latents` is pure noise when `start == 0`, else the latent reached after step `start` (a cached prefix:
        exact for the single-step schedulers DDIM and Euler; DPM++ keeps a history the prefix does not carry).
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
            if i < start:
                continue
            grad = i >= split
            cond, uncond = (late, uncond_late) if grad else (early, uncond_early)
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                eps = self._eps(latents, t, cond, uncond, plan.guidance_scale, plan.checkpoint and grad)
                latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        return latents
