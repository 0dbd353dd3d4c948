"""Estimate the configurations of DESIGN.md §4's memory table and the presets' targets with tc_lite.memory.

reference_gib is DESIGN §4's figure for its rows and the issue's target for the preset rows.

    python benchmarks/memory_table.py [--only NAME ...] [--json OUT.json]

DESIGN §4 measured SD1.5 at 512², B=1, CFG, TE LoRA r=8, one ViT-L reward on the device, fp16 weights. Its
parameter total (2.49 GiB) counts the VAE decoder only and the reward's vision tower; tc-lite keeps the whole VAE
on the device (+0.06 GiB). Each row runs in ~20-40 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from tc_lite.config import load_config
from tc_lite.memory.estimate import GiB, estimate_memory

# One aesthetic reward (ViT-L/14 vision tower + MLP head), resident on the device, as DESIGN §4's setting.
_DESIGN = ["rewards.terms.clip.weight=0", "rewards.terms.aesthetic.weight=1", "rewards.offload=none",
           "train.grad_accum=1", "memory.precision=fp16"]
ROWS: list[tuple[str, list[str], dict, float | None]] = [
    ("K=1, no checkpointing", ["sampling.grad_steps=1", "memory.checkpoint_unet=false", "memory.checkpoint_vae=false"], {}, 6.88),
    ("K=5, no checkpointing", ["sampling.grad_steps=5", "memory.checkpoint_unet=false", "memory.checkpoint_vae=false"], {}, 12.65),
    ("K=5, UNet calls checkpointed", ["sampling.grad_steps=5", "memory.checkpoint_unet=true", "memory.checkpoint_vae=false"], {}, 5.51),
    ("K=5, + VAE blocks checkpointed", ["sampling.grad_steps=5"], {}, 4.08),
    ("K=5, both checkpointed, ViT-H reward", ["sampling.grad_steps=5", "rewards.terms.aesthetic.weight=0",
                                            "rewards.terms.pick.type=pickscore", "rewards.terms.pick.weight=1"], {}, 4.08 + 0.6),
    ("B=4, both checkpointed", ["sampling.grad_steps=5", "train.batch_size=4"], {}, 8.83),
]
PRESETS: list[tuple[str, str, list[str], float | None]] = [
    ("presets/aesthetic.yaml", "presets/aesthetic.yaml", [], 4.5),
    ("presets/all-rewards.yaml", "presets/all-rewards.yaml", [], 7.0),
    ("batch-4 12 GB (aesthetic, B=4, accum 1)", "presets/aesthetic.yaml", ["train.batch_size=4", "train.grad_accum=1"], 10.0),
    ("aesthetic + prefix cache", "presets/aesthetic.yaml", ["sampling.prefix_cache=lazy"], 4.5),
    ("aesthetic, lora.mode=full, adamw8bit", "presets/aesthetic.yaml", ["lora.mode=full", "optim.name=adamw8bit"], None),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="substrings of row names to run")
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args()
    out = []
    jobs = [(name, "presets/aesthetic.yaml", _DESIGN + ov, kw, ref) for name, ov, kw, ref in ROWS]
    jobs += [(name, path, ov, {}, target) for name, path, ov, target in PRESETS]
    for name, path, overrides, kwargs, ref in jobs:
        if args.only and not any(o in name for o in args.only):
            continue
        cfg = load_config(path, overrides)
        for label, kw in [("as coded", dict(kwargs))]:
            t = time.perf_counter()
            est = estimate_memory(cfg, **kw)
            row = {"row": name, "variant": label, "peak_gib": round(est.peak_gib, 3), "phase": est.peak_phase,
                   "params_gib": round(est.peak_kinds.get("parameters", 0) / GiB, 3),
                   "reference_gib": ref, "seconds": round(time.perf_counter() - t, 1),
                   "phases": {p.name: round(p.peak / GiB, 3) for p in est.phases}}
            out.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
