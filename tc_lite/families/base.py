"""The model-family seam: everything that differs between SD1.x and SDXL (and later families) lives behind it.

A family owns: loading its checkpoints (which family a source is, `tc_lite.models.detect` reads from its configs or
keys), its tokenizer/text-encoder pairs (`EncoderSlot`s), how prompts become UNet conditioning (`encode`, `uncond`
-> `Cond`), which modules take an adapter and under which kohya prefix, and the shapes the memory estimator builds. Sampling, the recipe, the prefix cache, export, inference,
evaluation, the estimator and bench ask the family and never assume one text encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tc_lite.conditioning import Cond


@dataclass(frozen=True)
class EncoderSlot:
    """One tokenizer + text encoder pair of a family, by the attribute names it has in the components.

    `name` keys it everywhere else: checkpoints, the adapter set, logs ("te" for SD1; SDXL: "te1", "te2").
    `kohya_prefix` is the prefix kohya, A1111 and ComfyUI expect for its LoRA modules.
    """

    name: str
    encoder_attr: str
    tokenizer_attr: str
    kohya_prefix: str
    description: str = "CLIP text encoder"

    def encoder(self, components: Any) -> torch.nn.Module:
        return getattr(components, self.encoder_attr)

    def tokenizer(self, components: Any) -> Any:
        return getattr(components, self.tokenizer_attr)

    def set_encoder(self, components: Any, module: torch.nn.Module) -> None:
        setattr(components, self.encoder_attr, module)


def tokenize(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """CLIP token ids padded to the tokenizer's length (77), truncated as every SD front end does."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class ModelFamily:
    """Base class of a family; subclasses set the class attributes and implement the methods that raise."""

    name: str = ""
    label: str = ""  # for messages: "SD1.x"
    kohya_base_model_version: str = ""  # kohya's ss_base_model_version
    slots: tuple[EncoderSlot, ...] = ()
    lora_targets: tuple[str, ...] = ()  # text-encoder linears a LoRA may target (kohya's names)

    # ------------------------------------------------------------------------------------------ loading

    def load(self, model_cfg: Any, dtype: torch.dtype) -> Any:
        """The components (tokenizers, encoders, UNet, VAE, scheduler) for the `model` preset section; which family
        a source is was decided before (`tc_lite.models.detect`), from its configs or keys."""
        from tc_lite.models.loading import load_components

        comps = load_components(model_cfg.source, dtype=dtype, config_dir=model_cfg.config_dir,
                                allow_pickle=model_cfg.allow_pickle, revision=model_cfg.revision,
                                family=self.name, vae=model_cfg.vae)
        comps.family = self.name
        return comps

    def pipeline(self, components: Any, **replace: Any) -> Any:
        """diffusers' own pipeline of this family on `components` (for saving a model and for parity checks);
        `replace` swaps modules in by pipeline argument name (`scheduler=`, `text_encoder=`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ encoders

    def encoders(self, components: Any) -> dict[str, torch.nn.Module]:
        return {s.name: s.encoder(components) for s in self.slots}

    def encode(self, components: Any, prompts: list[str], *, encoders: Mapping[str, torch.nn.Module] | None = None,
               size: tuple[int, int] | None = None) -> Cond:
        """Prompts -> UNet conditioning. `encoders` replaces some slots' encoders (a tuned copy at inference);
        `size` is the image (height, width), which families with size conditioning use."""
        raise NotImplementedError

    def uncond(self, components: Any, negative_prompt: str, *,
               encoders: Mapping[str, torch.nn.Module] | None = None, size: tuple[int, int] | None = None) -> Cond:
        """The unconditional (negative-prompt) conditioning for classifier-free guidance, one row. A family may
        make it without the encoders (SDXL's zeros for an empty negative prompt)."""
        return self.encode(components, [negative_prompt], encoders=encoders, size=size)

    def long_prompts(self, components: Any, prompts: Sequence[str]) -> tuple[int, list[str]]:
        """(token limit, prompts longer than it) for the first tokenizer: what is cut off without warning."""
        tok = self.slots[0].tokenizer(components)
        limit = tok.model_max_length
        lengths = [len(ids) for ids in tok(list(prompts), truncation=False).input_ids]
        return limit, [p for p, n in zip(prompts, lengths) if n > limit]

    # ------------------------------------------------------------------------------------------ estimator

    def architecture(self, cfg: Any) -> Any:
        """`tc_lite.memory.architectures.Architecture` of the configured model, without weights or download."""
        raise NotImplementedError

    def meta_components(self, architecture: Any) -> Any:
        """Components built on the 'meta' device from `architecture` (a stand-in tokenizer), for the estimator."""
        raise NotImplementedError
