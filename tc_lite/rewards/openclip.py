"""OpenCLIP checkpoints as transformers ``CLIPModel``s, without importing ``open_clip``.

Why: HPSv2 (and the CLIP model TextCraftor's code used, OpenCLIP ViT-g-14) are published as OpenCLIP state dicts,
but ``open_clip`` cannot be imported in tc-lite's environment (it needs torchvision, which would pull a second,
CUDA-sized torch). An OpenCLIP ViT "CLIP" model is the same network as transformers' ``CLIPModel``; only the
parameter names differ, and attention keeps q, k and v fused. ``convert_state_dict`` renames and splits them; the
result loads into ``CLIPModel(clip_config(arch))`` with ``strict=True``, so a missing or extra tensor is an error
rather than a silently random weight. The tests check the conversion against open_clip's own model code.

OpenCLIP layout (``open_clip/transformer.py``, ``model.py``; the same in HPSv2's vendored copy) -> transformers:

=====================================================  ====================================================
``visual.conv1.weight``                                ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                             ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                        ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre.*`` / ``visual.ln_post.*``             ``vision_model.pre_layrnorm.*`` / ``post_layernorm.*``
``visual.proj`` [width, embed]                         ``visual_projection.weight`` (transposed)
``token_embedding.weight``                             ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                               ``text_model.embeddings.position_embedding.weight``
``ln_final.*``                                         ``text_model.final_layer_norm.*``
``text_projection`` [width, embed]                     ``text_projection.weight`` (transposed)
``logit_scale``                                        ``logit_scale``
``{visual.,}transformer.resblocks.N.ln_1/ln_2.*``      ``{vision,text}_model.encoder.layers.N.layer_norm1/2.*``
``...attn.in_proj_weight`` [3w, w] / ``in_proj_bias``  ``...self_attn.{q,k,v}_proj.*`` (split in q, k, v order)
``...attn.out_proj.*``                                 ``...self_attn.out_proj.*``
``...mlp.c_fc.*`` / ``...mlp.c_proj.*``                ``...mlp.fc1.*`` / ``...mlp.fc2.*``
=====================================================  ====================================================

``attn_mask`` (the causal mask, a buffer older checkpoints saved) is dropped: transformers builds its own. The text
pooling is OpenCLIP's "token with the highest id" (the end-of-text token): ``eos_token_id=2`` selects exactly that
rule in transformers' CLIP text model. Architectures with other parts (attentional pooling, layer scale, timm or
HF text towers, average pooling, ...) are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tc_lite.errors import UserError

# open_clip's model_configs/*.json for the ViT CLIPs this converter supports (facts; "-quickgelu" variants add
# "quick_gelu": true, which OpenAI-trained weights need).
ARCHS: dict[str, dict[str, Any]] = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-g-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88, "mlp_ratio": 4.3637,
                                "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-bigG-14": {"embed_dim": 1280,
                    "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104,
                                   "mlp_ratio": 4.9231, "patch_size": 14},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}},
}

_VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}


def known_archs() -> list[str]:
    return sorted([*ARCHS, *(f"{a}-quickgelu" for a in ARCHS)])


def resolve_arch(arch: str | dict, *, reward: str, key: str = "arch") -> dict[str, Any]:
    """An architecture by OpenCLIP name (``ViT-H-14``), a dict, or a JSON file in open_clip's ``model_configs``
    format (or an ``open_clip_config.json`` from a hub repo, which wraps it in ``model_cfg``)."""
    if isinstance(arch, dict):
        cfg = arch
    elif isinstance(arch, str) and arch in ARCHS:
        cfg = ARCHS[arch]
    elif isinstance(arch, str) and arch.endswith("-quickgelu") and arch[: -len("-quickgelu")] in ARCHS:
        cfg = {**ARCHS[arch[: -len("-quickgelu")]], "quick_gelu": True}
    elif isinstance(arch, str) and Path(arch).expanduser().is_file():
        path = Path(arch).expanduser()
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"reward '{reward}': {key} file '{arch}' is not readable JSON ({err}).") from err
        if isinstance(cfg, dict) and isinstance(cfg.get("model_cfg"), dict):
            cfg = cfg["model_cfg"]
    else:
        raise UserError(
            f"reward '{reward}': unknown OpenCLIP {key} {arch!r}. Known: {', '.join(known_archs())}; or give the "
            f"path of an open_clip model config JSON (model_configs/<name>.json)."
        )
    _check_arch(cfg, reward=reward, key=key)
    return cfg


def _check_arch(cfg: Any, *, reward: str, key: str) -> None:
    ok = isinstance(cfg, dict) and isinstance(cfg.get("vision_cfg"), dict) and isinstance(cfg.get("text_cfg"), dict)
    if not ok or "embed_dim" not in cfg:
        raise UserError(f"reward '{reward}': {key} must have embed_dim, vision_cfg and text_cfg (open_clip format).")
    unsupported = sorted(
        [k for k in cfg if k not in _TOP_KEYS]
        + [f"vision_cfg.{k}" for k in cfg["vision_cfg"] if k not in _VISION_KEYS]
        + [f"text_cfg.{k}" for k in cfg["text_cfg"] if k not in _TEXT_KEYS]
    )
    if isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        unsupported.append("vision_cfg.layers (a ResNet tower)")
    if unsupported:
        raise UserError(
            f"reward '{reward}': the OpenCLIP {key} uses {unsupported}, which the OpenCLIP -> transformers conversion "
            f"does not support (plain ViT CLIPs only: {', '.join(ARCHS)})."
        )


def clip_config(arch: dict[str, Any]) -> Any:
    """The transformers ``CLIPConfig`` of an OpenCLIP ViT architecture (open_clip's defaults filled in)."""
    from transformers import CLIPConfig

    v, t = arch["vision_cfg"], arch["text_cfg"]
    act = "quick_gelu" if arch.get("quick_gelu") else "gelu"  # open_clip: nn.GELU (exact) unless quick_gelu
    v_width, t_width = int(v["width"]), int(t["width"])
    vision = dict(
        hidden_size=v_width,
        intermediate_size=int(v_width * float(v.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(v["layers"]),
        num_attention_heads=v_width // int(v.get("head_width", 64)),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=int(arch["embed_dim"]),
    )
    text = dict(
        hidden_size=t_width,
        intermediate_size=int(t_width * float(t.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(t["layers"]),
        num_attention_heads=int(t["heads"]),
        vocab_size=int(t["vocab_size"]),
        max_position_embeddings=int(t["context_length"]),
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=int(arch["embed_dim"]),
        # eos_token_id=2 is transformers' legacy rule "pool at argmax(input_ids)" = OpenCLIP's text.argmax(-1)
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(arch["embed_dim"]))


_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_DROPPED = {"attn_mask", "visual.attn_mask"}


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ViT CLIP state dict -> transformers ``CLIPModel`` state dict (names, q/k/v split, transposes).

    Raises ``KeyError`` naming the first tensor it does not know (the caller turns it into a UserError).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in _DROPPED:
            continue
        if name in _PLAIN:
            out[_PLAIN[name]] = tensor
        elif name in _TRANSPOSED:
            out[_TRANSPOSED[name]] = tensor.t().contiguous()
        elif name == "logit_scale":
            out["logit_scale"] = tensor.reshape(())
        else:
            prefix, tower = None, None
            for p, tw in (("visual.transformer.resblocks.", "vision_model"), ("transformer.resblocks.", "text_model")):
                if name.startswith(p):
                    prefix, tower = p, tw
                    break
            if prefix is None:
                raise KeyError(name)
            index, _, rest = name[len(prefix):].partition(".")
            if not index.isdigit():
                raise KeyError(name)
            base = f"{tower}.encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[-1]  # weight | bias
                q, k, v = tensor.chunk(3, dim=0)
                out[f"{base}self_attn.q_proj.{kind}"] = q.contiguous()
                out[f"{base}self_attn.k_proj.{kind}"] = k.contiguous()
                out[f"{base}self_attn.v_proj.{kind}"] = v.contiguous()
            elif rest in _BLOCK:
                out[base + _BLOCK[rest]] = tensor
            else:
                raise KeyError(name)
    return out


def load_openclip_model(state: dict[str, torch.Tensor], arch: dict[str, Any], *, reward: str, source: str) -> Any:
    """A transformers ``CLIPModel`` holding the OpenCLIP ``state`` (strict: every weight must be there, once).

    The model is built with empty (meta) parameters and the converted tensors are assigned, so a ViT-H does not
    pay for a random initialisation first. Every tensor is cast to the dtype of the patch embedding (checkpoints
    are stored in one precision; mixed files would otherwise break the forward).
    """
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    try:
        converted = convert_state_dict(state)
    except KeyError as err:
        raise UserError(
            f"reward '{reward}': '{source}' holds the tensor {err.args[0]!r}, which is not part of an OpenCLIP ViT "
            f"CLIP model; is it the right file (an OpenCLIP state dict, e.g. HPS_v2.1_compressed.pt)?"
        ) from err
    config = clip_config(arch)
    with init_empty_weights():
        model = CLIPModel(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k}: file {tuple(converted[k].shape)} vs arch {shapes[k]}" for k in sorted(expected & set(converted))
             if tuple(converted[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        raise UserError(
            f"reward '{reward}': '{source}' does not match the OpenCLIP architecture "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}, "
            f"wrong shapes {wrong[:3]}); check the reward's arch argument."
        )
    dtype = converted["vision_model.embeddings.patch_embedding.weight"].dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
