"""`python -m tc_lite export RUN_DIR --format kohya|peft|diffusers|merged`: re-export a run in another format.

The source is the run's finished output (`<name>.safetensors` for LoRAs, `<name>_text_encoder.safetensors` and, for
SDXL's te2, `<name>_text_encoder_2.safetensors` for encoders trained in full), a checkpoint given with
`--checkpoint`, or, for an unfinished run, its newest checkpoint (`tc_lite.export.run_weights`). Every format covers
every encoder slot the run trained (SDXL: te1 and/or te2) and its UNet LoRA (`unet.mode: lora`): kohya keeps it in
the one file, diffusers under `unet.` keys of the same file, peft as a `unet/` adapter, merged as a diffusers UNet
folder (`<name>_unet/`, or `unet/` of an --out folder). `--rank` extracts only text encoders trained in full; the
UNet LoRA is kept at its own rank.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tc_lite.errors import UserError

if TYPE_CHECKING:  # torch (and tc_lite.export, which imports it) inside the functions: `--help` stays fast
    import torch

    from tc_lite.export.run_weights import RunWeights

FORMATS = ("kohya", "peft", "diffusers", "merged")
_DEFAULT_PRECISION = {"kohya": "fp16", "peft": "fp16", "diffusers": "fp16", "merged": "fp32"}
_LOSSY_UPDATE = 0.01  # warn when half precision loses more than 1% of a merged encoder's weight change


def _default_out(rw: RunWeights, fmt: str, rank: int | None) -> Path:
    stem = rw.cfg.output.name + (f"_step{rw.step:06d}" if rw.from_checkpoint and rw.step else "")
    if rank is not None:
        stem += f"_r{rank}"
    name = {"kohya": f"{stem}.safetensors", "peft": f"{stem}_peft", "diffusers": f"{stem}_diffusers",
            "merged": f"{stem}_text_encoder.safetensors"}[fmt]
    return rw.run_dir / "export" / name


def export_run(run_dir: str | Path, fmt: str, *, out: str | Path | None = None, save_precision: str | None = None,
               checkpoint: str | Path | None = None, rank: int | None = None,
               log: Callable[[str], None] = print) -> Path:
    """Export a run (or one of its checkpoints) as `fmt`; returns the written file or folder (merged SDXL: the
    first encoder's file; the second sits beside it, see `tc_lite.export.encoder.encoder_path`; merged with a UNet
    LoRA: the UNet folder sits beside them, see `tc_lite.export.unet.unet_path`, and is returned when no text
    encoder was trained)."""
    from tc_lite.export import save_dtype_of
    from tc_lite.export.run_weights import load_run

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    dtype = save_dtype_of(save_precision or _DEFAULT_PRECISION[fmt])
    rw = load_run(run_dir, checkpoint, log)
    if rank is not None and not rw.encoders:
        what = f"a LoRA of rank {rw.cfg.lora.rank}" if rw.cfg.unet.mode != "lora" else "LoRAs (a UNet LoRA included)"
        raise UserError(f"--rank extracts a LoRA from a full fine-tune (lora.mode: full); this run trained {what} "
                        "already: drop --rank")
    dest = Path(out) if out is not None else _default_out(rw, fmt, rank)
    if fmt == "merged":
        return _export_merged(rw, dest, dtype, log)
    lora, extra = dict(rw.lora), {}
    if rw.encoders:
        if rank is None:
            raise UserError(f"{rw.label} is a full fine-tuned text encoder: export it with --format merged, or as "
                            f"a LoRA with --format {fmt} --rank R (extracted by SVD, error reported)")
        extracted, extra = _extract(rw, rank, log)
        lora.update(extracted)
    return _export_lora(rw, lora, fmt, dest, dtype, extra, log)


def _extract(rw: RunWeights, rank: int, log: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], dict]:
    """One kohya LoRA (each encoder under its prefix) from the fully trained encoders, the error per encoder."""
    from tc_lite.export import encoder_state_dict, extract_lora

    family, base = rw.family(), rw.base_encoders()
    lora: dict[str, torch.Tensor] = {}
    reports = {}
    for slot in family.slots:
        if slot.name in rw.encoders:
            part, reports[slot.name] = extract_lora(encoder_state_dict(base[slot.name]), rw.encoders[slot.name],
                                                    rank, prefix=slot.kohya_prefix)
            lora.update(part)
            log(f"SVD extraction{f' of {slot.name}' if len(family.slots) > 1 else ''}, {reports[slot.name]}")
    extra = {"tc_lite_svd_rel_error": f"{max(r.rel_error for r in reports.values()):.6g}",
             "tc_lite_svd_untargeted_change": f"{max(r.untargeted_change for r in reports.values()):.6g}",
             "tc_lite_svd": {k: {"rank": r.rank, "rel_error": r.rel_error, "worst_module": r.worst_module,
                                 "worst_error": r.worst_error, "untargeted_change": r.untargeted_change}
                             for k, r in reports.items()}}
    return lora, extra


def _describe(lora: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    from tc_lite.export.kohya import kohya_dims
    from tc_lite.export.slots import split_lora
    from tc_lite.unet_lora import split_unet_lora

    te, unet = split_unet_lora(lora)
    named = [(fmt.slot, part) for fmt, part in (split_lora(te).items() if te else [])]
    parts = []
    for label, part in named + ([("unet", unet)] if unet else []):
        rank, alpha = kohya_dims(part)
        parts.append(f"{label}: {sum(k.endswith('.alpha') for k in part)} modules, rank {rank}, alpha {alpha}")
    return f"{'; '.join(parts)}; {str(dtype).removeprefix('torch.')}"


def _export_lora(rw: RunWeights, lora: dict[str, torch.Tensor], fmt: str, dest: Path, dtype: torch.dtype,
                 extra: dict, log: Callable[[str], None]) -> Path:
    from tc_lite.export import export_diffusers, export_peft, write_kohya
    from tc_lite.export.kohya import a1111_warning
    from tc_lite.export.slots import split_lora
    from tc_lite.export.trained import run_lora_metadata
    from tc_lite.unet_lora import split_unet_lora

    what = _describe(lora, dtype)
    te, unet = split_unet_lora(lora)
    unet_tree = rw.unet_tree() if unet and fmt in ("peft", "diffusers") else None
    if fmt == "kohya":
        meta = rw.file_metadata
        metadata = run_lora_metadata(
            rw.cfg, lora, output_name=dest.stem, steps=rw.step or 0,
            precision=meta.get("ss_mixed_precision", rw.cfg.memory.precision),
            base_model_version=meta.get("ss_base_model_version", rw.family().kohya_base_model_version),
            extra={"tc_lite_source": Path(rw.label).name, **extra})
        path = write_kohya(lora, dest, metadata=metadata, save_dtype=dtype)
        strengths = " and ".join((["strength_clip"] if te else []) + (["strength_model"] if unet else []))
        log(f"wrote kohya LoRA ({what}) to {path}\n  A1111: copy to models/Lora, prompt <lora:{dest.stem}:1>; "
            f"ComfyUI: models/loras, LoraLoader ({strengths})")
        if warning := a1111_warning(lora):
            log(warning)
    elif fmt == "peft":
        if dest.suffix == ".safetensors":
            raise UserError(f"--out {str(dest)!r}: a peft adapter is a folder (adapter_config.json + weights); "
                            "give a folder path")
        path = export_peft(lora, dest, save_dtype=dtype, base_model=rw.cfg.model.source, source=rw.label,
                           unet=unet_tree)
        several = len(rw.family().slots) > 1 or bool(unet)
        components = [f.component for f in (split_lora(te) if te else [])] + (["unet"] if unet else [])
        hints = [f"PeftModel.from_pretrained(pipe.{c}, '{path / c if several else path}')" for c in components]
        log(f"wrote peft adapter ({what}) to {path}/\n  " + "\n  ".join(hints))
    else:
        path = export_diffusers(lora, dest, save_dtype=dtype, source=rw.label, unet=unet_tree,
                                base_model_version=rw.family().kohya_base_model_version)
        log(f"wrote diffusers LoRA ({what}) to {path}\n  pipe.load_lora_weights('{path.parent}')")
    return path


def _export_merged(rw: RunWeights, dest: Path, dtype: torch.dtype, log: Callable[[str], None]) -> Path:
    """Every encoder of the family, merged: a LoRA slot as W + (alpha/r)·up@down, a fully trained slot as trained,
    an untrained slot as the base (so SDXL always gets the pair ComfyUI's DualCLIPLoader and diffusers take); and a
    UNet LoRA merged into the base UNet (`_export_merged_unet`). A run that trained no text encoder writes only
    the UNet."""
    from tc_lite.export import (
        encoder_path,
        encoder_state_dict,
        export_encoder,
        load_encoder_weights,
        merge_lora,
    )
    from tc_lite.export.slots import split_lora
    from tc_lite.inference import plain_copy
    from tc_lite.unet_lora import split_unet_lora

    family = rw.family()
    te, unet = split_unet_lora(rw.lora)
    by_prefix = {f.prefix: part for f, part in split_lora(te, rw.label).items()} if te else {}
    foreign = sorted(set(by_prefix) - {s.kohya_prefix for s in family.slots})
    if foreign:
        raise UserError(f"{rw.label}: holds {', '.join(foreign)} modules, which {family.label} (the run's "
                        f"model.source) has no encoder for; it comes from another base model")
    written = []
    for slot, base_te in zip(family.slots, rw.base_encoders().values()) if by_prefix or rw.encoders else ():
        base = encoder_state_dict(base_te)
        if slot.name in rw.encoders:
            load_encoder_weights(plain_copy(base_te), rw.encoders[slot.name], source=rw.label)  # same architecture?
            tuned, how = rw.encoders[slot.name], "fully trained"
        elif slot.kohya_prefix in by_prefix:
            tuned, how = merge_lora(base, by_prefix[slot.kohya_prefix], source=rw.label), "LoRA merged"
        else:
            tuned, how = base, "not trained: a copy of the base"
        lost = _retention_warning(slot.name, tuned, base, dtype, log)
        path = export_encoder(tuned, encoder_path(dest, slot.encoder_attr, len(family.slots) > 1), save_dtype=dtype,
                              config=base_te.config, architecture=type(base_te).__name__, component=slot.encoder_attr,
                              metadata={"tc_lite_source": Path(rw.label).name, "tc_lite_base_model": rw.cfg.model.source,
                                        "tc_lite_slot": slot.name})
        log(f"wrote merged text encoder {slot.name} ({how}; {len(tuned)} tensors, "
            f"{str(dtype).removeprefix('torch.')}; {lost:.2%} of the weight change lost to rounding) to {path}")
        written.append(path)
    if unet:
        written.append(_export_merged_unet(rw, unet, dest, dtype, log))
    return written[0]


def _export_merged_unet(rw: RunWeights, lora: dict[str, torch.Tensor], dest: Path, dtype: torch.dtype,
                        log: Callable[[str], None]) -> Path:
    """The base UNet with the run's UNet LoRA merged, as a diffusers UNet folder (`tc_lite.export.unet`)."""
    from tc_lite.export.unet import base_unet_state_dict, export_unet, merge_unet_lora, unet_path

    base_unet = rw.base_model()[1].unet
    tuned = merge_unet_lora(base_unet, lora, source=rw.label)
    lost = _retention_warning("the UNet", tuned, base_unet_state_dict(base_unet), dtype, log)
    path = export_unet(tuned, unet_path(dest), unet=base_unet, save_dtype=dtype,
                       metadata={"tc_lite_source": Path(rw.label).name, "tc_lite_base_model": rw.cfg.model.source})
    log(f"wrote merged UNet ({sum(k.endswith('.alpha') for k in lora)} LoRA modules merged; {len(tuned)} tensors, "
        f"{str(dtype).removeprefix('torch.')}; {lost:.2%} of the weight change lost to rounding) to {path}/\n"
        f"  UNet2DConditionModel.from_pretrained('{path}')")
    return path


def _retention_warning(what: str, tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                       dtype: torch.dtype, log: Callable[[str], None]) -> float:
    """How much of the weight change `dtype` rounds away; warns above 1%."""
    from tc_lite.export import update_retention

    lost = update_retention(tuned, base, dtype)
    if lost > _LOSSY_UPDATE:
        log(f"warning: storing {what} in {str(dtype).removeprefix('torch.')} loses {lost:.1%} of the fine-tuning's "
            "weight change (it is smaller than that precision's resolution); use --save-precision fp32")
    return lost


def _run(args: argparse.Namespace) -> int:
    export_run(args.run_dir, args.format, out=args.out, save_precision=args.save_precision,
               checkpoint=args.checkpoint, rank=args.rank)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run as kohya / peft / diffusers LoRA or merged text encoder(s) and UNet",
        description="Export a finished run (or one of its checkpoints) in another format. Default output: "
                    "RUN_DIR/export/<name>….")
    p.add_argument("run_dir", help="the run's output.dir (holds config.yaml)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", help="output file (kohya, merged) or folder (peft, diffusers; merged to a folder "
                                 "gives config.json + model.safetensors). SDXL merged: te2 goes beside te1 with "
                                 "diffusers' _2 suffix, or into DIR/text_encoder_2/; a merged UNet goes to "
                                 "<stem>_unet/ beside a file, or DIR/unet/")
    p.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"],
                   help="weights dtype (default fp16 for LoRAs, fp32 for merged: fp16 can erase small updates)")
    p.add_argument("--checkpoint", help="export this RUN_DIR/checkpoints/step_NNNNNN.pt instead of the final output")
    p.add_argument("--rank", type=int, help="full fine-tunes only: extract a LoRA of this rank by SVD")
    p.set_defaults(func=_run)
