"""The message after a CUDA out-of-memory error: the estimator's figure, the card's size, the keys that help."""

from __future__ import annotations

from typing import Callable

from tc_lite.config import Config


def out_of_memory_message(cfg: Config, estimate: Callable[[Config], float | None] | None = None) -> str:
    """What to change after a CUDA OOM: the estimator's figure for this config beside the card's size, and the
    keys that lower memory. `estimate` (GiB, or None when it cannot tell) is injectable for tests."""
    from tc_lite.memory.plan import detected_vram_gb

    need = (estimate or estimated_peak_gib)(cfg)
    card = detected_vram_gb()
    sizes = ""
    if need is not None:
        sizes = (f"tc-lite estimates this step at {need:.2f} GiB plus ~0.5 GiB of CUDA context"
                 + (f", on a {card:.1f} GiB card" if card else "") + ". ")
    vram = f"{card:.0f}" if card else "<your card's GB>"
    halve = cfg.train.batch_size // 2
    keys = ["memory.checkpoint_unet=true", "memory.checkpoint_vae=true", "rewards.offload=cpu (or sequential)",
            *([f"train.batch_size={halve} with train.grad_accum={cfg.train.grad_accum * 2}"] if halve else []),
            "a smaller sampling.height/width", "memory.precision=fp16"]
    return (f"out of GPU memory during a training step. {sizes}Let tc-lite choose settings that fit with "
            f"memory.plan=auto memory.vram_gb={vram}, or lower memory by hand with (roughly in order of cost): "
            + ", ".join(keys) + ". Other programs on the GPU count too (nvidia-smi). The last good checkpoint is kept.")


def estimated_peak_gib(cfg: Config) -> float | None:
    """The memory estimator's peak for `cfg`, or None if it cannot estimate it (an unknown architecture, say)."""
    try:
        from tc_lite.memory.estimate import GiB
        from tc_lite.memory.plan import cached_estimate

        return cached_estimate(cfg)["peak_bytes"] / GiB
    except Exception:  # noqa: BLE001 -- a message helper must never raise over the error it explains
        return None
