"""Our SDXL kohya names against the two UIs' own mapping rules, restated from their code: every one of the 264
modules of a real-SDXL-shaped LoRA lands on a weight of the right shape, and on the tiny SDXL the weights the UI
computes equal the hand merge W + (alpha/r)·up@down (tests/test_export_sdxl.py shows diffusers computes it too).

- ComfyUI, comfyanonymous/ComfyUI `comfy/lora.py` (commit 41444b52): `model_lora_keys_clip` maps `lora_te1_…` to
  `clip_l.transformer.text_model.encoder.layers.N.<mod>.weight` and `lora_te2_…` to the same names under `clip_g`
  (only when clip_l is in the model: SDXL base); `load_lora` takes `.lora_up/.lora_down/.alpha`; the patch is
  `weight += strength · (alpha / down.shape[0]) · up @ down` (`comfy/weight_adapter/lora.py`, `calculate_weight`).
- A1111, AUTOMATIC1111/stable-diffusion-webui `extensions-builtin/Lora/networks.py` (v1.10): module names are
  `f"{i}_{name}"` over `conditioner.embedders[i].wrapped.named_modules()` (dots -> "_"); `lora_te1_text_model` ->
  `0_transformer_text_model` (CLIP-L, transformers' layout); `convert_diffusers_name_to_compvis` turns
  `lora_te2_…_self_attn_X` into `1_model_transformer_resblocks_N_attn_X` (`mlp_fc1/2` -> `mlp_c_fc/c_proj`) and
  `re_x_proj` sends q/k/v to the fused `nn.MultiheadAttention`, whose `in_proj_weight` is patched only when q, k, v
  AND out_proj are all in the file (`network_apply_weights`); `network.py`: scale alpha/dim, te multiplier when
  'transformer' is in the first 20 characters of the module name.
"""

from __future__ import annotations

import copy
import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from tc_lite.export import canonical_encoder_key, encoder_state_dict, merge_lora, split_lora
from tc_lite.lora import add_lora, kohya_module_name, lora_layers
from tests.test_export_sdxl import lora, xl  # noqa: F401 (fixtures)

ASSETS = Path(__file__).resolve().parents[1] / "tc_lite" / "assets" / "sdxl"
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def _sdxl_encoders_on_meta() -> tuple[nn.Module, nn.Module]:
    """CLIP ViT-L and OpenCLIP bigG at SDXL base's real sizes (bundled configs), no weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(sub: str) -> CLIPTextConfig:
        raw = json.loads((ASSETS / sub / "config.json").read_text())
        return CLIPTextConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})

    with torch.device("meta"):
        return CLIPTextModel(config("text_encoder")), CLIPTextModelWithProjection(config("text_encoder_2"))


@pytest.fixture(scope="module")
def real_modules() -> dict[str, tuple[int, int]]:
    """kohya name -> (out, in) of every module the trainer's LoRA adapters name on real SDXL encoders, named as
    `kohya_state_dict` names them (from the installed transformers' module tree)."""
    out = {}
    for prefix, te in zip(("lora_te1", "lora_te2"), _sdxl_encoders_on_meta()):
        add_lora(te, rank=1, alpha=1.0)
        for name, layer in lora_layers(te):
            out[kohya_module_name(name, prefix)] = tuple(layer.base_layer.weight.shape)
    return out


def test_a_real_sdxl_lora_has_264_canonical_modules_all_four_attention_ones_per_te2_layer(real_modules):
    assert len(real_modules) == 264
    assert sum(k.startswith("lora_te1_text_model_encoder_layers_") for k in real_modules) == 72
    assert sum(k.startswith("lora_te2_text_model_encoder_layers_") for k in real_modules) == 192
    for layer in range(32):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{proj}" in real_modules


# ---------------------------------------------------------------------------------------------- ComfyUI


def _comfy_model_lora_keys_clip(sdk: set[str]) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_clip`, its clip_l/clip_g part, in its own loop order."""
    key_map: dict[str, str] = {}
    clip_l_present = False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                clip_l_present = True
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
    return key_map


def _comfy_clip_state(te1: nn.Module, te2: nn.Module) -> dict[str, torch.Tensor]:
    """ComfyUI's SDXL clip model state dict: each encoder in transformers' original layout under clip_l / clip_g."""
    return {f"{tower}.transformer.{canonical_encoder_key(k)}": v
            for tower, te in (("clip_l", te1), ("clip_g", te2)) for k, v in te.state_dict().items()}


def comfy_apply(state: dict[str, torch.Tensor], key_map: dict[str, str], lora: dict[str, torch.Tensor],
                strength: float = 1.0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ComfyUI's `load_lora` + `calculate_weight` for kohya LoRA keys through `key_map` (LoRA module -> weight):
    W += strength · (alpha/r) · up@down (flattened, as for 1x1 convolutions); also returns the keys ComfyUI would
    log as not loaded."""
    out, loaded = {k: v.clone() for k, v in state.items()}, set()
    for x, target in key_map.items():
        if f"{x}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{x}.lora_up.weight"].float(), lora[f"{x}.lora_down.weight"].float()
        alpha = lora[f"{x}.alpha"].item() / down.shape[0] if f"{x}.alpha" in lora else 1.0
        diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(out[target].shape)
        out[target] += strength * alpha * diff
        loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"}
    return out, sorted(set(lora) - loaded)


def _comfy_patch(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0):
    """ComfyUI applying a LoRA to the text encoders (its CLIP key map)."""
    return comfy_apply(state, _comfy_model_lora_keys_clip(set(state)), lora, strength)


def test_comfyui_maps_every_module_of_a_real_sdxl_lora_to_clip_l_or_clip_g(real_modules):
    te1, te2 = _sdxl_encoders_on_meta()
    state = _comfy_clip_state(te1, te2)
    key_map = _comfy_model_lora_keys_clip(set(state))
    for module, shape in real_modules.items():
        target = key_map.get(module)
        assert target is not None, f"ComfyUI: lora key not loaded: {module}"
        assert target.startswith("clip_l." if module.startswith("lora_te1_") else "clip_g."), (module, target)
        assert tuple(state[target].shape) == shape, module
    # the te2 mapping depends on clip_l being in the MODEL, not in the file: a te2-only LoRA maps the same
    assert all(key_map[m] for m in real_modules if m.startswith("lora_te2_"))


def test_comfyui_patches_the_tiny_sdxl_clip_as_the_manual_merge(xl, lora):  # noqa: F811 (fixtures)
    state = _comfy_clip_state(xl.text_encoder, xl.text_encoder_2)
    patched, not_loaded = _comfy_patch(state, lora)
    assert not_loaded == []
    parts = {f.prefix: part for f, part in split_lora(lora).items()}
    for tower, te, prefix in (("clip_l", xl.text_encoder, "lora_te1"), ("clip_g", xl.text_encoder_2, "lora_te2")):
        want = merge_lora(encoder_state_dict(te), parts[prefix])
        for k, v in want.items():
            torch.testing.assert_close(patched[f"{tower}.transformer.{k}"], v, rtol=0, atol=1e-6)
        changed = [k for k in want if not torch.equal(patched[f"{tower}.transformer.{k}"],
                                                      state[f"{tower}.transformer.{k}"])]
        assert len(changed) == 6 * te.config.num_hidden_layers  # every adapted linear, nothing else


# ---------------------------------------------------------------------------------------------- A1111

_RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


class _ResidualAttentionBlock(nn.Module):
    """open_clip's `ResidualAttentionBlock` module names and kinds: the OpenCLIP bigG SGM holds as embedders[1]."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(mlp, width))]))


class _OpenCLIPText(nn.Module):
    """sgm's FrozenOpenCLIPEmbedder2 (A1111's `embedders[1].wrapped`): `.model` is open_clip's CLIP, text tower."""

    def __init__(self, cfg):
        super().__init__()
        w, n = cfg.hidden_size, cfg.num_hidden_layers
        self.model = nn.Module()
        self.model.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.model.positional_embedding = nn.Parameter(torch.zeros(cfg.max_position_embeddings, w))
        self.model.transformer = nn.Module()
        self.model.transformer.resblocks = nn.ModuleList(
            _ResidualAttentionBlock(w, cfg.num_attention_heads, cfg.intermediate_size) for _ in range(n))
        self.model.ln_final = nn.LayerNorm(w)
        self.model.text_projection = nn.Parameter(torch.zeros(w, cfg.projection_dim))


class _CLIPL(nn.Module):
    """sgm's FrozenCLIPEmbedder (embedders[0].wrapped): `.transformer` a CLIPTextModel with `text_model` (A1111 pins
    transformers < 5.6), whatever the installed transformers builds."""

    def __init__(self, te: nn.Module):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.text_model = getattr(te, "text_model", te)


_SGM_TE2 = "conditioner.embedders.1.model."


def _sgm_te2_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A canonical te2 state dict in the SGM layout (`conditioner.embedders.1.model.…`, fused in_proj)."""
    out = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           "ln_final.bias": hf["text_model.final_layer_norm.bias"],
           "text_projection": hf["text_projection.weight"].T.contiguous()}
    layers = {int(m[1]) for k in hf if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for n in layers:
        hf_l, sgm = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for p in ("weight", "bias"):
            out[f"{sgm}attn.in_proj_{p}"] = torch.cat([hf[f"{hf_l}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{sgm}{theirs}.{p}"] = hf[f"{hf_l}{ours}.{p}"]
    return {_SGM_TE2 + k: v for k, v in out.items()}


def _from_sgm(sgm: dict[str, torch.Tensor], te2: nn.Module) -> dict[str, torch.Tensor]:
    """diffusers' own SGM -> transformers conversion (single_file_utils.convert_open_clip_checkpoint)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    return {canonical_encoder_key(k): v for k, v in convert_open_clip_checkpoint(te2, sgm, prefix=_SGM_TE2).items()}


def _a1111_mapping(embedders: list[nn.Module]) -> dict[str, nn.Module]:
    """`assign_network_names_to_compvis_modules` for an SDXL model."""
    return {f"{i}_{name.replace('.', '_')}": m for i, e in enumerate(embedders) for name, m in e.named_modules()}


def _a1111_resolve(key: str, mapping: dict[str, nn.Module]) -> tuple[str, nn.Module | None]:
    """`load_network`: a kohya module name -> (A1111's key for it, the module it patches)."""
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)  # convert_diffusers_name_to_compvis
    if m:
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        sd_key = f"1_model_transformer_resblocks_{m[1]}_{rest}"
    else:
        sd_key = key
    module = mapping.get(sd_key)
    if module is None and (x := _RE_X_PROJ.match(sd_key)):
        module = mapping.get(x.group(1))
    if module is None and "lora_te1_text_model" in key:
        sd_key = key.replace("lora_te1_text_model", "0_transformer_text_model")
        module = mapping.get(sd_key)
    return sd_key, module


def _a1111_apply(embedders: list[nn.Module], lora: dict[str, torch.Tensor], te_multiplier: float = 1.0) -> None:
    """`network_apply_weights` on every module whose forward the model runs (an MHA's out_proj runs inside it)."""
    mapping = _a1111_mapping(embedders)
    net = {}
    for module in {k.split(".", 1)[0] for k in lora}:
        sd_key, target = _a1111_resolve(module, mapping)
        assert target is not None, module
        assert "transformer" in sd_key[:20]  # network.py: the te multiplier applies
        down, up = lora[f"{module}.lora_down.weight"].float(), lora[f"{module}.lora_up.weight"].float()
        net[sd_key] = up @ down * (lora[f"{module}.alpha"].item() / down.shape[0]) * te_multiplier
    inside_mha = {id(m.out_proj) for m in mapping.values() if isinstance(m, nn.MultiheadAttention)}
    with torch.no_grad():
        for name, layer in mapping.items():
            if isinstance(layer, nn.Linear) and id(layer) not in inside_mha and name in net:
                layer.weight += net[name]
            elif isinstance(layer, nn.MultiheadAttention):
                parts = [net.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
                if all(p is not None for p in parts):
                    layer.in_proj_weight += torch.vstack(parts[:3])
                    layer.out_proj.weight += parts[3]


def test_the_openclip_stand_in_has_the_sgm_layout_diffusers_converts(xl):  # noqa: F811
    """Our stand-in of embedders[1] is the layout diffusers reads from SGM files: every key converts to te2's."""
    te2 = xl.text_encoder_2
    stand_in = _OpenCLIPText(te2.config)
    sgm = {f"conditioner.embedders.1.{k}": v for k, v in stand_in.state_dict().items()}
    hf = encoder_state_dict(te2)
    assert set(sgm) == set(_sgm_te2_state(hf))
    assert {k: tuple(v.shape) for k, v in _from_sgm(sgm, te2).items()} == {k: tuple(v.shape) for k, v in hf.items()}
    back = _from_sgm(_sgm_te2_state(hf), te2)  # and our HF -> SGM is diffusers' conversion read backwards
    assert all(torch.equal(back[k], v) for k, v in hf.items())


def test_a1111_resolves_every_module_of_a_real_sdxl_lora(real_modules):
    te1, te2 = _sdxl_encoders_on_meta()
    with torch.device("meta"):
        embedders = [_CLIPL(te1), _OpenCLIPText(te2.config)]
    mapping = _a1111_mapping(embedders)
    attention = {}
    for module, (out_f, in_f) in real_modules.items():
        sd_key, target = _a1111_resolve(module, mapping)
        assert target is not None, f"A1111 did not match {module}"
        if isinstance(target, nn.MultiheadAttention):  # te2 q/k/v: one third of the fused in_proj each
            assert tuple(target.in_proj_weight.chunk(3, 0)[0].shape) == (out_f, in_f), module
            attention.setdefault(target, set()).add(sd_key.rsplit("_", 2)[-2])
        else:
            assert isinstance(target, nn.Linear) and tuple(target.weight.shape) == (out_f, in_f), module
            if module.startswith("lora_te2_") and module.endswith("self_attn_out_proj"):
                mha = mapping[sd_key.removesuffix("_out_proj")]
                assert target is mha.out_proj
                attention.setdefault(mha, set()).add("out")
    assert len(attention) == 32 and all(v == {"q", "k", "v", "out"} for v in attention.values())


def test_a1111_patches_the_tiny_sdxl_embedders_as_the_manual_merge(xl, lora):  # noqa: F811
    te1, te2 = copy.deepcopy(xl.text_encoder), xl.text_encoder_2

    def sgm_te2() -> _OpenCLIPText:
        module = _OpenCLIPText(te2.config)
        module.load_state_dict({k.removeprefix("conditioner.embedders.1."): v
                                for k, v in _sgm_te2_state(encoder_state_dict(te2)).items()})
        return module

    stand_in = sgm_te2()
    embedders = [_CLIPL(te1), stand_in]
    _a1111_apply(embedders, lora)
    parts = {f.prefix: part for f, part in split_lora(lora).items()}
    got = {"lora_te1": encoder_state_dict(te1),
           "lora_te2": _from_sgm({f"conditioner.embedders.1.{k}": v for k, v in stand_in.state_dict().items()}, te2)}
    for prefix, base in (("lora_te1", xl.text_encoder), ("lora_te2", te2)):
        want = merge_lora(encoder_state_dict(base), parts[prefix])
        for k, v in want.items():
            torch.testing.assert_close(got[prefix][k], v, rtol=0, atol=1e-6)

    # why every te2 layer needs all four: without k_proj, A1111 drops that layer's q, v and out_proj silently
    no_k = {k: v for k, v in lora.items() if not k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_k")}
    plain = sgm_te2()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    _a1111_apply([_CLIPL(copy.deepcopy(xl.text_encoder)), plain], no_k)
    after = plain.state_dict()
    attn0 = "model.transformer.resblocks.0.attn."
    assert torch.equal(after[attn0 + "in_proj_weight"], before[attn0 + "in_proj_weight"])
    assert torch.equal(after[attn0 + "out_proj.weight"], before[attn0 + "out_proj.weight"])
    assert not torch.equal(after["model.transformer.resblocks.1.attn.in_proj_weight"],
                           before["model.transformer.resblocks.1.attn.in_proj_weight"])
