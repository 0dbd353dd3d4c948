"""Turn a full fine-tune into a LoRA by truncated SVD of its weight change, reporting what the rank loses."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tc_lite.errors import UserError
from tc_lite.export.encoder import canonical_encoder_key
from tc_lite.export.kohya import (
    _TARGET_ORDER,
    CANONICAL_PREFIX,
    _canonical_module,
    _kohya_module,
)
from tc_lite.lora import DEFAULT_TARGETS, KOHYA_TE_PREFIX


@dataclass
class Extraction:
    """How well a rank-r LoRA reproduces a full fine-tune's weight change (errors relative to ‖ΔW‖_F)."""

    rank: int
    rel_error: float  # over all adapted linears together
    worst_module: str
    worst_error: float
    untargeted_change: float  # ‖Δ of biases, LayerNorms, embeddings‖ / ‖Δ of everything‖: what no LoRA carries

    def __str__(self) -> str:
        return (f"rank {self.rank}: relative error {self.rel_error:.3%} of the weight change over the adapted "
                f"linears (worst {self.worst_module}: {self.worst_error:.3%}); {self.untargeted_change:.3%} of the "
                "change is in biases/LayerNorms/embeddings, which a LoRA cannot carry")


def extract_lora(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], rank: int,
                 targets: Sequence[str] = DEFAULT_TARGETS,
                 prefix: str = KOHYA_TE_PREFIX) -> tuple[dict[str, torch.Tensor], Extraction]:
    """A kohya LoRA of ``rank`` approximating tuned − base on the target linears, by truncated SVD, and its error.

    One encoder at a time: ``prefix`` is its kohya prefix (``lora_te2`` for SDXL's te2), so the LoRAs of several
    encoders extracted this way go into one file side by side.

    ΔW = U S Vᴴ; up = U_r·√S_r, down = √S_r·Vᴴ_r (balanced, so fp16 stores both well), alpha = rank (scale 1).
    At full rank (min(out, in)) the reconstruction is exact up to float rounding.
    """
    base = {canonical_encoder_key(k): v for k, v in base.items()}
    tuned = {canonical_encoder_key(k): v for k, v in tuned.items()}
    pat = re.compile(rf"^{re.escape(CANONICAL_PREFIX)}encoder\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
    mods = sorted(((int(m[1]), m[2], m[3]) for k in tuned if (m := pat.match(k)) and m[3] in targets),
                  key=lambda x: (x[0], _TARGET_ORDER[x[2]]))
    if not mods:
        raise UserError("export: the tuned encoder has none of the LoRA target linears; is it a CLIP text encoder?")
    max_rank = min(min(tuned[_canonical_module(*m) + ".weight"].shape) for m in mods)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise UserError(f"--rank must be an integer from 1 to {max_rank} (full rank of this encoder's linears), "
                        f"got {rank!r}")
    out: dict[str, torch.Tensor] = {}
    err2 = ref2 = 0.0
    worst = ("", -1.0)
    for m in mods:
        key = _canonical_module(*m) + ".weight"
        d = tuned[key].double() - base[key].double()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        sq = s[:rank].sqrt()
        up, down = u[:, :rank] * sq, sq[:, None] * vh[:rank]
        e2, r2 = float((d - up @ down).square().sum()), float(d.square().sum())
        err2, ref2 = err2 + e2, ref2 + r2
        rel = math.sqrt(e2 / r2) if r2 > 0 else 0.0
        if rel > worst[1]:
            worst = (_canonical_module(*m).removeprefix(CANONICAL_PREFIX), rel)
        name = _kohya_module(*m, prefix=prefix)
        out[f"{name}.lora_down.weight"] = down.float().contiguous()
        out[f"{name}.lora_up.weight"] = up.float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)
    covered = {_canonical_module(*m) + ".weight" for m in mods}
    other2 = sum(float((tuned[k].double() - base[k].double()).square().sum())
                 for k in tuned if k not in covered and k in base)
    report = Extraction(rank=rank, rel_error=math.sqrt(err2 / ref2) if ref2 > 0 else 0.0, worst_module=worst[0],
                        worst_error=max(worst[1], 0.0),
                        untargeted_change=math.sqrt(other2 / (other2 + ref2)) if other2 + ref2 > 0 else 0.0)
    return out, report
