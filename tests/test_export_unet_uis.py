"""Our kohya UNet names against ComfyUI's and A1111's own mapping rules, restated from their code: every module of a
UNet LoRA on real SD1.5 and SDXL base (configs bundled, built on 'meta') lands on an LDM weight of the right shape,
and the weights the UI computes equal the trainer's own LoRA merged by peft.

- ComfyUI, comfyanonymous/ComfyUI `comfy/lora.py` (commit 41444b52) `model_lora_keys_unet`: every model weight
  `diffusion_model.<ldm>.weight` is reachable as `lora_unet_<ldm with . -> _>` (SDXL's SGM names), and every diffusers
  key of `comfy.utils.unet_to_diffusers(unet_config)` as `lora_unet_<diffusers path with . -> _>` (SD1's names).
  `unet_to_diffusers` numbers the LDM blocks from `num_res_blocks`, `transformer_depth` (one entry per input res
  block), `transformer_depth_output` (one per output block, from the last: `detect_unet_config` walks
  `output_blocks.{N-1-count}` and the map pops from the end) and `transformer_depth_middle`. The patch is
  `weight += strength · (alpha / down.shape[0]) · (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)`
  (`comfy/weight_adapter/lora.py`). `LoraLoader` gives UNet keys `strength_model` (text-encoder keys
  `strength_clip`); `LoraLoaderModelOnly` builds the key map from the UNet alone, so the text-encoder keys are the
  ones it logs as "lora key not loaded".
- A1111, AUTOMATIC1111/stable-diffusion-webui `extensions-builtin/Lora/networks.py` (v1.6+):
  `assign_network_names_to_compvis_modules` names every module of `sd_model.model` (`diffusion_model.…`, the LDM
  UNet) with "." -> "_"; `load_network` first tries `convert_diffusers_name_to_compvis`, whose UNet rules are
  `lora_unet_down_blocks_B_attentions_J_X` -> `diffusion_model_input_blocks_{1 + 3B + J}_1_X`,
  `lora_unet_mid_block_attentions_0_X` -> `diffusion_model_middle_block_1_X` and
  `lora_unet_up_blocks_B_attentions_J_X` -> `diffusion_model_output_blocks_{3B + J}_1_X` (SD1.x's two res blocks per
  level hard-coded); failing that, "SDXL loras seem to already have correct compvis keys": `lora_unet` ->
  `diffusion_model`. `network.py`: the te multiplier applies when 'transformer' is in the first 20 characters of the
  module name, else the unet multiplier (`<lora:name:1>` sets both; `extra_networks_lora.py`: unet defaults to te);
  `network_lora.py`: updown = up.reshape(out, -1) @ down.reshape(r, -1), reshaped to the weight, · alpha/r · multiplier.

The LDM module names both UIs see are those of ComfyUI's `unet_to_diffusers` (restated below); they agree with
`tc_lite.models.ldm_keys.unet_key`, whose layout diffusers' `from_single_file` reads back (tests/models).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tc_lite.export import read_kohya
from tc_lite.lora import lora_layers
from tc_lite.unet_lora import add_unet_lora, kohya_unet_module_name, split_unet_lora, unet_kohya_state_dict
from tests.test_export_sdxl import xl  # noqa: F401 (fixture)
from tests.test_export_sdxl_uis import comfy_apply
from tests.test_export_unet import peft_merged, sd1, sd1_run, xl_run  # noqa: F401 (fixtures)

ASSETS = Path(__file__).resolve().parents[1] / "tc_lite" / "assets"
# comfy.utils UNET_MAP_ATTENTIONS and TRANSFORMER_BLOCKS, their weights (the only places a LoRA module sits)
_ATTENTION = ("proj_in", "proj_out", "norm")
_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
          "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def _comfy_unet_config(c: Any) -> dict[str, Any]:
    """The `unet_config` ComfyUI's `detect_unet_config` reads from the UNet's LDM checkpoint, written from the
    diffusers config of the same UNet (the depth lists as that function appends them)."""
    levels, per_block = len(c["down_block_types"]), int(c["layers_per_block"])
    depth = c.get("transformer_layers_per_block") or 1
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down = [depth[b] if "CrossAttn" in c["down_block_types"][b] else 0 for b in range(levels) for _ in range(per_block)]
    up_depth = list(reversed(depth))  # diffusers' up blocks take the depths in reverse
    output = [up_depth[b] if "CrossAttn" in c["up_block_types"][b] else 0
              for b in range(levels) for _ in range(per_block + 1)]
    return {"num_res_blocks": [per_block] * levels, "channel_mult": [1] * levels, "transformer_depth": down,
            "transformer_depth_output": list(reversed(output)), "transformer_depth_middle": depth[-1]}


def _comfy_unet_to_diffusers(unet_config: dict[str, Any]) -> dict[str, str]:
    """`comfy.utils.unet_to_diffusers`, its transformer part: diffusers weight key -> LDM weight key."""
    num_res_blocks = unet_config["num_res_blocks"]
    depth, depth_out = list(unet_config["transformer_depth"]), list(unet_config["transformer_depth_output"])
    out: dict[str, str] = {}

    def attention(diffusers: str, ldm: str, count: int) -> None:
        for b in _ATTENTION:
            out[f"{diffusers}.{b}.weight"] = f"{ldm}.{b}.weight"
        for t in range(count):
            for b in _BLOCK:
                out[f"{diffusers}.transformer_blocks.{t}.{b}.weight"] = f"{ldm}.transformer_blocks.{t}.{b}.weight"

    for x in range(len(unet_config["channel_mult"])):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            count = depth.pop(0)
            if count > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", count)
            n += 1
    attention("mid_block.attentions.0", "middle_block.1", unet_config["transformer_depth_middle"])
    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(len(unet_config["channel_mult"])):
        n = (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x] + 1):
            count = depth_out.pop()
            if count > 0:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", count)
            n += 1
    return out


def _comfy_model(unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(ComfyUI's model weights `diffusion_model.<ldm>.weight` of the UNet's transformers, diffusers -> LDM map)."""
    mapping = _comfy_unet_to_diffusers(_comfy_unet_config(unet.config))
    state = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    return {f"diffusion_model.{ldm}": state[k] for k, ldm in mapping.items()}, mapping


def _comfy_model_lora_keys_unet(model_keys: set[str], mapping: dict[str, str]) -> dict[str, str]:
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    for k, ldm in mapping.items():
        key_map["lora_unet_" + k[:-len(".weight")].replace(".", "_")] = f"diffusion_model.{ldm}"
    return key_map


def _comfy_patch(model: dict[str, torch.Tensor], mapping: dict[str, str], lora: dict[str, torch.Tensor],
                 strength: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ComfyUI with the UNet's key map alone (LoraLoaderModelOnly's, and LoraLoader's UNet half)."""
    return comfy_apply(model, _comfy_model_lora_keys_unet(set(model), mapping), lora, strength)


_A1111_UNET = [  # convert_diffusers_name_to_compvis, its attention rules (suffix_conversion touches resnets only)
    (re.compile(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)"),
     lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"),
    (re.compile(r"lora_unet_mid_block_attentions_(\d+)_(.+)"), lambda m: f"diffusion_model_middle_block_1_{m[2]}"),
    (re.compile(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)"),
     lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"),
]


def _a1111_resolve(key: str, network_layers: set[str]) -> str | None:
    """`load_network`: a kohya module name -> the A1111 module name it patches (None: "Failed to match keys")."""
    sd_key = key
    for pattern, to in _A1111_UNET:
        if m := pattern.match(key):
            sd_key = to(m)
            break
    if sd_key in network_layers:
        return sd_key
    if "lora_unet" in key:
        sd_key = key.replace("lora_unet", "diffusion_model")
        return sd_key if sd_key in network_layers else None
    return None


def _a1111_names(ldm_weights: dict[str, Any]) -> dict[str, str]:
    """`network_layer_mapping` over sd_model.model (the LDM UNet): module name -> its weight key."""
    return {k.removesuffix(".weight").replace(".", "_"): k for k in ldm_weights}


def _a1111_patch(model: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
                 unet_multiplier: float) -> dict[str, torch.Tensor]:
    names = _a1111_names(model)
    out = {k: v.clone() for k, v in model.items()}
    for module in {k.split(".", 1)[0] for k in lora}:
        sd_key = _a1111_resolve(module, set(names))
        assert sd_key is not None, module
        assert "transformer" not in sd_key[:20]  # network.py: so the unet multiplier applies, not the te one
        up, down = lora[f"{module}.lora_up.weight"].float(), lora[f"{module}.lora_down.weight"].float()
        target = names[sd_key]
        updown = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(out[target].shape)
        out[target] += updown * (lora[f"{module}.alpha"].item() / down.shape[0]) * unet_multiplier
    return out


def _to_diffusers(model: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    return {k: model[f"diffusion_model.{ldm}"] for k, ldm in mapping.items()}


# ---------------------------------------------------------------------------------------------- real sizes


def _real_unet(family: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    raw = json.loads((ASSETS / family / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(raw)


@pytest.fixture(scope="module", params=[("sd15", "sd_v1", 192), ("sdxl", "sdxl_base_v1-0", 722)],
                ids=["sd15", "sdxl"])
def real(request) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]], int]:
    """(the real UNet on meta, kohya name -> weight shape of every module the trainer's UNet LoRA names, as
    `unet_kohya_state_dict` names them, expected count): SD1.5 16 transformers x 12, SDXL 70 blocks x 10 + 11 x 2."""
    family, version, count = request.param
    unet = _real_unet(family)
    add_unet_lora(unet, rank=1, alpha=1.0)
    modules = {kohya_unet_module_name(name, version, unet.config): tuple(layer.base_layer.weight.shape)
               for name, layer in lora_layers(unet)}
    return unet, modules, count


def test_a_real_unet_lora_has_kohyas_module_count_and_the_ldm_map_agrees_with_ours(real):
    from tc_lite.models.ldm_keys import unet_key

    unet, modules, count = real
    assert len(modules) == count
    mapping = _comfy_unet_to_diffusers(_comfy_unet_config(unet.config))
    assert all(unet_key(k, unet.config) == ldm for k, ldm in mapping.items())


def test_comfyui_maps_every_module_of_a_real_unet_lora(real):
    unet, modules, _ = real
    model, mapping = _comfy_model(unet)
    key_map = _comfy_model_lora_keys_unet(set(model), mapping)
    for module, shape in modules.items():
        target = key_map.get(module)
        assert target is not None, f"ComfyUI: lora key not loaded: {module}"
        assert tuple(model[target].shape) == shape, module


def test_a1111_resolves_every_module_of_a_real_unet_lora(real):
    unet, modules, _ = real
    model, _ = _comfy_model(unet)
    names = _a1111_names(model)
    for module, shape in modules.items():
        sd_key = _a1111_resolve(module, set(names))
        assert sd_key is not None, f"A1111 did not match {module}"
        assert "transformer" not in sd_key[:20], module  # the unet multiplier applies
        assert tuple(model[names[sd_key]].shape) == shape, module


# ---------------------------------------------------------------------------------------------- the weights


def _base_and_want(base_unet: torch.nn.Module, trained_unet: torch.nn.Module, strength: float):
    base = {k: v for k, v in base_unet.state_dict().items()}
    merged = peft_merged(trained_unet)
    return base, {k: base[k] + strength * (merged[k] - base[k]) for k in base}


@pytest.mark.parametrize("which", ["sd1", "xl"])
def test_comfyui_model_only_patches_the_unet_as_the_trained_lora(which, sd1, xl, sd1_run, xl_run):  # noqa: F811
    base_unet, (path, trained) = (sd1.unet, sd1_run) if which == "sd1" else (xl.unet, xl_run)
    lora = read_kohya(path)[0]
    model, mapping = _comfy_model(base_unet)
    patched, not_loaded = _comfy_patch(model, mapping, lora, strength=0.5)
    assert not_loaded == sorted(split_unet_lora(lora)[0])  # LoraLoaderModelOnly: only the text-encoder keys
    base, want = _base_and_want(base_unet, trained.unet, 0.5)
    got = _to_diffusers(patched, mapping)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    assert sum(not torch.equal(v, base[k]) for k, v in got.items()) == len(split_unet_lora(lora)[1]) // 3


@pytest.fixture(scope="module")
def sd15_layout() -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    """(base, trained, kohya tensors) of a UNet with SD1.5's block layout (4 levels, 2 res blocks, conv
    projections) at a tiny width: A1111's SD1 rules hard-code that layout, so they are checked on it."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 16, 16), layers_per_block=2,
                                cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()
    trained = add_unet_lora(copy.deepcopy(base), rank=2, alpha=3.0, init_seed=0)
    with torch.no_grad():
        for _, layer in lora_layers(trained):
            w = layer.lora_B["tc_lite"].weight
            w.copy_(0.3 * torch.randn(w.shape))
    return base, trained, unet_kohya_state_dict(trained, "sd_v1")


def test_a1111_patches_an_sd15_layout_unet_as_the_trained_lora(sd15_layout):
    base_unet, trained, lora = sd15_layout
    assert len(lora) // 3 == 16 * 12
    model, mapping = _comfy_model(base_unet)
    base, want = _base_and_want(base_unet, trained, 0.75)
    got = _to_diffusers(_a1111_patch(model, lora, unet_multiplier=0.75), mapping)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    assert sum(not torch.equal(v, base[k]) for k, v in got.items()) == 16 * 12


def test_a1111_patches_the_tiny_sdxl_unet_by_its_sgm_names(xl, xl_run):  # noqa: F811
    path, trained = xl_run
    unet_part = split_unet_lora(read_kohya(path)[0])[1]
    model, mapping = _comfy_model(xl.unet)
    _, want = _base_and_want(xl.unet, trained.unet, 1.0)
    got = _to_diffusers(_a1111_patch(model, unet_part, unet_multiplier=1.0), mapping)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
