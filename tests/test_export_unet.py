"""A UNet LoRA in the kohya file: diffusers' pipelines apply it as the trainer's own LoRA (W + (alpha/r)·up@down on
every adapted module, the text encoders as before), `load_unet_lora` reads it back into a UNet that computes what
the trained one did, and the metadata says what the file holds. ComfyUI's and A1111's name mapping:
tests/test_export_unet_uis.py; every export format of a run: tests/test_export_unet_run.py.

Built on the tiny SD1 and SDXL with random weights. The UNet LoRA's rank and alpha (2 / 5.0) differ from the text
encoders' (4 / 3.0), so a loader that assumes alpha = rank, or one rank per file, is caught. Files are fp32, so the
comparisons are exact up to float reassociation (1e-6).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tc_lite.errors import UserError
from tc_lite.export import encoder_state_dict, merge_lora, read_kohya, read_tuned, split_lora, write_kohya
from tc_lite.export.trained import run_lora_metadata
from tc_lite.lora import ADAPTER_NAME, lora_layers
from tc_lite.unet_lora import load_unet_lora, split_unet_lora, unet_kohya_state_dict
from tests.test_export_sdxl import xl  # noqa: F401 (fixture)

PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny-cpu.yaml"
OVERRIDES = ["unet.mode=lora", "unet.rank=2", "unet.alpha=5", "unet.lr=3e-4", "lora.rank=4", "lora.alpha=3",
             "optim.lr=1e-4"]
ATOL = 1e-6


def config(*overrides: str) -> Any:
    from tc_lite.config import load_config

    return load_config(PRESET, [*OVERRIDES, *overrides])


def trained(components: Any, family_name: str, *overrides: str, seed: int = 3) -> tuple[Any, Any, Any]:
    """(cfg, adapters, components) as a run leaves them: the preset's adapters built on a copy of `components`,
    every LoRA weight moved (lora_B starts at zero), as training does."""
    from tc_lite.adapters import build_adapters
    from tc_lite.families import FAMILIES

    cfg, family = config(*overrides), FAMILIES[family_name]
    comps = copy.copy(components)
    comps.unet = copy.deepcopy(components.unet)
    for slot in family.slots:
        slot.set_encoder(comps, copy.deepcopy(slot.encoder(components)))
    adapters = build_adapters(cfg, family, comps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p += (0.2 if p.numel() < 10_000 else 0.01) * torch.randn(p.shape, generator=g)
    return cfg, adapters, comps


def kohya_file(cfg: Any, adapters: Any, family_name: str, path: Path) -> Path:
    """The run's kohya file as `export_trained` writes it (fp32)."""
    from tc_lite.families import FAMILIES

    tensors = {k: v for a in adapters for k, v in a.kohya_tensors().items()}
    meta = run_lora_metadata(cfg, tensors, output_name=path.stem, steps=7, precision="fp32",
                             base_model_version=FAMILIES[family_name].kohya_base_model_version)
    return write_kohya(tensors, path, metadata=meta, save_dtype=torch.float32)


@torch.no_grad()
def peft_merged(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's weights with its peft LoRA merged by peft itself (`get_delta_weight`): the reference every loader
    must reproduce, independent of any kohya naming."""
    out = {k.replace(".base_layer.", "."): v.clone() for k, v in unet.state_dict().items() if ".lora_" not in k}
    for name, layer in lora_layers(unet):
        out[f"{name}.weight"] += layer.get_delta_weight(ADAPTER_NAME)
    return out


def unet_inputs(unet: torch.nn.Module, components: Any) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    args = (torch.randn(2, 4, size, size, generator=g), torch.tensor([10, 600]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))
    kwargs = {}
    if components.text_encoder_2 is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, components.text_encoder_2.config.projection_dim,
                                                                   generator=g),
                                       "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    return args, kwargs


def unet_out(unet: torch.nn.Module, components: Any) -> torch.Tensor:
    args, kwargs = unet_inputs(unet, components)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


@pytest.fixture(scope="module")
def sd1():
    from tc_lite.models.tiny import build_tiny_components

    c = build_tiny_components(seed=0, pretrain=False)
    for m in (c.text_encoder, c.unet, c.vae):
        m.requires_grad_(False).eval()
    return c


@pytest.fixture(scope="module")
def sd1_run(sd1, tmp_path_factory):
    cfg, adapters, comps = trained(sd1, "sd1")
    path = kohya_file(cfg, adapters, "sd1", tmp_path_factory.mktemp("sd1") / "both.safetensors")
    return path, comps


@pytest.fixture(scope="module")
def xl_run(xl, tmp_path_factory):  # noqa: F811
    cfg, adapters, comps = trained(xl, "sdxl", "lora.per_encoder.te2.rank=2")
    path = kohya_file(cfg, adapters, "sdxl", tmp_path_factory.mktemp("xl") / "both.safetensors")
    return path, comps


def _modules(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(k.startswith(prefix + "_") and k.endswith(".alpha") for k in tensors)


# ---------------------------------------------------------------------------------------------- the file


def test_one_kohya_file_holds_text_encoder_and_unet_modules_with_their_own_rank_alpha_and_lr(sd1_run):
    tensors, md = read_kohya(sd1_run[0])
    # te: 2 layers x 6 linears; unet: 4 transformers (down 0, mid, up 1 x2) x (proj_in, proj_out + 10 per block)
    assert (_modules(tensors, "lora_te"), _modules(tensors, "lora_unet")) == (12, 48)
    assert all(k.startswith(("lora_te_", "lora_unet_down_blocks_0_attentions_0_", "lora_unet_mid_block_attentions_0_",
                             "lora_unet_up_blocks_1_attentions_")) for k in tensors)  # SD1: diffusers paths
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tensors[f"{proj_in}.lora_down.weight"].shape == (2, 32, 1, 1)  # SD1's 1x1 conv, stored 4-D as kohya
    assert tensors[f"{proj_in}.lora_up.weight"].shape == (32, 2, 1, 1) and tensors[f"{proj_in}.alpha"].item() == 5.0
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("Dynamic", "Dynamic")  # te 4/3, unet 2/5
    assert (md["ss_text_encoder_lr"], md["ss_unet_lr"], md["ss_learning_rate"]) == ("0.0001", "0.0003", "0.0001")
    assert md["tc_lite_component"] == "text_encoder+unet"
    assert json.loads(md["tc_lite_unet"]) == {"prefix": "lora_unet", "modules": 48, "rank": 2, "alpha": 5.0,
                                              "lr": 3e-4}
    assert json.loads(md["tc_lite_encoders"])["te"]["modules"] == 12
    assert "UNet is unchanged" not in md["ss_training_comment"] and "Text+UNet" in md["ss_training_comment"]
    hint = md["modelspec.usage_hint"]
    assert "<lora:both:1>" in hint and "strength_model" in hint and "strength_clip" in hint
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["ss_base_model_version"] == "sd_v1"


def test_a_unet_only_file_says_so_and_has_no_text_encoder_lr(sd1, tmp_path):
    cfg, adapters, _ = trained(sd1, "sd1", "lora.encoders=[]")
    tensors, md = read_kohya(kohya_file(cfg, adapters, "sd1", tmp_path / "unet.safetensors"))
    assert all(k.startswith("lora_unet_") for k in tensors) and _modules(tensors, "lora_unet") == 48
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("2", "5.0")
    assert (md["ss_text_encoder_lr"], md["ss_unet_lr"]) == ("None", "0.0003")  # kohya: str(None) when unset
    assert md["tc_lite_component"] == "unet" and json.loads(md["tc_lite_encoders"]) == {}
    assert "LoraLoaderModelOnly" in md["modelspec.usage_hint"] and "text encoder is unchanged" in md[
        "ss_training_comment"]
    with pytest.raises(ValueError, match="base_model_version"):  # a UNet-only file's names do not say SD1 or SDXL
        run_lora_metadata(cfg, tensors, output_name="u", steps=1, precision="fp32")


def test_split_unet_lora_separates_the_parts_and_read_tuned_validates_both(sd1_run):
    tensors = read_kohya(sd1_run[0])[0]
    te, unet = split_unet_lora(tensors)
    assert all(k.startswith("lora_te_") for k in te) and all(k.startswith("lora_unet_") for k in unet)
    assert len(te) + len(unet) == len(tensors)
    assert read_tuned(tensors)[0] == "lora"
    bad = {**tensors, "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(1)}
    with pytest.raises(UserError, match="hada_w1_a"):  # LoHa: not a plain LoRA, named
        read_tuned(bad)


# ---------------------------------------------------------------------------------------------- diffusers


def _fused(pipe, path: Path) -> Any:
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def _assert_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                    modules: int) -> None:
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= ATOL, worst
    assert sum(not torch.equal(want[k], base[k]) for k in want) == modules  # the adapted modules moved, only they


def test_diffusers_sd1_pipeline_applies_the_unet_part_as_the_trained_lora(sd1, sd1_run):
    from tc_lite.families import FAMILIES

    path, trained_comps = sd1_run
    pipe = _fused(FAMILIES["sd1"].pipeline(sd1, unet=copy.deepcopy(sd1.unet),
                                           text_encoder=copy.deepcopy(sd1.text_encoder)), path)
    _assert_weights(pipe.unet.state_dict(), peft_merged(trained_comps.unet), sd1.unet.state_dict(), 48)
    te_part = split_unet_lora(read_kohya(path)[0])[0]
    want = merge_lora(encoder_state_dict(sd1.text_encoder), te_part)
    got = encoder_state_dict(pipe.text_encoder)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= ATOL
    torch.testing.assert_close(unet_out(pipe.unet, sd1), unet_out(trained_comps.unet, sd1), rtol=0, atol=1e-5)


def test_diffusers_sdxl_pipeline_maps_the_sgm_names_and_applies_the_unet_part(xl, xl_run):  # noqa: F811
    from tests.test_export_sdxl import _close, _embeds, _manual, _pipe

    path, trained_comps = xl_run
    tensors = read_kohya(path)[0]
    assert _modules(tensors, "lora_unet") == 88  # 4 transformers with 2 blocks each: 8 x 10 + 4 x (proj_in, proj_out)
    assert all(not k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
               for k in tensors)  # SGM names only: lora_unet_input_blocks_…, middle_block_…, output_blocks_…
    pipe = _pipe(xl)
    pipe.unet = copy.deepcopy(xl.unet)
    pipe.load_lora_weights(str(path))
    _close(_embeds(pipe), _manual(xl, split_unet_lora(tensors)[0]))  # the text encoders as before
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    _assert_weights(pipe.unet.state_dict(), peft_merged(trained_comps.unet), xl.unet.state_dict(), 88)


# ---------------------------------------------------------------------------------------------- reading back


@pytest.mark.parametrize("which", ["sd1", "xl"])
def test_load_unet_lora_gives_back_the_trained_unet(which, sd1, xl, sd1_run, xl_run):  # noqa: F811
    base, (path, trained_comps) = (sd1, sd1_run) if which == "sd1" else (xl, xl_run)
    unet = copy.deepcopy(base.unet)
    paths = load_unet_lora(unet, split_unet_lora(read_kohya(path)[0])[1], source=path.name)
    assert len(paths) == len(lora_layers(trained_comps.unet)) and not any(p.requires_grad for p in
                                                                        unet.parameters())
    torch.testing.assert_close(unet_out(unet, base), unet_out(trained_comps.unet, base), rtol=0, atol=1e-5)
    version = "sd_v1" if which == "sd1" else "sdxl_base_v1-0"
    again = unet_kohya_state_dict(unet, version)  # and it writes the same file back
    want = split_unet_lora(read_kohya(path)[0])[1]
    assert again.keys() == want.keys() and all(torch.equal(again[k], want[k]) for k in want)


def test_load_unet_lora_takes_each_modules_rank_and_alpha_and_diffusers_path_names(sd1):
    """A foreign file: per-module ranks and alphas, no alpha at all on one module, SGM names on an SD1 UNet."""
    from tc_lite.models.ldm_keys import unet_key

    g = torch.Generator().manual_seed(0)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    proj_out = "up_blocks.1.attentions.0.proj_out"
    sgm_q = "lora_unet_" + unet_key(q + ".weight", sd1.unet.config).removesuffix(".weight").replace(".", "_")
    sd = {f"{sgm_q}.lora_down.weight": torch.randn(3, 32, generator=g),
          f"{sgm_q}.lora_up.weight": torch.randn(32, 3, generator=g), f"{sgm_q}.alpha": torch.tensor(1.5),
          "lora_unet_up_blocks_1_attentions_0_proj_out.lora_down.weight": torch.randn(5, 32, 1, 1, generator=g),
          "lora_unet_up_blocks_1_attentions_0_proj_out.lora_up.weight": torch.randn(32, 5, 1, 1, generator=g)}
    unet = copy.deepcopy(sd1.unet)
    assert load_unet_lora(unet, sd) == [q, proj_out]  # module paths, in path order
    merged = peft_merged(unet)
    base = sd1.unet.state_dict()
    down, up = sd[f"{sgm_q}.lora_down.weight"], sd[f"{sgm_q}.lora_up.weight"]
    torch.testing.assert_close(merged[f"{q}.weight"], base[f"{q}.weight"] + 0.5 * up @ down, rtol=0, atol=ATOL)
    d = sd["lora_unet_up_blocks_1_attentions_0_proj_out.lora_down.weight"].flatten(1)
    u = sd["lora_unet_up_blocks_1_attentions_0_proj_out.lora_up.weight"].flatten(1)
    want = base[f"{proj_out}.weight"] + (u @ d).reshape(32, 32, 1, 1)  # no alpha: alpha = rank, scale 1
    torch.testing.assert_close(merged[f"{proj_out}.weight"], want, rtol=0, atol=ATOL)


def test_load_unet_lora_refuses_another_models_modules_and_shapes(sd1, xl, xl_run):  # noqa: F811
    unet_part = split_unet_lora(read_kohya(xl_run[0])[0])[1]
    with pytest.raises(UserError, match=r"not in this UNet \(first: lora_unet_input_blocks"):
        load_unet_lora(copy.deepcopy(sd1.unet), unet_part, source="xl.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    wrong = {f"{name}.lora_down.weight": torch.zeros(2, 48), f"{name}.lora_up.weight": torch.zeros(32, 2)}
    with pytest.raises(UserError, match=r"x.safetensors: .*attn2_to_k has down \(2, 48\).*needs \(2, 32\)"):
        load_unet_lora(copy.deepcopy(sd1.unet), wrong, source="x.safetensors")
    with pytest.raises(UserError, match="lora_down/lora_up missing"):
        load_unet_lora(copy.deepcopy(sd1.unet), {f"{name}.lora_down.weight": torch.zeros(2, 32)})
    with pytest.raises(UserError, match="not kohya UNet LoRA keys"):
        load_unet_lora(copy.deepcopy(sd1.unet), {"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.ones(())})


def test_split_lora_still_names_stray_keys_for_text_encoder_only_readers(sd1_run):
    with pytest.raises(UserError, match="not text-encoder LoRA keys"):
        split_lora(read_kohya(sd1_run[0])[0])


def test_load_unet_lora_beside_a_trained_lora_keeps_it_active_and_trainable(sd1, sd1_run):
    """Another file loaded into a UNet that holds the run's own LoRA: that LoRA stays active and keeps its gradients
    (peft's injection alone would make the new adapter the only active one and freeze the rest)."""
    path, trained_comps = sd1_run
    unet = copy.deepcopy(trained_comps.unet)
    own = [p for p in unet.parameters() if p.requires_grad]
    before = unet_out(unet, sd1)
    attn1 = {k: v for k, v in split_unet_lora(read_kohya(path)[0])[1].items() if "_attn1_" in k}
    load_unet_lora(unet, attn1, adapter="other")
    assert own and all(p.requires_grad for p in own) and [p for p in unet.parameters() if p.requires_grad] == own
    layers = dict(lora_layers(unet))
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].active_adapters == [ADAPTER_NAME,
                                                                                                    "other"]
    assert layers["down_blocks.0.attentions.0.proj_in"].active_adapters == [ADAPTER_NAME]
    assert (unet_out(unet, sd1) - before).abs().max() > 1e-3  # the new one applies on top
    for _, layer in lora_layers(unet):
        layer.set_adapter([ADAPTER_NAME])
    torch.testing.assert_close(unet_out(unet, sd1), before, rtol=0, atol=1e-6)
