"""Training checkpoints: everything needed to continue a run exactly, written atomically, the last M kept.

A checkpoint holds the trainable weights, optimizer state (8-bit included: bitsandbytes state is tensors too),
GradScaler, LR schedule, every RNG (python, numpy, torch CPU and CUDA), the prompt sampler's position and the step.
Noise is drawn from per-step generators seeded by (seed, step), so with these states restored a resumed CPU run
reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .io import atomic_path

_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states(processes: Any) -> dict[str, Any]:
    """The checkpoint's RNG entries: this process's state, and with data parallelism every process's (gathered,
    so the main process can write them all) and their number."""
    if processes.count == 1:
        return {"rng": rng_state()}
    return {"rng": rng_state(), "processes": processes.count, "rng_per_process": processes.gather_state(rng_state())}


def restore_rng_states(state: dict[str, Any], processes: Any, source: Any) -> None:
    """This process's RNG state from a checkpoint; a UserError when another number of processes wrote it (the
    prompt order and noise follow the global batch, and the RNG states are per process)."""
    saved, now = state.get("processes", 1), processes.count
    if saved != now:
        raise UserError(
            f"train.resume: {source} was written by a run of {saved} process(es), this launch has {now}. The prompt "
            f"order and noise follow the global batch ({saved} x train.batch_size), and each process's random state "
            f"was saved; launch with --num_processes {saved} to resume exactly, or start a new output.dir (or "
            "train.resume=null after moving the checkpoints away)")
    set_rng_state(state["rng_per_process"][processes.index] if now > 1 else state["rng"])


def _tuples(x: Any) -> Any:
    """torch.load returns python's RNG state with lists where random.setstate needs tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}.pt"


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `step_NNNNNN.pt` atomically, then drop all but the newest `keep` checkpoints."""
    path = checkpoint_path(folder, step)
    with atomic_path(path) as tmp:
        torch.save({"step": step, **state}, tmp)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"train.resume: checkpoint {path} not found; give a step_NNNNNN.pt file or 'auto'") from None
    except Exception as e:  # truncated/corrupt file (atomic writes make this rare: only a foreign file)
        raise UserError(f"train.resume: cannot read checkpoint {path} ({type(e).__name__}: {e}); "
                        "point train.resume at another checkpoint or delete it") from None
