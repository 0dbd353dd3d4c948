"""Count the bytes a piece of PyTorch code keeps alive on the device, op by op, without needing the device.

`MemoryTracker` is a `TorchDispatchMode`: every tensor an operator returns is looked at once per storage, its size
(rounded up like the CUDA caching allocator does) is added to the live total, and a finaliser on the storage
subtracts it when autograd, the caller or the garbage collector lets it go. Under `FakeTensorMode` no memory is
used at all, so the code of a full-size training step can be run on a CPU in seconds and the peak read off.

Why our own tracker instead of `torch.distributed._tools.mem_tracker.MemTracker` (DESIGN §4): MemTracker attaches
gradient hooks to every parameter and fails on frozen ones, adds module hooks that cost minutes on a full UNet
step, and has no notion of "host" memory. Here the rule is simple and testable: storages on `device_type` count
(fake 'cpu' stands in for the GPU); storages on 'meta' are host memory (offloaded reward weights) and do not.

Every storage carries a *kind* (parameters, activations, gradients, optimizer) used for the breakdown; code that
knows better (parameter materialisation, gradient hooks, the optimizer phase) tags or re-tags storages. Every
storage is also attributed to the *phase* that was current when the live total peaked (`phase(...)`).

`cuda_autocast_policy()` makes CPU autocast cast like CUDA autocast where the two differ in ways that change
activation memory: under CUDA autocast group_norm, layer_norm, softmax, log_softmax and normalize run in fp32 (so
an fp16 UNet's norm outputs are fp32), while CPU autocast keeps them in half precision.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

KINDS = ("parameters", "activations", "gradients", "optimizer")
CUDA_BLOCK = 512  # the CUDA caching allocator hands out multiples of 512 bytes
_ATTR = "_tc_mem"  # per-storage [bytes, kind] record, set on the (preserved) storage Python object


@dataclass
class PhasePeak:
    """The highest live total seen while a phase was current, and what it was made of at that moment."""

    name: str
    peak: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    start: int = 0  # live bytes when the phase was first entered


class MemoryTracker(TorchDispatchMode):
    """Live and peak device bytes of the code run under it, by kind and by phase.

    `device_type`: which fake/real device counts ('cpu' when the CPU stands in for the GPU). `round_to`: allocation
    granularity (512 for CUDA; 1 to compare with exact CPU byte counts).
    """

    def __init__(self, device_type: str = "cpu", round_to: int = CUDA_BLOCK):
        super().__init__()
        self.device_type = device_type
        self.round_to = max(1, int(round_to))
        self.live = 0
        self.peak = 0
        self.peak_phase = ""
        self.peak_kinds: dict[str, int] = {}
        self.by_kind: dict[str, int] = {k: 0 for k in KINDS}
        self.phases: dict[str, PhasePeak] = {}
        self.current: PhasePeak = self._phase_record("setup")
        self.default_kind = "activations"

    # ---------------------------------------------------------------------------------------------- bookkeeping

    def _phase_record(self, name: str) -> PhasePeak:
        if name not in self.phases:
            self.phases[name] = PhasePeak(name, peak=self.live, kinds=dict(self.by_kind), start=self.live)
        return self.phases[name]

    def _rounded(self, nbytes: int) -> int:
        r = self.round_to
        return (nbytes + r - 1) // r * r

    def _free(self, record: list) -> None:
        nbytes, kind = record
        self.live -= nbytes
        self.by_kind[kind] -= nbytes

    def _bump(self) -> None:
        if self.live > self.current.peak:
            self.current.peak = self.live
            self.current.kinds = dict(self.by_kind)
        if self.live > self.peak:
            self.peak = self.live
            self.peak_phase = self.current.name
            self.peak_kinds = dict(self.by_kind)

    def track(self, t: torch.Tensor, kind: str | None = None) -> None:
        """Count `t`'s storage once (later views of it are free); `kind` re-tags an already counted storage."""
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        record = getattr(st, _ATTR, None)
        if record is not None:
            if kind is not None and record[1] != kind:
                self.by_kind[record[1]] -= record[0]
                record[1] = kind
                self.by_kind[kind] += record[0]
                self._bump()
            return
        nbytes = self._rounded(st.nbytes())
        if nbytes == 0:
            return
        record = [nbytes, kind or self.default_kind]
        try:
            setattr(st, _ATTR, record)
        except (AttributeError, TypeError):  # a storage type without a __dict__: count it, it cannot be freed
            pass
        else:
            weakref.finalize(st, self._free, record)
        self.live += nbytes
        self.by_kind[record[1]] += nbytes
        self._bump()

    def forget(self, t: torch.Tensor) -> None:
        """Stop counting `t`'s storage (it lives elsewhere on the real device, e.g. AdamW's host-side step)."""
        record = getattr(t.untyped_storage(), _ATTR, None)
        if record is not None and record[0]:
            self.live -= record[0]
            self.by_kind[record[1]] -= record[0]
            record[0] = 0

    def tag(self, tensors: Any, kind: str) -> None:
        """Count and tag (or re-tag) every tensor in a pytree, e.g. a module's parameters."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self.track(t, kind)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhasePeak]:
        """Attribute allocations and the peak to `name` until the block ends (phases may be re-entered)."""
        previous = self.current
        self.current = self._phase_record(name)
        self.current.peak = max(self.current.peak, self.live)
        try:
            yield self.current
        finally:
            self.current = previous

    def enter_phase(self, name: str) -> None:
        """Switch phase without a block (used from autograd hooks, where the backward moves between stages)."""
        self.current = self._phase_record(name)
        self._bump()

    @contextlib.contextmanager
    def kind(self, kind: str) -> Iterator[None]:
        """New storages created in the block get `kind` (e.g. everything the optimizer step allocates)."""
        previous, self.default_kind = self.default_kind, kind
        try:
            yield
        finally:
            self.default_kind = previous

    # ---------------------------------------------------------------------------------------------- dispatch

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


# --------------------------------------------------------------------------------------------------- autocast


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def _fp32_under_autocast(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or not torch.is_autocast_enabled(first.device.type):
            return fn(*args, **kwargs)
        args = tuple(_to_fp32(a) for a in args)
        kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args, **kwargs)

    wrapper.__tc_lite_autocast__ = True  # type: ignore[attr-defined]
    return wrapper


# Ops that CUDA autocast runs in fp32 and CPU autocast does not, and that SD's UNet, VAE and CLIP call. (The rest of
# CUDA's fp32 list -- exp, pow, sum, losses -- only ever meets tiny tensors in a training step.)
_CUDA_FP32_FUNCTIONS = ("group_norm", "layer_norm", "softmax", "log_softmax", "normalize")


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While active, `torch.autocast` on any device casts group_norm/layer_norm/softmax/normalize to fp32 like CUDA.

    Patched at the `torch.nn.functional` level (what nn.GroupNorm/nn.LayerNorm call at run time), and keyed on the
    autocast flag rather than on a mode stack, so activation-checkpoint recomputation (which restores the autocast
    flag but not Python modes) casts exactly as the forward did.
    """
    saved = {name: getattr(F, name) for name in _CUDA_FP32_FUNCTIONS}
    try:
        for name, fn in saved.items():
            if not getattr(fn, "__tc_lite_autocast__", False):
                setattr(F, name, _fp32_under_autocast(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
