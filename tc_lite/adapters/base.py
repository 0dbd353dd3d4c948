"""Adapters: what is trained, as objects. Each wraps one module of the components (a text encoder slot today;
a UNet LoRA next) and owns its trainable parameters, its "run with the original weights" context, what goes into
a checkpoint and what an export writes. The recipe, the estimator and export talk to an `AdapterSet`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from tc_lite.errors import UserError


class Adapter:
    """One trained module. `key` names it in checkpoints and logs ("te"; SDXL "te1"/"te2"; later "unet")."""

    key: str = ""
    kind: str = ""  # "lora" or "full"
    part: str = "text_encoder"  # what it adapts: "text_encoder" (conditions the UNet) or "unet"
    affects_prefix: bool = False  # True when the no-grad prefix of the two-encoder schedule depends on it
    lr: float | None = None  # its own learning rate (`lora.per_encoder.<key>.lr`); None: optim.lr

    def parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def original(self) -> contextlib.AbstractContextManager[None]:
        """Within: the wrapped module computes as the base model did (no second copy for a LoRA)."""
        raise NotImplementedError

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: name -> detached CPU copy of each trainable tensor."""
        raise NotImplementedError

    def load_trainable_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        raise NotImplementedError

    def held_modules(self) -> dict[str, torch.nn.Module]:
        """Modules the adapter keeps besides the components (full fine-tuning's frozen copy), for memory reports."""
        return {}

    def module(self) -> torch.nn.Module:
        """The wrapped module (with the adapter applied)."""
        raise NotImplementedError


class AdapterSet:
    """The adapters of a run, in a fixed order (checkpoints, the optimizer's parameter order)."""

    def __init__(self, adapters: list[Adapter]):
        keys = [a.key for a in adapters]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two adapters share a key: {keys}")
        self.adapters = adapters

    def __iter__(self) -> Iterator[Adapter]:
        return iter(self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def kinds(self) -> set[str]:
        return {a.kind for a in self.adapters}

    def describe(self) -> str:
        return " + ".join(f"{a.kind} on {a.key}" for a in self.adapters)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for a in self.adapters for p in a.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer parameter group per adapter, with its own `lr` where it has one (kohya's per-encoder
        learning rates); the optimizer's default fills in the rest."""
        groups = []
        for a in self.adapters:
            group: dict[str, Any] = {"params": a.parameters(), "name": a.key}
            if a.lr is not None:
                group["lr"] = a.lr
            groups.append(group)
        return groups

    def keys(self, part: str | None = None) -> set[str]:
        """The adapters' keys, or those of one `part` ("text_encoder", "unet")."""
        return {a.key for a in self.adapters if part is None or a.part == part}

    def drop_grads(self, active: set[str]) -> None:
        """Forget the gradients of every adapter not in `active`, so the optimizer leaves it untouched this step
        (AdamW skips a parameter without a gradient: no update, no weight decay, no moment change)."""
        for a in self.adapters:
            if a.key not in active:
                for p in a.parameters():
                    p.grad = None

    @contextlib.contextmanager
    def original(self, only: set[str] | None = None) -> Iterator[None]:
        """Every adapter (or those whose keys are in `only`) switched to the original weights."""
        with contextlib.ExitStack() as stack:
            for a in self.adapters:
                if only is None or a.key in only:
                    stack.enter_context(a.original())
            yield

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Deterministic outputs (no LoRA dropout) for samples and evaluation; the training mode is restored."""
        modules = [a.module() for a in self.adapters]
        was = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, w in zip(modules, was):
                m.train(w)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {a.key: a.trainable_state() for a in self.adapters}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
        if set(state) != {a.key for a in self.adapters}:
            raise UserError(f"train.resume: {source} was saved for adapters {sorted(state)}, this run trains "
                            f"{sorted(a.key for a in self.adapters)}; resume with the settings it was made with or "
                            "start a new output.dir")
        for a in self.adapters:
            a.load_trainable_state(state[a.key], source)


def check_same_names(have: Mapping[str, Any], saved: Mapping[str, Any], source: str) -> None:
    if set(have) != set(saved):
        raise UserError(f"train.resume: {source} was saved for different trainable weights (lora.mode/rank/targets "
                        "changed?); resume with the settings it was made with or start a new output.dir")
