"""Generate images with tuned text encoders, mixing their embeddings as TextCraftor does.

The paper interpolates on the text EMBEDDINGS, not on the weights:

    emb(w) = orig + Σᵢ wᵢ · (tunedᵢ − orig)

so ``w = 0`` is the base model bit for bit (the tuned encoders are not even run), ``w = 1`` one tuned encoder,
values in between and above 1 interpolate and extrapolate, and several tuned encoders mix styles. ``tuned_steps=N``
conditions only the last N denoising steps on the mixed embedding and the earlier ones on the original (paper
Tab. 4: train with 5, sample with 15 of 25). The negative-prompt embedding is mixed the same way, as A1111/ComfyUI/
diffusers do when they apply a text-encoder LoRA to both halves of classifier-free guidance.

Two layers, so callers that render many weight settings encode each prompt once:

- :func:`encode_prompts` -> :class:`PromptEmbeddings` (original + each tuned encoder's embeddings, cached);
- :func:`sample_images` renders them for any weights; :func:`generate` does both in one call.

A tuned encoder can be given as a LoRA file (kohya, diffusers or peft format), a full-encoder ``.safetensors`` (the
``merged`` export or a full fine-tune), a kohya state dict, or a live module (e.g. the trainer's encoder).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tc_lite.conditioning import Cond
from tc_lite.errors import UserError
from tc_lite.families import family_of
from tc_lite.lora import has_lora, load_kohya_state_dict, lora_disabled
from tc_lite.models.components import SDComponents
from tc_lite.render import RenderPlan, Renderer
from tc_lite.sampling import SCHEDULERS

__all__ = [
    "PromptEmbeddings",
    "TunedSource",
    "default_size",
    "encode_prompts",
    "generate",
    "plain_copy",
    "sample_images",
    "tuned_encoder",
    "tuned_encoders",
]

# A path (LoRA file/folder or full-encoder file), a kohya state dict, a ready tuned encoder module, or a mapping of
# the family's encoder slot names to ready modules.
TunedSource = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module | Mapping[str, torch.nn.Module]


# --------------------------------------------------------------------------------------------------- encoders


def plain_copy(encoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``encoder`` without any peft LoRA (its base weights only), so another LoRA can be loaded into it."""
    if not has_lora(encoder) and not any("lora_" in n for n, _ in encoder.named_parameters()):
        return copy.deepcopy(encoder)
    fresh = type(encoder)(encoder.config)
    base = {k.replace(".base_layer.", "."): v for k, v in encoder.state_dict().items() if ".lora_" not in k}
    fresh.load_state_dict(base, strict=True)
    p = next(encoder.parameters())
    return fresh.to(device=p.device, dtype=_base_dtype(encoder)).eval().requires_grad_(False)


def _base_dtype(encoder: torch.nn.Module) -> torch.dtype:
    """The frozen weights' dtype (LoRA weights are fp32 whatever the base is)."""
    for name, p in encoder.named_parameters():
        if ".lora_" not in name:
            return p.dtype
    return torch.float32


def tuned_encoder(base: torch.nn.Module, source: TunedSource, *, prefix: str = "lora_te",
                  label: str | None = None) -> torch.nn.Module:
    """One tuned encoder described by ``source``, built on a copy of ``base`` (``base`` itself is not modified).

    A module is returned as is. A path or state dict is read with :func:`tc_lite.export.read_tuned`, which
    recognises kohya / diffusers / peft LoRAs and full-encoder files and raises a ``UserError`` naming the file
    for anything else (wrong base model included). ``prefix``: the kohya prefix of this encoder's modules;
    ``label``: the file a state dict came from, for messages.
    """
    if isinstance(source, torch.nn.Module):
        return source
    from tc_lite.export import read_tuned

    label = label or (str(source) if not isinstance(source, Mapping) else "LoRA state dict")
    kind, sd = read_tuned(source)
    te = plain_copy(base)
    if kind == "lora":
        return load_kohya_state_dict(te, sd, source=label, prefix=prefix).eval()
    from tc_lite.export import load_encoder_weights

    load_encoder_weights(te, sd, source=label)
    return te.eval()


def tuned_encoders(components: Any, source: TunedSource,
                   base_encoders: Mapping[str, torch.nn.Module] | None = None) -> dict[str, torch.nn.Module]:
    """The tuned encoder of every slot of the components' family that ``source`` changes, by slot name.

    ``source``: a LoRA file / state dict (the family's kohya prefixes say which slot each module belongs to), one
    full-encoder file (the slot whose encoder it fits), a module (the first slot's tuned encoder), or a mapping of
    slot names to modules or files (an SDXL run that trained both encoders in full: one file each)."""
    family = family_of(components)
    base = dict(base_encoders or family.encoders(components))
    slots = {s.name: s for s in family.slots}
    if isinstance(source, Mapping) and not source:
        return {}  # what a UNet-only LoRA gives: no tuned encoder
    if isinstance(source, Mapping) and set(source) - {"unet"} <= set(slots):  # slot -> module or file
        return {name: tuned_encoder(base[name], src, prefix=slots[name].kohya_prefix)  # type: ignore[arg-type]
                for name, src in source.items() if name != "unet"}  # "unet": the run's UNet LoRA (unet_mix)
    if isinstance(source, torch.nn.Module):
        slot = family.slots[0]
        return {slot.name: tuned_encoder(base[slot.name], source, prefix=slot.kohya_prefix)}
    from tc_lite.export import read_tuned
    from tc_lite.unet_lora import split_unet_lora

    label = str(source) if not isinstance(source, Mapping) else "state dict"
    kind, sd = read_tuned(source)  # type: ignore[arg-type]
    if kind == "encoder":  # one fully trained encoder: the slot whose base encoder has its names and shapes
        name = family.slots[0].name if len(family.slots) == 1 else _slot_of_encoder(family, base, sd, label)
        return {name: tuned_encoder(base[name], sd, prefix=slots[name].kohya_prefix, label=label)}
    sd, unet_part = split_unet_lora(sd)  # the UNet part applies at render time (tc_lite.unet_mix)
    if not sd and unet_part:
        return {}  # a UNet-only LoRA: the text encoders stay the base ones
    if len(family.slots) == 1:
        slot = family.slots[0]
        return {slot.name: tuned_encoder(base[slot.name], sd, prefix=slot.kohya_prefix, label=label)}
    out = {}
    for slot in family.slots:
        own = {k: v for k, v in sd.items() if k.startswith(slot.kohya_prefix + "_")}
        if own:
            out[slot.name] = tuned_encoder(base[slot.name], own, prefix=slot.kohya_prefix, label=label)
    if not out:
        raise UserError(f"{source}: no module for any text encoder of {family.label} "
                        f"(prefixes {[s.kohya_prefix for s in family.slots]})")
    return out


def _slot_of_encoder(family: Any, base: Mapping[str, torch.nn.Module], sd: Mapping[str, torch.Tensor],
                     label: str) -> str:
    from tc_lite.export import encoder_state_dict

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for slot in family.slots:
        own = {k: tuple(v.shape) for k, v in encoder_state_dict(base[slot.name]).items() if ".lora_" not in k}
        if own == shapes:
            return slot.name
    raise UserError(f"{label}: a full text encoder that matches none of {family.label}'s encoders "
                    f"({', '.join(s.description for s in family.slots)}); was it trained on another base model?")


@contextlib.contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    was = [m.training for m in modules]
    for m in modules:
        m.eval()  # a trainer's encoder may carry LoRA dropout: embeddings must be deterministic
    try:
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


# --------------------------------------------------------------------------------------------------- embeddings


@dataclass
class PromptEmbeddings:
    """Original and tuned conditioning of ``prompts`` plus the negative prompt, ready to mix.

    ``orig`` holds P+1 rows (the last is the negative prompt); ``tuned[i]`` the same for tuned model i. Every
    part of the conditioning (hidden states; SDXL's pooled embedding) is mixed. fp32, on the encoders' device.
    """

    prompts: list[str]
    negative_prompt: str
    orig: Cond
    tuned: list[Cond]

    def mix(self, weights: Sequence[float]) -> Cond:
        """orig + Σᵢ wᵢ·(tunedᵢ − orig); returns ``orig`` itself when every weight is 0 (the exact base model)."""
        if len(weights) != len(self.tuned):
            raise UserError(f"got {len(weights)} weight(s) for {len(self.tuned)} tuned encoder(s); give one per LoRA")
        out = self.orig
        for w, t in zip(weights, self.tuned):
            if float(w) != 0.0:
                out = out.map(lambda o, x, b: o + float(w) * (x - b), t, self.orig)
        return out


@torch.no_grad()
def encode_prompts(
    components: SDComponents,
    prompts: Sequence[str],
    tuned: Sequence[TunedSource] = (),
    *,
    negative_prompt: str = "",
    base_encoder: torch.nn.Module | None = None,
    base_encoders: Mapping[str, torch.nn.Module] | None = None,
    size: tuple[int, int] | None = None,
) -> PromptEmbeddings:
    """Encode ``prompts`` (and ``negative_prompt``) with the original encoders and with each tuned model.

    The original encoders are by default the components' own with any tc-lite LoRA on them disabled (so a
    trainer's components work as they are). Give them explicitly (``base_encoders`` by slot, or ``base_encoder``
    for the first slot) for full fine-tuning, where the components hold the tuned encoder and the original lives
    elsewhere. Tuned encoders built from files are made one at a time and dropped after encoding, so mixing
    several LoRAs costs one extra encoder set in memory. ``size``: the image size, for families that condition on it.
    """
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompts given; pass at least one prompt")
    family = family_of(components)
    base = dict(family.encoders(components))
    if base_encoder is not None:
        base[family.slots[0].name] = base_encoder
    base.update(base_encoders or {})
    with _eval_mode(list(base.values())), contextlib.ExitStack() as stack:
        for m in base.values():
            stack.enter_context(lora_disabled(m))
        orig = _with_negative(family, components, prompts, negative_prompt, base, size).to(dtype=torch.float32)
    device = orig.hidden.device
    out: list[Cond] = []
    for source in tuned:
        encoders = {**base, **tuned_encoders(components, source, base)}
        with _eval_mode(list(encoders.values())):
            out.append(_with_negative(family, components, prompts, negative_prompt, encoders, size)
                       .to(device, torch.float32))
        del encoders
    return PromptEmbeddings(prompts, negative_prompt, orig, out)


def _with_negative(family: Any, components: Any, prompts: list[str], negative_prompt: str,
                   encoders: Mapping[str, torch.nn.Module], size: tuple[int, int] | None) -> Cond:
    """The prompts' rows, then the negative prompt's (the family's unconditional: SDXL zeros an empty one)."""
    cond = family.encode(components, prompts, encoders=encoders, size=size)
    uncond = family.uncond(components, negative_prompt, encoders=encoders, size=size)
    return Cond.cat(cond, uncond.to(cond.hidden.device, cond.hidden.dtype))


# --------------------------------------------------------------------------------------------------- sampling


def default_size(components: SDComponents) -> int:
    """The image size the model was trained at: the UNet's latent size times the VAE's downsampling."""
    return int(components.unet.config.sample_size) * components.vae_scale_factor


def _check_args(components: SDComponents, steps: int, tuned_steps: int | None, scheduler: str,
                guidance: float, height: int, width: int, seeds: Sequence[int]) -> None:
    problems = []
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    elif tuned_steps is not None and not 0 <= tuned_steps <= steps:
        problems.append(f"tuned_steps must be between 0 and steps ({steps}), got {tuned_steps}")
    if scheduler not in SCHEDULERS:
        problems.append(f"scheduler {scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}")
    if not guidance >= 1.0:
        problems.append(f"guidance must be >= 1 (1 = no classifier-free guidance), got {guidance}")
    f = components.vae_scale_factor
    for name, v in (("height", height), ("width", width)):
        if v < f or v % f:
            problems.append(f"{name} {v} must be a positive multiple of {f} (the VAE's downsampling factor)")
    if not seeds:
        problems.append("no seeds given; pass at least one seed")
    if problems:
        raise UserError("; ".join(problems))


@torch.no_grad()
def sample_images(
    components: SDComponents,
    embeddings: PromptEmbeddings,
    seeds: Sequence[int],
    weights: Sequence[float] = (),
    *,
    tuned_steps: int | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    scheduler: str = "ddim",
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    batch_size: int = 4,
    autocast: Callable[[], ContextManager] | None = None,
    unet_loras: Any = None,
) -> torch.Tensor:
    """Render every (prompt, seed) with the embeddings mixed by ``weights`` (one per tuned encoder).

    ``unet_loras``: a :class:`tc_lite.unet_mix.UNetLoRAMix` of the same tuned models, whose UNet LoRAs then apply
    at the same weights (as LoRA multipliers, on every step).

    Returns float images [P·S, 3, H, W] in [0, 1] on the CPU, prompt-major: image ``p * len(seeds) + s`` is prompt
    p with seed s, through `tc_lite.render` (the trainer's sample grids render the same way). ``tuned_steps=None``
    uses the mixed embedding on every step; N uses it on the last N only (the original before), 0 is the base model.
    """
    h = height or default_size(components)
    w = width or default_size(components)
    seeds = [int(s) for s in seeds]
    _check_args(components, steps, tuned_steps, scheduler, guidance, h, w, seeds)
    mixed, orig = embeddings.mix(weights), embeddings.orig
    n = len(embeddings.prompts)
    plan = RenderPlan(steps=steps, guidance_scale=float(guidance), scheduler=scheduler, eta=eta, height=h, width=w,
                      tuned_steps=tuned_steps, batch_size=batch_size)
    renderer = Renderer(components, plan, autocast)
    with unet_loras.applied(weights) if unet_loras else contextlib.nullcontext():
        return renderer.render(mixed.select(slice(0, n)), mixed.select(slice(n, n + 1)), seeds,
                               base=orig.select(slice(0, n)), base_uncond=orig.select(slice(n, n + 1)))


def generate(
    components: SDComponents,
    prompts: Sequence[str],
    seeds: Sequence[int],
    loras: Sequence[tuple[TunedSource, float]] = (),
    *,
    tuned_steps: int | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    scheduler: str = "ddim",
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str = "",
    eta: float = 0.0,
    batch_size: int = 4,
    base_encoder: torch.nn.Module | None = None,
    autocast: Callable[[], ContextManager] | None = None,
) -> torch.Tensor:
    """Images [len(prompts)·len(seeds), 3, H, W] in [0, 1] (CPU, prompt-major) with tuned encoders mixed in.

    ``loras`` is a list of (source, weight): ``[("style.safetensors", 1.0)]`` is the tuned model, weight 0 the base
    model exactly, several entries mix styles. Sources are LoRA files, full-encoder files, kohya state dicts or
    tuned encoder modules (see :func:`tuned_encoders`); ``base_encoder`` as in :func:`encode_prompts`. The other
    arguments are those of :func:`sample_images`. Runs on the device and dtype of ``components`` (a frozen fp16/bf16
    UNet and VAE run natively in that dtype, as in diffusers' pipelines).

    Example::

        comps = load_components("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16)
        for m in (comps.unet, comps.vae, comps.text_encoder): m.to("cuda")
        imgs = generate(comps, ["a cat"], seeds=[0, 1], loras=[("out/aes.safetensors", 0.8)], tuned_steps=15)
    """
    sources = [src for src, _ in loras]
    weights = [float(wt) for _, wt in loras]
    h = height or default_size(components)
    w = width or default_size(components)
    used = [s for s, wt in zip(sources, weights) if wt != 0.0]
    emb = encode_prompts(components, prompts, used, negative_prompt=negative_prompt, base_encoder=base_encoder,
                         size=(h, w))
    from tc_lite.unet_mix import UNetLoRAMix

    unet_loras = UNetLoRAMix(components.unet, used)  # the files' UNet parts, removed again below
    try:
        return sample_images(components, emb, seeds, [wt for wt in weights if wt != 0.0], tuned_steps=tuned_steps,
                             steps=steps, guidance=guidance, scheduler=scheduler, height=h, width=w, eta=eta,
                             batch_size=batch_size, autocast=autocast, unet_loras=unet_loras)
    finally:
        unet_loras.close()
