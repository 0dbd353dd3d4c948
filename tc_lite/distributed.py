"""Data-parallel training on Hugging Face accelerate: the processes of a run, as one object the recipe asks.

`accelerate launch run.py PRESET` (or `torchrun`) starts N processes; `Processes.from_env()` joins them through
accelerate's `PartialState` (which reads the launcher's environment, picks NCCL on GPUs and gloo on the CPU, and
puts each process on its own GPU). A single `python run.py` is `Processes.single()`: every method a no-op, so the
recipe has no "if distributed" branches and the one-process run is what it always was.

What is synchronised, and why this way: only the trainable weights' gradients, once per optimizer step, averaged
with one all-reduce of a flat buffer (`average_gradients`). The step's forward runs through the frozen pipeline
with the adapters injected, not through one module DDP could wrap, and a LoRA's gradients are megabytes: bucketing
and overlap would save nothing. Every process starts from the main process's weights (`broadcast_parameters`) and
applies the same averaged update, so the weights stay identical without further traffic.
"""

from __future__ import annotations

import datetime
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Processes", "launched"]

# A process that waits this long for the others has lost them (a crash the launcher has not yet noticed, or a
# stuck peer): it fails with the collective's error instead of hanging. Long enough for the main process's
# held-out evaluation and sample grids, which the others wait for at the next collective.
TIMEOUT = datetime.timedelta(minutes=30)


def launched() -> bool:
    """Whether a distributed launcher (accelerate launch, torchrun) started this process with others."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Processes:
    """This process's place in the run: `index` of `count`, and whether it writes (the main process)."""

    index: int = 0
    count: int = 1
    state: Any = None  # accelerate's PartialState when count > 1

    @classmethod
    def single(cls) -> "Processes":
        return cls()

    @classmethod
    def from_env(cls, cpu: bool = False) -> "Processes":
        """Join the launcher's processes (a single process when none launched this one)."""
        if not launched():
            return cls.single()
        from accelerate import PartialState

        state = PartialState(cpu=cpu, timeout=TIMEOUT)
        return cls(state.process_index, state.num_processes, state)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self) -> torch.device | None:
        """The device accelerate gave this process (cuda:<local rank>), or None for a single process."""
        return None if self.state is None else self.state.device

    def shard(self, n_local: int) -> slice:
        """This process's rows of a global batch of `n_local` x count rows (process i: rows i·n … (i+1)·n − 1)."""
        return slice(self.index * n_local, (self.index + 1) * n_local)

    # ------------------------------------------------------------------------------------------- collectives

    def _dist(self) -> Any:
        return torch.distributed

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Every process's gradients replaced by their mean over the processes (one all-reduce). Parameters without
        a gradient (an adapter that does not train this step) are left out on every process alike."""
        if self.count == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self._dist().all_reduce(flat)
        flat /= self.count
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """The main process's values in every process (the same starting weights, or the resumed ones)."""
        if self.count == 1:
            return
        with torch.no_grad():
            for p in params:
                self._dist().broadcast(p.data, src=0)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over the processes of each value (the global batch's loss and rewards, for the log)."""
        if self.count == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self._collective_device())
        self._dist().all_reduce(t)
        return {k: float(v) / self.count for k, v in zip(values, t.tolist())}

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on any (a stop request, a bad step)."""
        if self.count == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        self._dist().all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj: Any) -> Any:
        """The main process's `obj` on every process (a decision only the main process makes)."""
        if self.count == 1:
            return obj
        box = [obj if self.is_main else None]
        self._dist().broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_state(self, state: Any) -> Any:
        """The main process's `state` (a checkpoint's tensors and values) on every process, so only the main
        process needs to read the file (nodes without a shared disk)."""
        if self.count == 1:
            return state
        blob = None
        if self.is_main:
            buf = io.BytesIO()
            torch.save(state, buf)
            blob = buf.getvalue()
        return torch.load(io.BytesIO(self.broadcast_object(blob)), weights_only=True)

    def quiet(self) -> None:
        """Silence Python warnings and library log messages in every process but the main one, so a warning is
        printed once, not once per process."""
        if self.is_main:
            return
        import logging
        import warnings

        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)

    def gather_state(self, state: Any) -> list[Any]:
        """Every process's `state` (tensors and plain values, as a checkpoint holds them), in process order, on
        every process. Sent as `torch.save` bytes: pickling CPU tensors inside all_gather_object does not load back."""
        if self.count == 1:
            return [state]
        buf = io.BytesIO()
        torch.save(state, buf)
        out: list[Any] = [None] * self.count
        self._dist().all_gather_object(out, buf.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=True) for b in out]

    def barrier(self) -> None:
        if self.count > 1:
            self._dist().barrier()

    def _collective_device(self) -> torch.device:
        return torch.device("cpu") if self._dist().get_backend() == "gloo" else self.state.device

    def lost_peer(self, error: BaseException) -> bool:
        """Whether `error` is a collective failing because another process is gone (gloo's closed connection,
        NCCL's error, torch's distributed errors)."""
        if self.count == 1:
            return False
        dist_error = getattr(torch.distributed, "DistError", ())
        text = str(error)
        return isinstance(error, dist_error) or any(s in text for s in ("gloo", "NCCL", "Connection closed",
                                                                         "Connection reset", "Broken pipe"))

    def close(self) -> None:
        """Leave the process group (a clean exit; without it torch warns at shutdown)."""
        if self.count > 1 and self._dist().is_initialized():
            self._dist().destroy_process_group()
