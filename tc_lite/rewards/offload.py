"""Keep frozen reward models off the GPU except while they score.

``on_device(module, device)`` puts every parameter and buffer of ``module`` on ``device`` for the duration of a
``with`` block and restores the *original* tensor objects on exit -- also when the block raises. Because reward
models are frozen, the home copies never change, so going home costs no device->host copy: the device copies
are simply dropped (pinned home copies, see ``pin_memory``, also make the host->device copy faster).

Autograd caveat: tensors saved for backward during the block (activations, and the device copies of the
weights) keep that memory alive after the block ends. Callers must therefore finish the reward's backward inside
the block; ``RewardMix`` does exactly that (see ``mix.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def normalize_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so it compares equal to tensor devices."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


@contextmanager
def on_device(module: nn.Module | None, device: torch.device | str, *, non_blocking: bool = False) -> Iterator[None]:
    """Run the block with ``module`` on ``device``; afterwards the module is exactly as before (same objects).

    A no-op for ``None`` and for modules already entirely on ``device`` (``offload="none"``).
    """
    if module is None:
        yield
        return
    target = normalize_device(device)
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    moved: dict[int, torch.Tensor] = {}  # keeps tied weights tied
    try:
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, home in list(store.items()):
                    if home is None or home.device == target:
                        continue
                    if id(home) not in moved:
                        copy = home.detach().to(target, non_blocking=non_blocking)
                        if isinstance(home, nn.Parameter):
                            copy = nn.Parameter(copy, requires_grad=home.requires_grad)
                        moved[id(home)] = copy
                    swapped.append((store, key, home))
                    store[key] = moved[id(home)]
        del moved
        yield
    finally:
        for store, key, home in reversed(swapped):
            store[key] = home


def pin_memory(module: nn.Module) -> nn.Module:
    """Page-lock the module's CPU tensors so ``on_device(..., non_blocking=True)`` copies overlap compute."""
    if not torch.cuda.is_available():
        return module
    for tensor in module_tensors(module):
        if tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor.data = tensor.data.pin_memory()
    return module
