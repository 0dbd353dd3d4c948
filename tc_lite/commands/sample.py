"""`python -m tc_lite sample`: images from a base model and tuned encoders, mixed at several weights, in one grid.

Columns are weight settings, rows are (prompt, seed): the same noise across a row, so a row shows exactly what the
tuned encoder changes. A weight is one number (the same for every --lora) or a comma list with one per --lora
(style mixing), e.g. `--weight 0 1 0.5,0.5`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tc_lite.errors import UserError

if TYPE_CHECKING:  # torch is imported inside the functions, so `python -m tc_lite --help` stays fast
    import torch

_HEADER_H = 18  # pixels of column labels above the grid


def parse_weights(items: list[str] | None, n_loras: int) -> list[list[float]]:
    """One weight vector (one entry per LoRA) per grid column."""
    if not items:
        return [[0.0] * n_loras, [1.0] * n_loras] if n_loras else [[]]
    if n_loras == 0:
        raise UserError("--weight needs at least one --lora to weigh")
    out = []
    for item in items:
        try:
            values = [float(x) for x in item.split(",")]
        except ValueError:
            raise UserError(f"--weight {item!r} is not a number or comma-separated numbers (e.g. 0.5 or 1,0.5)") from None
        if len(values) == 1:
            values = values * n_loras
        if len(values) != n_loras:
            raise UserError(f"--weight {item!r} has {len(values)} values for {n_loras} --lora file(s); give one "
                            "number (used for every LoRA) or one per LoRA")
        out.append(values)
    return out


def _label(weights: list[float]) -> str:
    if all(w == 0 for w in weights):
        return "base"
    return "w=" + ",".join(f"{w:g}" for w in weights)


def grid_with_header(images: torch.Tensor, rows: int, row_labels: list[str], col_labels: list[str],
                     path: Path) -> Path:
    """`make_grid` plus a strip of column labels on top, saved atomically as PNG."""
    from PIL import Image, ImageDraw

    from tc_lite.io import atomic_path
    from tc_lite.outputs import make_grid

    body = make_grid(images, rows=rows, labels=row_labels)
    cols = len(col_labels)
    label_w = 160 if row_labels else 0  # make_grid's left label column
    cell_w = (body.width - label_w) // cols
    canvas = Image.new("RGB", (body.width, body.height + _HEADER_H), "white")
    canvas.paste(body, (0, _HEADER_H))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels):
        draw.text((label_w + c * cell_w + 4, 3), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def run_sample(args: argparse.Namespace, log: Callable[[str], None] = print) -> Path:
    import torch

    from tc_lite.config import MemoryConfig, ModelConfig
    from tc_lite.families import load_model
    from tc_lite.inference import default_size, encode_prompts, sample_images
    from tc_lite.models import freeze_and_cast
    from tc_lite.precision import resolve_precision

    loras = [Path(p) for p in (args.lora or [])]
    for p in loras:
        if not p.exists():
            raise UserError(f"--lora {str(p)!r} does not exist; pass a LoRA .safetensors (or an export folder)")
    weights = parse_weights(args.weight, len(loras))
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {str(out)!r} must end in .png")
    prec = resolve_precision(MemoryConfig(device=args.device, precision=args.precision))
    family, comps = load_model(ModelConfig(source=args.model, config_dir=args.config_dir, vae=args.vae,
                                           allow_pickle=args.allow_pickle), prec.weight_dtype)
    freeze_and_cast(comps, prec.weight_dtype)  # the VAE in fp32 where fp16 would overflow (SDXL's)
    for m in (*family.encoders(comps).values(), comps.unet, comps.vae):
        m.eval().to(prec.device)
    size = (args.height or default_size(comps), args.width or default_size(comps))
    emb = encode_prompts(comps, args.prompt, loras, negative_prompt=args.negative_prompt, size=size)
    from tc_lite.unet_mix import UNetLoRAMix

    unet_loras = UNetLoRAMix(comps.unet, loras)  # files that also tuned the UNet apply it at the same weight
    columns = [sample_images(comps, emb, args.seeds, w, tuned_steps=args.tuned_steps, steps=args.steps,
                             guidance=args.guidance, scheduler=args.scheduler, height=args.height, width=args.width,
                             eta=args.eta, batch_size=args.batch_size, autocast=prec.autocast,
                             unet_loras=unet_loras)
               for w in weights]
    images = torch.stack(columns, dim=1).flatten(0, 1)  # [rows*cols, 3, H, W], row-major
    row_labels = [f"{p} (seed {s})" for p in args.prompt for s in args.seeds]
    col_labels = [_label(w) for w in weights]
    if args.tuned_steps is not None:
        col_labels = [c if c == "base" else f"{c} last {args.tuned_steps}" for c in col_labels]
    grid_with_header(images, rows=len(row_labels), row_labels=row_labels, col_labels=col_labels, path=out)
    log(f"wrote {out}: rows = prompt × seed ({len(row_labels)}), columns = {', '.join(col_labels)}")
    return out


def _run(args: argparse.Namespace) -> int:
    run_sample(args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="generate with tuned encoders at several interpolation weights, as a labelled grid",
        description="TextCraftor interpolation on the text embeddings: emb = orig + Σ wᵢ·(tunedᵢ − orig). w=0 is "
                    "the base model exactly, w=1 the tuned one; values between and above 1 work, and several "
                    "--lora files mix styles.")
    p.add_argument("--model", required=True, help="base model (SD1.x or SDXL): hub id, diffusers folder, single "
                                                   ".safetensors, tiny or tiny-sdxl")
    p.add_argument("--lora", action="append", help="a tuned encoder: LoRA .safetensors (kohya/diffusers), peft "
                                                   "folder, or merged encoder file; repeat to mix several")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several rows")
    p.add_argument("--weight", nargs="+", help="grid columns: a weight, or comma list with one per --lora "
                                              "(default: 0 1)")
    p.add_argument("--tuned-steps", type=int, help="use the tuned embedding only for the last N steps "
                                                   "(paper: 15 of 25); default all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", help="ddim, euler or dpm++ (DPM-Solver++ 2M)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--height", type=int, help="default: the model's native size")
    p.add_argument("--width", type=int)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", default="sample_grid.png")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--config-dir", help="diffusers config folder for a single-file --model (default: the bundled "
                                        "SD1.5 or SDXL base configs, by the file's keys)")
    p.add_argument("--vae", help="replacement VAE (hub id, folder or .safetensors), e.g. "
                                 "madebyollin/sdxl-vae-fp16-fix for SDXL in fp16")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickle (.ckpt) --model; it can run code")
    p.set_defaults(func=_run)
