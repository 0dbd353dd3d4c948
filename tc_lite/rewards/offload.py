"""Keep frozen reward models off the GPU except while they score.

``on_device(module, device)`` puts every parameter and buffer of ``module`` on ``device`` for the duration of a
``with`` block and restores the *original* tensor objects on exit -- also when the block raises. Because reward
models are frozen, the home copies never change, so going home costs no device->host copy: the device copies
are simply dropped (pinned home copies, see ``pin_memory``, also make the host->device copy faster).

Autograd caveat: tensors saved for backward during the block (activations, and the device copies of the
weights) keep that memory alive after the block ends. Callers must therefore finish the reward's backward inside
the block; ``RewardMix`` does exactly that (see ``mix.py``).

``attach_sequential(module, device)`` is ``offload: sequential``: layer by layer, for the smallest cards. Every
submodule that owns weights gets an accelerate ``AlignDevicesHook`` (the hook ``accelerate.cpu_offload`` installs):
its weights live in CPU RAM and the module's parameters on the ``meta`` device; each forward copies that one
module's weights to the device and drops them afterwards. Autograd would still keep every layer's device copy
alive until the backward (a linear layer saves its weight to compute the input gradient), which would put the
whole model back on the GPU; so each transformers layer (``GradientCheckpointingLayer``: every CLIP encoder layer)
is also wrapped in non-reentrant activation checkpointing (without early stop, see ``_checkpointed_forward``).
Its weights are then not saved but fetched again when the backward recomputes the layer: in the forward at most
one sub-layer's weights (plus those of modules whose forward encloses it) are on the device, in the backward one
transformer layer's (its recomputation saves them for its own backward; 39 MB for a ViT-H layer in fp16). The root
module's own direct tensors (e.g. ``logit_scale``) stay on the device permanently. ``detach_sequential`` removes
the hooks and puts the original weights back (same values, on the CPU).
"""

from __future__ import annotations

import functools
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


# --------------------------------------------------------------------------------------------------- sequential


def _direct_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]


def _checkpointed_forward(forward):
    """Non-reentrant activation checkpointing around a layer's forward, only when a backward will follow.

    ``early_stop=False``: by default the recomputation is cut short (by an exception) as soon as the last needed
    activation exists, which would skip accelerate's post-forward of that sub-layer and leave its weights on the
    device until the end of the scoring window -- one weight matrix per layer, accumulating over the backward.
    """
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False, early_stop=False)

    wrapper._tc_lite_checkpointed = True  # type: ignore[attr-defined]
    return wrapper


def attach_sequential(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Offload ``module`` layer by layer to ``device`` (see the module docstring); idempotent per submodule.

    Submodules already hooked (a vision tower shared with another reward) are left as they are.
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    target = normalize_device(device)
    for name, tensor in _direct_tensors(module):  # the root's own tensors: permanently on the device
        if tensor.device != target:
            moved = tensor.detach().to(target)
            if isinstance(tensor, nn.Parameter):
                moved = nn.Parameter(moved, requires_grad=tensor.requires_grad)
            (module._parameters if name in module._parameters else module._buffers)[name] = moved
    for sub in module.modules():
        if sub is module or hasattr(sub, "_hf_hook"):
            continue
        params = [(n, t) for n, t in sub._parameters.items() if t is not None]
        if params:
            weights = {n: t.detach().to("cpu") for n, t in params}
            hook = AlignDevicesHook(execution_device=target, offload=True, weights_map=weights, offload_buffers=False)
            add_hook_to_module(sub, hook)
        elif sub._buffers:  # buffers only (position ids): just place them
            for n, t in list(sub._buffers.items()):
                if t is not None:
                    sub._buffers[n] = t.to(target)
    checkpoint_layers(module)
    return module


def checkpoint_layers(module: nn.Module) -> None:
    """Wrap every transformer layer of `module` in activation checkpointing (see `_checkpointed_forward`), so the
    weights a layer fetched are not kept for the backward; idempotent."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: no common layer class; checkpoint CLIP's encoder layers by name
        GradientCheckpointingLayer = ()  # type: ignore[assignment]
    for sub in module.modules():
        is_layer = isinstance(sub, GradientCheckpointingLayer) or type(sub).__name__.endswith("EncoderLayer")
        if is_layer and not getattr(sub.forward, "_tc_lite_checkpointed", False):
            sub.forward = _checkpointed_forward(sub.forward)


def detach_sequential(module: nn.Module) -> nn.Module:
    """Undo ``attach_sequential``: remove the hooks (accelerate restores each weight from its CPU copy) and the
    checkpointing wrappers. The root's own tensors stay where ``attach_sequential`` put them."""
    from accelerate.hooks import remove_hook_from_module

    for sub in module.modules():
        if hasattr(sub, "_hf_hook"):
            remove_hook_from_module(sub)
        if getattr(sub.__dict__.get("forward"), "_tc_lite_checkpointed", False):
            del sub.forward
    return module


@contextmanager
def sequential_window(module: nn.Module | None) -> Iterator[None]:
    """Scoring window for a hooked module: afterwards no layer's weights remain on the device, even when the
    block raised between a layer's pre- and post-forward (accelerate would leave that layer materialised)."""
    try:
        yield
    finally:
        if module is not None:
            from accelerate.utils import set_module_tensor_to_device

            for sub in module.modules():
                hook = getattr(sub, "_hf_hook", None)
                if hook is None or not getattr(hook, "offload", False):
                    continue
                for name, param in list(sub._parameters.items()):
                    if param is not None and param.device.type != "meta":
                        set_module_tensor_to_device(sub, name, "meta")


def is_sequential(module: nn.Module | None) -> bool:
    return module is not None and any(hasattr(m, "_hf_hook") for m in module.modules())
