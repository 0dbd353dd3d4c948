"""Diffusers -> original LDM ("A1111 single-file") key names for SD1.x and SDXL (SGM), and telling checkpoint
families apart by keys.

Written from the two layouts, not from a converter, so that saving the tiny model as a single file and loading it
back through diffusers' `from_single_file` really tests our loader. It covers the module kinds SD1.x uses: ResNet
blocks, cross-attention transformers (conv or linear projections), down/upsamplers, the cross-attention mid block,
the VAE's ResNet/attention blocks and the CLIP text model.

LDM layout in brief (UNet, `L` = layers_per_block):
  input_blocks.0.0 = conv_in; per level b, layer j: input_blocks.{1+b(L+1)+j}.{0 resnet | 1 attention};
  the level's downsampler is input_blocks.{1+b(L+1)+L}.0.op; middle_block.{0,2} resnets, .1 attention;
  output_blocks.{b(L+1)+j}.{0 resnet | 1 attention}, the level's upsampler at .{1 or 2}.conv after them.

SDXL's original (SGM) file keeps that UNet layout (levels without attention simply have no `.1`; SDXL's added
embedding MLP is `label_emb.0.{0,2}`) and the VAE's, and stores its two text encoders as "embedders":
  conditioner.embedders.0.transformer.text_model.*  CLIP ViT-L, in transformers' own names (as SD1's);
  conditioner.embedders.1.model.*                   OpenCLIP bigG, in OpenCLIP's names: token_embedding.weight,
      positional_embedding, transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v stacked),
      attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final, and text_projection as a [hidden, proj] matrix
      (x @ P: the transpose of transformers' Linear weight).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + size-ids MLP
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module path of `rest` (e.g. `conv1.weight`) through `table`; unknown heads are kept."""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_key(key: str, config: Any) -> str:
    """One diffusers `UNet2DConditionModel` key -> its LDM name (without the `model.diffusion_model.` prefix)."""
    per_level = int(config["layers_per_block"]) + 1
    head = _rename_head(key, _UNET_TOP)
    if head != key:
        return head
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * per_level + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"input_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + per_level - 1}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * per_level + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"output_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1  # after the attention, if the level has one
        return f"output_blocks.{b * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r} (a module kind SD1.x and SDXL do not use)")


def vae_key(key: str, config: Any) -> str:
    """One diffusers `AutoencoderKL` key -> its LDM name (without `first_stage_model.`)."""
    n_levels = len(config["up_block_types"])
    if m := re.fullmatch(r"(encoder|decoder)\.(.+)", key):
        part, rest = m[1], m[2]
        if m2 := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            level = int(m2[2]) if m2[1] == "down" else n_levels - 1 - int(m2[2])  # LDM numbers decoder levels upward
            return f"{part}.{m2[1]}.{level}.block.{m2[3]}.{_rename_head(m2[4], {'conv_shortcut': 'nin_shortcut'})}"
        if m2 := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
            return f"{part}.down.{m2[1]}.downsample.conv.{m2[2]}"
        if m2 := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
            return f"{part}.up.{n_levels - 1 - int(m2[1])}.upsample.conv.{m2[2]}"
        if m2 := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
            return f"{part}.mid.block_{int(m2[1]) + 1}.{_rename_head(m2[2], {'conv_shortcut': 'nin_shortcut'})}"
        if m2 := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
            return f"{part}.mid.attn_1.{_rename_head(m2[1], _VAE_ATTENTION)}"
        return f"{part}.{_rename_head(rest, _VAE_TOP)}"
    return key  # quant_conv, post_quant_conv


def clip_key(key: str) -> str:
    """A `CLIPTextModel` key -> LDM name (without prefix); transformers >= 5.6 dropped `text_model.`, older kept it."""
    return key.removeprefix("text_model.")


def open_clip_state_dict(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A `CLIPTextModelWithProjection`'s weights in OpenCLIP's text-tower names (without prefix), as SDXL's SGM file
    stores its second encoder: q/k/v stacked into one `in_proj`, the projection transposed."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, v in encoder.state_dict().items():
        key = key.removeprefix("text_model.")  # present in transformers 5.x for the projection model; may go
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            out[f"transformer.resblocks.{m[1]}.{_rename_head(m[2], _OPEN_CLIP_LAYER)}"] = v
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v  # a bare parameter in OpenCLIP, no `.weight`
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = v
        elif key == "text_projection.weight":
            out["text_projection"] = v.T  # OpenCLIP computes x @ P with P [hidden, proj]; Linear stores [proj, hidden]
        else:
            raise KeyError(f"no OpenCLIP name for text-encoder key {key!r}")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _unet_and_vae(components: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in components.unet.state_dict().items():
        out[UNET_PREFIX + unet_key(k, components.unet.config)] = v
    for k, v in components.vae.state_dict().items():
        name = vae_key(k, components.vae.config)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + name] = v
    return out


def ldm_state_dict(components: Any) -> dict[str, torch.Tensor]:
    """The SD1 pipeline's weights under original LDM names, as A1111/ComfyUI/`from_single_file` expect them."""
    out = _unet_and_vae(components)
    for k, v in components.text_encoder.state_dict().items():
        out[CLIP_PREFIX + clip_key(k)] = v
    return out


def sdxl_ldm_state_dict(components: Any) -> dict[str, torch.Tensor]:
    """The SDXL pipeline's weights under the original SGM names (`sd_xl_base_1.0.safetensors`' layout)."""
    out = _unet_and_vae(components)
    for k, v in components.text_encoder.state_dict().items():
        out[SDXL_CLIP_PREFIX + clip_key(k)] = v
    for k, v in open_clip_state_dict(components.text_encoder_2).items():
        out[SDXL_OPEN_CLIP_PREFIX + k] = v
    return out


def checkpoint_family(keys: Iterable[str]) -> str:
    """Guess what a single-file checkpoint holds from its key names.

    Returns "sd1", "sd2" (OpenCLIP text encoder), "sdxl" (CLIP-L + OpenCLIP-bigG embedders), "sdxl_refiner"
    (only the OpenCLIP embedder), "sd3" (MMDiT), "flux", "lora" (a LoRA, not a model), "no_unet" or "unknown".
    """
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model.") or has("conditioner.embedders.0.transformer."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl_refiner"
    if has(UNET_PREFIX + "joint_blocks.") or has("joint_blocks.") or has("text_encoders.clip_g."):
        return "sd3"
    if has(UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        return "flux"
    if has("lora_te") or has("lora_unet") or any(".lora_A." in k or ".lora_down." in k for k in keys):
        return "lora"
    if has("cond_stage_model.model."):
        return "sd2"
    if not has(UNET_PREFIX):
        return "no_unet"
    if has("cond_stage_model.transformer."):
        return "sd1"
    return "unknown"
