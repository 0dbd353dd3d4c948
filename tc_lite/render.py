"""The one render path: a `RenderPlan` built from the sampling settings and a `Renderer` that turns conditioning
and seeds into latents or images, without gradients. Training samples, held-out evaluation, `eval`, `sample`,
the prefix cache and `bench` all render through it, so an image is the same wherever it is made.

Every image's starting noise comes from its own seed (`torch.Generator().manual_seed(seed)`), so images compare
across models, weights, prompts and calls. With `eta > 0` (stochastic DDIM) images are rendered one at a time,
each drawing its DDIM noise from its own seed's generator after the starting noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from tc_lite.conditioning import Cond
from tc_lite.decode import decode
from tc_lite.sampling import DenoisePlan, Denoiser, make_scheduler


@dataclass(frozen=True)
class RenderPlan:
    """How to render: T steps, CFG, scheduler, size, and on how many of the last steps the tuned conditioning
    applies (`tuned_steps`: None = all; N = the last N, the original conditioning before, paper Tab. 4)."""

    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    eta: float = 0.0
    height: int = 512
    width: int = 512
    tuned_steps: int | None = None
    batch_size: int = 4

    @classmethod
    def from_sampling(cls, s: Any, **changes: Any) -> "RenderPlan":
        """From a `sampling` preset section (steps, guidance, scheduler, eta, size); `changes` override fields."""
        plan = cls(steps=s.steps, guidance_scale=s.guidance_scale, scheduler=s.scheduler, eta=s.eta,
                   height=s.height, width=s.width)
        return dataclasses.replace(plan, **changes)


class Renderer:
    """Renders with `components`' UNet, scheduler and VAE; the frozen half-precision models run natively."""

    def __init__(self, components: Any, plan: RenderPlan, autocast: Callable[[], ContextManager] | None = None):
        self.components, self.plan = components, plan
        self.denoiser = Denoiser(components.unet, make_scheduler(plan.scheduler, components.scheduler),
                                 autocast or contextlib.nullcontext)
        self.device = next(components.unet.parameters()).device
        f = components.vae_scale_factor
        self.latent_shape = (components.latent_channels, plan.height // f, plan.width // f)

    def noise(self, seed: int) -> tuple[torch.Tensor, torch.Generator]:
        """The starting noise of one image and its generator (which then drives DDIM's eta noise)."""
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randn((1, *self.latent_shape), generator=gen, dtype=torch.float32).to(self.device), gen

    @torch.no_grad()
    def latents(self, seeds: Sequence[int], *, early: Cond, uncond_early: Cond, late: Cond | None = None,
                uncond_late: Cond | None = None, stop: int | None = None) -> torch.Tensor:
        """Latents for one batch (row i: conditioning row i, noise of seeds[i]); `stop` ends before that step."""
        p = self.plan
        late = early if late is None else late
        uncond_late = uncond_early if uncond_late is None else uncond_late
        if p.eta > 0 and len(seeds) > 1:
            return torch.cat([self.latents([s], early=early.select(slice(i, i + 1)), uncond_early=uncond_early,
                                           late=late.select(slice(i, i + 1)), uncond_late=uncond_late, stop=stop)
                              for i, s in enumerate(seeds)])
        drawn = [self.noise(s) for s in seeds]
        noise = torch.cat([n for n, _ in drawn])
        late_n = p.steps if p.tuned_steps is None else int(p.tuned_steps)
        plan = DenoisePlan(p.steps, late_n, p.guidance_scale, checkpoint=False, eta=p.eta)
        return self.denoiser.run(noise, plan, early=early, uncond_early=uncond_early, late=late,
                                 uncond_late=uncond_late, generator=drawn[0][1], stop=stop)

    @torch.no_grad()
    def render(self, cond: Cond, uncond: Cond, seeds: Sequence[int], *, base: Cond | None = None,
               base_uncond: Cond | None = None) -> torch.Tensor:
        """Images [P·S, 3, H, W] in [0, 1] on the CPU for every (prompt row of `cond`, seed), prompt-major.
        `base`/`base_uncond` condition the steps before the last `tuned_steps` (default: `cond` on every step)."""
        base = cond if base is None else base
        base_uncond = uncond if base_uncond is None else base_uncond
        jobs = [(i, int(s)) for i in range(len(cond)) for s in seeds]
        size = 1 if self.plan.eta > 0 else max(1, int(self.plan.batch_size))
        images = []
        for at in range(0, len(jobs), size):
            batch = jobs[at : at + size]
            idx = torch.tensor([i for i, _ in batch], device=cond.hidden.device)
            latents = self.latents([s for _, s in batch], early=base.select(idx).to(self.device),
                                   uncond_early=base_uncond.to(self.device), late=cond.select(idx).to(self.device),
                                   uncond_late=uncond.to(self.device))
            images.append(decode(self.components.vae, latents, self.denoiser.autocast).cpu())
        return torch.cat(images)
