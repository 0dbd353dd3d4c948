"""A peft LoRA on the CLIP text encoder, and its canonical kohya names.

Design choices (why):
- The adapter is injected in place with ``peft.inject_adapter_in_model``: the encoder stays a ``CLIPTextModel``
  (``te(input_ids).last_hidden_state``, ``.config``, ``.dtype``, gradient checkpointing and diffusers' pipeline
  slots all keep working), with no ``base_model.model.`` wrapper to strip.
- LoRA weights live in fp32 while the frozen base may be fp16/bf16: the update ``(alpha/r)·B·A`` is tiny relative
  to W, and half-precision optimizer steps on it underflow. peft casts the LoRA input to the LoRA dtype and the
  result back to the base dtype, so the forward is consistent.
- kohya names are derived from ``layers.N.(self_attn|mlp).proj`` wherever it sits in the module path, never from
  the live module tree: transformers >= 5.6 dropped ``text_model`` from ``CLIPTextModel`` and names built from the
  tree (``lora_te_encoder_layers_…``) load in neither A1111 nor ComfyUI (DESIGN §3).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from tc_lite.errors import UserError

__all__ = [
    "ADAPTER_NAME",
    "DEFAULT_TARGETS",
    "KOHYA_TE_PREFIX",
    "add_lora",
    "enable_full_finetune",
    "has_lora",
    "kohya_module_name",
    "kohya_state_dict",
    "load_kohya_state_dict",
    "lora_disabled",
    "lora_layers",
    "set_lora_scale",
    "trainable_parameters",
]

# kohya's six linears per encoder layer; 12 layers x 6 = 72 modules, 216 keys for SD1.
DEFAULT_TARGETS: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ADAPTER_NAME = "tc_lite"  # distinct from peft's "default" and diffusers' "default_N", so they never collide
KOHYA_TE_PREFIX = "lora_te"  # SD1's; each family names its slots' prefixes (tc_lite.families)

# Which sub-block owns each target; used both to build kohya names and to reject nonsense like mlp.q_proj.
_BLOCK_OF = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "out_proj": "self_attn",
    "fc1": "mlp",
    "fc2": "mlp",
}
_MODULE_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)(?=$|\.)")
_KOHYA_KEY_RE = re.compile(
    r"^(?P<module>(?P<prefix>lora_te\d?)_(?:text_model_)?encoder_layers_(?P<layer>\d+)_"
    r"(?P<block>self_attn|mlp)_(?P<proj>q_proj|k_proj|v_proj|out_proj|fc1|fc2))"
    r"\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)


# --------------------------------------------------------------------------------------------------- names


def kohya_module_name(module_name: str, prefix: str = KOHYA_TE_PREFIX) -> str | None:
    """Canonical kohya module name for a text-encoder linear, or None if it is not one of the six targets.

    ``text_model.encoder.layers.3.mlp.fc1``, ``encoder.layers.3.mlp.fc1`` and
    ``base_model.model.encoder.layers.3.mlp.fc1`` all give ``lora_te_text_model_encoder_layers_3_mlp_fc1``.
    """
    m = _MODULE_RE.search(module_name)
    if m is None:
        return None
    layer, block, proj = m.groups()
    if _BLOCK_OF.get(proj) != block:
        return None
    return f"{prefix}_text_model_encoder_layers_{int(layer)}_{block}_{proj}"


def _hf_module_suffix(layer: int, block: str, proj: str) -> str:
    return f"layers.{layer}.{block}.{proj}"


# --------------------------------------------------------------------------------------------------- inject


def lora_layers(module: torch.nn.Module, adapter: str = ADAPTER_NAME) -> list[tuple[str, LoraLayer]]:
    """(name, layer) for every peft LoRA layer in ``module`` that carries ``adapter``, in module order."""
    return [
        (name, sub)
        for name, sub in module.named_modules()
        if isinstance(sub, LoraLayer) and adapter in sub.lora_A
    ]


def has_lora(module: torch.nn.Module, adapter: str = ADAPTER_NAME) -> bool:
    return bool(lora_layers(module, adapter))


def _validate_lora_args(rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    problems = []
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"lora rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        problems.append(f"lora alpha must be a number > 0 (kohya's default is alpha = rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        problems.append(f"lora dropout must be in [0, 1), got {dropout!r}")
    unknown = [t for t in targets if t not in _BLOCK_OF]
    if isinstance(targets, str) or not targets or unknown:
        problems.append(
            f"lora targets must be a non-empty subset of {DEFAULT_TARGETS} (the linears kohya/A1111/ComfyUI map), "
            f"got {targets!r}"
        )
    if problems:
        raise UserError("; ".join(problems))


def add_lora(
    text_encoder: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    init_seed: int | None = None,
    adapter: str = ADAPTER_NAME,
) -> torch.nn.Module:
    """Inject a LoRA into ``text_encoder`` in place and return it (still callable like the original).

    Afterwards only the LoRA weights require grad, and they are fp32 whatever the base dtype. ``lora_B`` starts at
    zero, so the encoder's output is unchanged until training moves it. ``init_seed`` makes ``lora_A``'s random
    init reproducible without touching the global RNG (peft initialises on the CPU, so it is device-independent).
    """
    _validate_lora_args(rank, alpha, dropout, targets)
    if has_lora(text_encoder, adapter):
        raise ValueError(f"text encoder already has a LoRA adapter {adapter!r}; add it once")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(targets),
        bias="none",
        init_lora_weights=True,
    )
    return _inject(text_encoder, config, adapter, init_seed)


def _inject(
    text_encoder: torch.nn.Module, config: LoraConfig, adapter: str, init_seed: int | None
) -> torch.nn.Module:
    rng = torch.random.fork_rng(devices=[]) if init_seed is not None else nullcontext()
    with rng:
        if init_seed is not None:
            torch.manual_seed(init_seed)
        inject_adapter_in_model(config, text_encoder, adapter_name=adapter)
    layers = lora_layers(text_encoder, adapter)
    if not layers:  # peft raises when nothing matches, but a custom model could slip through
        raise ValueError(f"no LoRA layer was injected for targets {config.target_modules}")
    text_encoder.requires_grad_(False)
    for _, layer in layers:
        for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
            part.to(torch.float32)
            part.requires_grad_(True)
    return text_encoder


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that require grad: what the optimizer gets (LoRA only, or the whole encoder)."""
    return [p for p in module.parameters() if p.requires_grad]


def enable_full_finetune(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The paper's setting: every encoder weight trainable, in fp32 (half-precision AdamW updates underflow)."""
    if has_lora(text_encoder):
        raise ValueError("text encoder has a LoRA; full fine-tuning trains the plain encoder (pick one)")
    text_encoder.to(torch.float32)
    text_encoder.requires_grad_(True)
    return text_encoder


# --------------------------------------------------------------------------------------------------- runtime


@contextlib.contextmanager
def _disabled(text_encoder: torch.nn.Module, layers: list[tuple[str, LoraLayer]]) -> Iterator[None]:
    # peft's enable_adapters() also rewrites requires_grad (off when disabling, on for the active adapter when
    # re-enabling); snapshot and restore so an encoder frozen for sampling stays frozen and vice versa.
    flags = [(p, p.requires_grad) for p in text_encoder.parameters()]
    was_disabled = [(layer, layer.disable_adapters) for _, layer in layers]
    for _, layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in was_disabled:
            layer.enable_adapters(not disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


def lora_disabled(text_encoder: torch.nn.Module, adapter: str = ADAPTER_NAME) -> AbstractContextManager[None]:
    """Temporarily run ``text_encoder`` as the original encoder (exactly the base output), with no second copy.

    Used by the two-encoder schedule: the first T-K denoising steps are conditioned on the original encoder.
    A no-op when the module has no LoRA (e.g. full fine-tuning keeps a real frozen copy instead).
    Caveat: run the disabled forward under ``torch.no_grad()`` when activation checkpointing is on: a checkpointed
    recompute during backward happens after this context has exited and would silently see the LoRA enabled.
    """
    layers = lora_layers(text_encoder, adapter)
    if not layers:
        return nullcontext()
    return _disabled(text_encoder, layers)


def set_lora_scale(text_encoder: torch.nn.Module, scale: float, adapter: str = ADAPTER_NAME) -> None:
    """Set the LoRA multiplier (A1111's ``<lora:name:w>``, ComfyUI's strength_clip): W + scale·(alpha/r)·B·A.

    ``scale=w`` realises the paper's interpolation w·tuned + (1-w)·original to first order; 1.0 restores training
    behaviour. Export is unaffected (it writes the real alpha).
    """
    for _, layer in lora_layers(text_encoder, adapter):
        layer.set_scale(adapter, float(scale))


# --------------------------------------------------------------------------------------------------- kohya


def kohya_state_dict(
    text_encoder: torch.nn.Module, *, prefix: str = KOHYA_TE_PREFIX, adapter: str = ADAPTER_NAME
) -> dict[str, torch.Tensor]:
    """The LoRA as a kohya state dict: ``{module}.lora_down.weight`` = lora_A [r, in],
    ``{module}.lora_up.weight`` = lora_B [out, r], ``{module}.alpha`` = the real lora_alpha (fp32 scalar).

    Tensors are detached fp32 CPU copies, ordered by layer then module. Empty if there is no LoRA.
    """
    entries: list[tuple[tuple[int, int], str, LoraLayer]] = []
    seen: dict[str, str] = {}
    order = {t: i for i, t in enumerate(DEFAULT_TARGETS)}
    for name, layer in lora_layers(text_encoder, adapter):
        kname = kohya_module_name(name, prefix)
        if kname is None:
            raise ValueError(f"LoRA on {name!r} has no kohya name; only {DEFAULT_TARGETS} in encoder layers export")
        if kname in seen:
            raise ValueError(f"{name!r} and {seen[kname]!r} both map to {kname!r}")
        seen[kname] = name
        m = _MODULE_RE.search(name)
        assert m is not None
        entries.append(((int(m.group(1)), order[m.group(3)]), kname, layer))
    out: dict[str, torch.Tensor] = {}
    for _, kname, layer in sorted(entries, key=lambda e: e[0]):
        out[f"{kname}.lora_down.weight"] = layer.lora_A[adapter].weight.detach().to("cpu", torch.float32).clone()
        out[f"{kname}.lora_up.weight"] = layer.lora_B[adapter].weight.detach().to("cpu", torch.float32).clone()
        out[f"{kname}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]), dtype=torch.float32)
    return out


def _parse_kohya(sd: Mapping[str, torch.Tensor], source: str,
                 prefix: str = KOHYA_TE_PREFIX) -> dict[tuple[int, str, str], dict[str, torch.Tensor]]:
    """Group kohya keys by (layer, block, proj); reject anything tc-lite cannot load, all at once."""
    groups: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        m = _KOHYA_KEY_RE.match(key)
        if m is None or m.group("prefix") != prefix or _BLOCK_OF[m.group("proj")] != m.group("block"):
            unknown.append(key)
            continue
        groups.setdefault((int(m.group("layer")), m.group("block"), m.group("proj")), {})[m.group("part")] = value
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise UserError(
            f"{source}: {len(unknown)} key(s) are not text-encoder LoRA keys of this model ({shown}). tc-lite loads "
            f"only '{prefix}_text_model_encoder_layers_N_<module>.(lora_down.weight|lora_up.weight|alpha)'; "
            "use a text-encoder LoRA written by tc-lite (UNet LoRAs are not supported here)."
        )
    if not groups:
        raise UserError(f"{source}: no LoRA weights found; pass a kohya-format text-encoder LoRA .safetensors file")
    incomplete = [k for k, parts in groups.items() if not {"lora_down.weight", "lora_up.weight"} <= parts.keys()]
    if incomplete:
        names = ", ".join(_hf_module_suffix(*k) for k in sorted(incomplete)[:5])
        raise UserError(f"{source}: lora_down/lora_up missing for {names}; the file is truncated or not a LoRA")
    return groups


def load_kohya_state_dict(
    text_encoder: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    source: str = "LoRA state dict",
    adapter: str = ADAPTER_NAME,
    prefix: str = KOHYA_TE_PREFIX,
) -> torch.nn.Module:
    """Load a kohya text-encoder LoRA into ``text_encoder`` (the inverse of :func:`kohya_state_dict`).

    If the encoder has no LoRA yet, one is injected on exactly the modules in ``sd`` with the file's rank; if it
    has one, the file must cover the same modules with the same shapes. A missing ``.alpha`` means alpha = rank
    (scale 1, as A1111 and ComfyUI read it). Also accepts the non-canonical ``lora_te_encoder_layers_…`` names
    some tools write under transformers >= 5.6. ``source`` names the file in error messages.
    """
    groups = _parse_kohya(sd, source, prefix)
    by_suffix: dict[tuple[int, str, str], str] = {}
    for name, _ in text_encoder.named_modules():
        m = _MODULE_RE.search(name)
        if m and m.end() == len(name) and _BLOCK_OF.get(m.group(3)) == m.group(2):
            by_suffix[(int(m.group(1)), m.group(2), m.group(3))] = name
    missing = [k for k in groups if k not in by_suffix]
    if missing:
        raise UserError(
            f"{source}: targets {', '.join(_hf_module_suffix(*k) for k in sorted(missing)[:5])} do not exist in this "
            f"text encoder ({text_encoder.config.num_hidden_layers if hasattr(text_encoder, 'config') else '?'} "
            "layers); the LoRA was trained for a different base model; use the base (SD1.x or SDXL) it was made for."
        )

    ranks = {int(parts["lora_down.weight"].shape[0]) for parts in groups.values()}
    existing = {n: layer for n, layer in lora_layers(text_encoder, adapter)}
    if not existing:
        if len(ranks) != 1:
            raise UserError(f"{source}: modules have different ranks {sorted(ranks)}; tc-lite loads one rank per LoRA")
        config = LoraConfig(
            r=ranks.pop(),
            lora_alpha=1.0,  # set per module below
            lora_dropout=0.0,
            target_modules=[by_suffix[k] for k in sorted(groups)],
            bias="none",
        )
        _inject(text_encoder, config, adapter, init_seed=0)
        existing = {n: layer for n, layer in lora_layers(text_encoder, adapter)}
    else:
        not_in_file = sorted(n for n in existing if (_key_of(n) not in groups))
        if not_in_file:
            raise UserError(
                f"{source}: does not cover LoRA module(s) {', '.join(not_in_file[:5])} of the current model; "
                "load it into an encoder without a LoRA, or use a file saved from the same LoRA settings."
            )

    with torch.no_grad():
        for key, parts in groups.items():
            name = by_suffix[key]
            layer = existing.get(name)
            if layer is None:
                raise UserError(
                    f"{source}: has {_hf_module_suffix(*key)}, which the current LoRA does not target; "
                    "set lora targets to match the file or load into an encoder without a LoRA."
                )
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            if tuple(down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
                raise UserError(
                    f"{source}: {_hf_module_suffix(*key)} has down {tuple(down.shape)} / up {tuple(up.shape)}, the "
                    f"model expects {tuple(a.shape)} / {tuple(b.shape)}: different rank or base model (hidden "
                    "size 768 for SD1.x and SDXL's te1, 1280 for SDXL's te2). Match lora rank to the file, or use the base it was trained on."
                )
            a.copy_(down.to(a.dtype))
            b.copy_(up.to(b.dtype))
            rank = a.shape[0]
            alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
            layer.lora_alpha[adapter] = alpha
            layer.set_scale(adapter, 1.0)
    return text_encoder


def _key_of(module_name: str) -> tuple[int, str, str] | None:
    m = _MODULE_RE.search(module_name)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None
