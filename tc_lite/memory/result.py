"""The result of a memory estimate: peak, phases, what is resident; `bench memory` prints `format()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tc_lite.memory.tracker import KINDS, PhasePeak

GiB = 2**30

# Phases in step order, with the coarse group the report sums them into.
PHASES: tuple[tuple[str, str], ...] = (
    ("encode", "encode"),
    ("sampling", "sampling"),
    ("grad steps", "grad steps"),
    ("decode", "decode"),
    ("reward", "reward"),
    ("decode backward", "decode"),
    ("grad steps backward", "grad steps"),
    ("encode backward", "encode"),
    ("optimizer", "optimizer"),
)


@dataclass
class MemoryEstimate:
    """The estimate for one configuration. Byte counts are ints; `peak` is what max_memory_allocated would show."""

    peak: int
    peak_phase: str
    peak_kinds: dict[str, int]
    phases: list[PhasePeak]
    resident: dict[str, int]  # exact (unrounded) bytes that live on the device for the whole run, by item
    optimizer_state: int  # exact bytes of optimizer state on the device
    gradients: int  # exact bytes of the trainable parameters' gradients
    setting: dict[str, Any]
    architecture: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    def phase(self, name: str) -> PhasePeak:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def groups(self) -> dict[str, int]:
        """Peak per coarse phase (sampling, grad steps, decode, reward, optimizer, encode): forward and backward."""
        out: dict[str, int] = {}
        for p in self.phases:
            group = dict(PHASES).get(p.name, p.name)
            out[group] = max(out.get(group, 0), p.peak)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak,
            "peak_gib": round(self.peak_gib, 3),
            "peak_phase": self.peak_phase,
            "peak_kinds_bytes": self.peak_kinds,
            "phases": [{"phase": p.name, "peak_bytes": p.peak, "peak_gib": round(p.peak / GiB, 3),
                        "kinds_bytes": p.kinds} for p in self.phases],
            "resident_bytes": self.resident,
            "optimizer_state_bytes": self.optimizer_state,
            "gradient_bytes": self.gradients,
            "setting": self.setting,
            "architecture": self.architecture,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }

    def format(self) -> str:
        """The table `bench memory` prints."""
        s = self.setting
        lines = [
            f"estimated peak GPU memory of one training step: {self.peak_gib:.2f} GiB (in phase '{self.peak_phase}')",
            (f"  {s['height']}x{s['width']}, batch {s['batch_size']}, T={s['steps']} K={s['grad_steps']}, "
            f"CFG {s['guidance_scale']:g}, {s['precision']}, {s['lora']}, attention {s['attention']}, "
            f"checkpoint unet={s['checkpoint_unet']}{' (+ blocks)' if s.get('checkpoint_unet_blocks') else ''} "
            f"vae={s['checkpoint_vae']}{', VAE in ' + s['vae_dtype'] if s.get('vae_dtype', s['precision'][:4]) != s['precision'][:4] else ''}, "
            f"prefix cache {s['prefix_cache']}, "
            f"rewards {', '.join(s['rewards']) or 'none'} (offload {s['offload']})"),
            f"  architecture: {self.architecture}",
            "",
            f"  {'phase':<22}{'peak GiB':>9}   " + "".join(f"{k:>13}" for k in KINDS),
        ]
        for p in self.phases:
            mark = " <" if p.name == self.peak_phase else ""
            kinds = "".join(f"{p.kinds.get(k, 0) / GiB:>13.3f}" for k in KINDS)
            lines.append(f"  {p.name:<22}{p.peak / GiB:>9.3f}   {kinds}{mark}")
        lines += ["", "  resident on the device (exact):"]
        lines += [f"    {name:<30}{b / GiB:>8.3f} GiB  ({b:,} bytes)" for name, b in self.resident.items()]
        lines.append(f"    {'optimizer state':<30}{self.optimizer_state / GiB:>8.3f} GiB  ({self.optimizer_state:,} bytes)")
        lines.append(f"    {'gradients (trainable)':<30}{self.gradients / GiB:>8.3f} GiB  ({self.gradients:,} bytes)")
        lines += ["", "  not included: the CUDA context (~0.3-0.6 GiB), cuBLAS/cuDNN workspaces, allocator fragmentation"]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  ({self.seconds:.1f} s)")
        return "\n".join(lines)
