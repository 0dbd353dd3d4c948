"""One training step: components + config -> loss and metrics. Used by the recipe, the memory estimator (on fake
tensors) and `bench speed`, so what is measured is what runs.

A step is `grad_accum` micro-steps of: encode prompts (tuned, and original for the two-encoder schedule), take
starting latents from a `LatentSource` (fresh noise, or a cached prefix after step T−K), denoise (no-grad prefix,
checkpointed grad tail), decode, score, backward(−reward); then one optimizer update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tc_lite.conditioning import Cond, PromptEncoder
from tc_lite.decode import decode
from tc_lite.sampling import DenoisePlan, Denoiser


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Noise for (step, micro-step) depends only on these numbers, so a run is reproducible and resumable."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % 2**63)


@dataclass
class StepStats:
    loss: float = 0.0
    reward: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    grad_steps: list[int] = field(default_factory=list)
    drift: float | None = None  # mean squared drift of the UNet's noise predictions (unet.drift_weight > 0)


class LatentSource(Protocol):
    """Where a micro-step's denoising starts: `(latents, start)` with `start` the index of the first step to run."""

    def starting_latents(self, prompts: list[str], gen: torch.Generator, grad_steps: int) -> tuple[torch.Tensor, int]: ...


class FreshNoise:
    """Pure noise from the step's generator (start 0): every step sees new starting latents.

    With data parallelism (`shard` = (process index, process count)) every process draws the noise of the whole
    global batch from the shared generator and keeps its own rows, so N processes see exactly the noise one process
    would at N times the batch."""

    def __init__(self, shape: Sequence[int], device: torch.device, shard: tuple[int, int] = (0, 1)):
        self.shape = tuple(int(x) for x in shape)  # (channels, latent height, latent width)
        self.device = device
        self.index, self.count = shard

    def starting_latents(self, prompts: list[str], gen: torch.Generator, grad_steps: int) -> tuple[torch.Tensor, int]:
        n = len(prompts)
        noise = torch.randn((n * self.count, *self.shape), generator=gen, dtype=torch.float32)
        return noise[self.index * n : (self.index + 1) * n].to(self.device), 0


class TrainStep:
    """The step's objects, wired once; `micro_step` and `optimizer_step` are the step (see the module docstring)."""

    def __init__(self, cfg: Any, *, encoder: PromptEncoder, denoiser: Denoiser, vae: torch.nn.Module,
                 rewards: Callable[[torch.Tensor, list[str]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 latents: LatentSource, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 schedule: Any, precision: Any, draw_grad_steps: Callable[[torch.Generator], int] | None = None):
        self.sampling, self.memory, self.train, self.optim = cfg.sampling, cfg.memory, cfg.train, cfg.optim
        self.encoder, self.denoiser, self.vae, self.rewards = encoder, denoiser, vae, rewards
        self.latents, self.params, self.optimizer, self.schedule = latents, params, optimizer, schedule
        self.precision = precision
        if draw_grad_steps is not None:
            self.draw_grad_steps = draw_grad_steps  # type: ignore[method-assign]  # the estimator fixes K
        self.uncond_base = encoder.uncond_base(self.sampling.negative_prompt)

    def draw_grad_steps(self, gen: torch.Generator) -> int:
        s = self.sampling
        lo = s.grad_steps_min if s.grad_steps_min is not None else s.grad_steps
        return int(torch.randint(lo, s.grad_steps + 1, (1,), generator=gen))

    def conditioning(self, prompts: list[str]) -> dict[str, Cond]:
        """The embeddings for both phases; see the `sampling.encoder_schedule` and `sampling.uncond` docs in base.yaml."""
        s = self.sampling
        late = self.encoder.tuned(prompts)
        uncond_late = self.uncond_base if s.uncond == "original" else self.encoder.uncond_tuned(s.negative_prompt)
        if s.encoder_schedule == "two_encoder":
            return dict(early=self.encoder.base(prompts), uncond_early=self.uncond_base, late=late,
                        uncond_late=uncond_late)
        return dict(early=late, uncond_early=uncond_late, late=late, uncond_late=uncond_late)

    def generate_latents(self, prompts: list[str], gen: torch.Generator, grad_steps: int) -> torch.Tensor:
        s = self.sampling
        latents, start = self.latents.starting_latents(prompts, gen, grad_steps)
        plan = DenoisePlan(s.steps, grad_steps, s.guidance_scale, self.memory.checkpoint_unet, s.eta, self.memory.checkpoint_unet_blocks)
        return self.denoiser.run(latents, plan, generator=gen, start=start, **self.conditioning(prompts))

    def micro_step(self, prompts: list[str], gen: torch.Generator, stats: StepStats) -> None:
        k = self.draw_grad_steps(gen)
        latents = self.generate_latents(prompts, gen, k)
        images = decode(self.vae, latents, self.precision.autocast)
        total, parts = self.rewards(images, prompts)
        accum = self.train.grad_accum
        loss = -total.mean() / accum
        drift = self.denoiser.drift.take() if self.denoiser.drift is not None else None
        if drift is not None:  # unet.drift_weight: the tuned UNet's distance from the base UNet
            loss = loss + self.denoiser.drift.weight * drift / accum  # type: ignore[union-attr]
            stats.drift = (stats.drift or 0.0) + drift.item() / accum
        self.precision.scaler.scale(loss).backward()
        stats.loss += loss.item()
        stats.reward += total.mean().item() / accum
        for name, v in parts.items():
            stats.parts[name] = stats.parts.get(name, 0.0) + float(v.mean()) / accum
        stats.grad_steps.append(k)

    def optimizer_step(self) -> tuple[float, bool]:
        """Unscale, clip, step. Returns (grad norm, whether the update was applied)."""
        scaler, clip = self.precision.scaler, self.optim.grad_clip
        scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip if clip is not None else math.inf))
        finite = math.isfinite(norm)
        if finite or scaler.is_enabled():  # the scaler skips non-finite steps itself and lowers its scale
            scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:  # as accelerate does: a skipped update does not advance the LR schedule either
            self.schedule.step()
        return norm, finite

    def step_was_good(self, loss: float, applied: bool) -> bool:
        """Whether a step counts toward `train.max_bad_steps`. With fp16 loss scaling, overflowing gradients are the
        GradScaler's business: it skips the step and halves its scale (from 65536, a few skips at the start of a
        run are normal). Only once the scale has fallen below 1 do non-finite gradients mean a real fault."""
        if not math.isfinite(loss):
            return False
        scaler = self.precision.scaler
        return applied or (scaler.is_enabled() and scaler.get_scale() >= 1.0)
