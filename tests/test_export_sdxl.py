"""SDXL export: one kohya file with `lora_te1_` (CLIP ViT-L) and `lora_te2_` (OpenCLIP bigG) modules that diffusers'
`StableDiffusionXLPipeline` loads as the manual merge W + (alpha/r)·up@down, module by module; the diffusers, peft and
merged formats per encoder. ComfyUI's and A1111's own key mapping: tests/test_export_sdxl_uis.py.

Built on the tiny SDXL with random weights (the LoRA's effect on the prompt embeddings is what is compared). te1 and
te2 get different ranks and alphas (4/3.0 and 2/5.0), so a loader that assumes alpha = rank, or one rank per file,
is caught.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open

from tc_lite.errors import UserError
from tc_lite.export import (
    encoder_path,
    encoder_state_dict,
    export_diffusers,
    export_encoder,
    export_peft,
    extract_lora,
    kohya_dims,
    kohya_metadata,
    merge_lora,
    read_kohya,
    read_tuned,
    split_lora,
    write_kohya,
)
from tc_lite.lora import ADAPTER_NAME, add_lora, kohya_state_dict, lora_layers

PROMPTS = ["a red square", "a blue circle on grey"]
RANKS = {"te1": (4, 3.0), "te2": (2, 5.0)}  # (rank, alpha): differ between the encoders and from each other
KOHYA_NAME = re.compile(r"lora_te([12])_text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])")


@pytest.fixture(scope="module")
def xl():
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    c = build_tiny_sdxl_components(seed=0, pretrain=False)
    for m in (c.text_encoder, c.text_encoder_2, c.unet, c.vae):
        m.requires_grad_(False).eval()
    return c


def _with_lora(te: torch.nn.Module, rank: int, alpha: float, seed: int) -> torch.nn.Module:
    te = add_lora(copy.deepcopy(te), rank=rank, alpha=alpha, init_seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for _, layer in lora_layers(te):
            w = layer.lora_B[ADAPTER_NAME].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return te.eval()


@pytest.fixture(scope="module")
def lora(xl) -> dict[str, torch.Tensor]:
    """What the trainer's two LoRA adapters write: each encoder's kohya tensors under its slot's prefix."""
    te1 = _with_lora(xl.text_encoder, *RANKS["te1"], seed=0)
    te2 = _with_lora(xl.text_encoder_2, *RANKS["te2"], seed=1)
    return {**kohya_state_dict(te1, prefix="lora_te1"), **kohya_state_dict(te2, prefix="lora_te2")}


def _meta(sd: dict[str, torch.Tensor], **over) -> dict[str, str]:
    rank, alpha = kohya_dims(sd)
    kw = {"output_name": "xl", "rank": rank, "alpha": alpha, "lr": 1e-4, "seed": 0, "steps": 10,
          "mixed_precision": "bf16", "optimizer": "adamw", "base_model_version": "sdxl_base_v1-0",
          "resolution": (1024, 768), "timestamp": 1_700_000_000, **over}
    return kohya_metadata(**kw)


def _pipe(xl, te1: torch.nn.Module | None = None, te2: torch.nn.Module | None = None):
    from tc_lite.families import FAMILIES

    return FAMILIES["sdxl"].pipeline(xl, text_encoder=copy.deepcopy(te1 or xl.text_encoder),
                                     text_encoder_2=copy.deepcopy(te2 or xl.text_encoder_2))


def _embeds(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77, 32 + 64], pooled [B, 32]) as the SDXL pipeline conditions its UNet."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    return embeds, pooled


def _hand_merge(te: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The manual merge, written from the formula alone: W += (alpha/r)·up@down on the linear the name points to."""
    te = copy.deepcopy(te)
    root = "text_model." if hasattr(te, "text_model") else ""
    with torch.no_grad():
        for key in (k for k in sd if k.endswith(".lora_down.weight")):
            module = key.removesuffix(".lora_down.weight")
            m = re.fullmatch(r"lora_te\d?_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)", module)
            down, up = sd[key].float(), sd[f"{module}.lora_up.weight"].float()
            linear = te.get_submodule(f"{root}encoder.layers.{m[1]}.{m[2]}.{m[3]}")
            linear.weight += float(sd[f"{module}.alpha"]) / down.shape[0] * (up @ down)
    return te


def _manual(xl, sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings of a pipeline whose encoders hold the hand-merged weights of `sd` (a missing prefix: base)."""
    own = {p: {k: v for k, v in sd.items() if k.startswith(p + "_")} for p in ("lora_te1", "lora_te2")}
    return _embeds(_pipe(xl, _hand_merge(xl.text_encoder, own["lora_te1"]),
                         _hand_merge(xl.text_encoder_2, own["lora_te2"])))


def _close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], atol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def _read(path) -> dict[str, torch.Tensor]:
    return read_kohya(path)[0]


# ---------------------------------------------------------------------------------------------- the kohya file


def test_kohya_file_holds_both_encoders_with_real_alphas_and_sdxl_metadata(tmp_path, lora):
    path = write_kohya(lora, tmp_path / "xl.safetensors", metadata=_meta(lora, text_encoder_lr=[1e-4, 5e-5]))
    tensors, md = read_kohya(path)
    modules = {k.split(".", 1)[0] for k in tensors}
    assert all(KOHYA_NAME.fullmatch(m) for m in modules), sorted(modules)[:3]
    assert len([m for m in modules if m.startswith("lora_te1_")]) == 2 * 6  # tiny te1: 2 layers x 6 linears
    assert len([m for m in modules if m.startswith("lora_te2_")]) == 3 * 6  # tiny te2: 3 layers
    assert set(tensors) == {f"{m}.{p}" for m in modules for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    for m in modules:  # each encoder's own rank and real alpha, per module
        rank, alpha = RANKS["te1" if m.startswith("lora_te1_") else "te2"]
        assert tensors[f"{m}.lora_down.weight"].shape[0] == rank and tensors[f"{m}.alpha"].item() == alpha
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"  # A1111: SdVersion.SDXL
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    # the ranks/alphas differ: kohya's networks/resize_lora.py writes "Dynamic" for both
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert md["ss_text_encoder_lr"] == "[0.0001, 5e-05]"  # train_network.py: str(args.text_encoder_lr)
    assert md["ss_resolution"] == "(1024, 768)" and md["modelspec.resolution"] == "1024x768"
    with pytest.raises(ValueError, match="ss_network_dim"):  # a single number would misstate the file
        write_kohya(lora, tmp_path / "bad.safetensors", metadata=_meta(lora, rank=4))
    with pytest.raises(ValueError, match="ss_network_alpha"):
        write_kohya(lora, tmp_path / "bad.safetensors", metadata=_meta(lora, alpha=3.0))


def test_equal_ranks_give_plain_numbers_and_one_lr(xl, tmp_path):
    sd = {**kohya_state_dict(_with_lora(xl.text_encoder, 4, 2.0, 0), prefix="lora_te1"),
          **kohya_state_dict(_with_lora(xl.text_encoder_2, 4, 2.0, 1), prefix="lora_te2")}
    md = read_kohya(write_kohya(sd, tmp_path / "x.safetensors", metadata=_meta(sd, text_encoder_lr=[1e-4, 1e-4])))[1]
    assert (md["ss_network_dim"], md["ss_network_alpha"], md["ss_text_encoder_lr"]) == ("4", "2.0", "0.0001")


def test_a_te2_lora_without_all_four_attention_projections_is_flagged_for_a1111(xl, lora):
    """A1111 patches OpenCLIP's fused attention only with q, k, v and out_proj (tests/test_export_sdxl_uis.py)."""
    from tc_lite.export.kohya import a1111_skipped_layers, a1111_warning

    partial = {**kohya_state_dict(add_lora(copy.deepcopy(xl.text_encoder), rank=2, alpha=2.0, targets=["q_proj"]),
                                  prefix="lora_te1"),
               **kohya_state_dict(add_lora(copy.deepcopy(xl.text_encoder_2), rank=2, alpha=2.0,
                                           targets=["q_proj", "v_proj", "fc1"]), prefix="lora_te2")}
    assert a1111_skipped_layers(partial) == [0, 1, 2]  # te1's separate linears are fine in A1111
    assert "3 layer(s)" in a1111_warning(partial) and "lora.targets" in a1111_warning(partial)
    assert a1111_skipped_layers(lora) == [] and a1111_warning(lora) is None


# ---------------------------------------------------------------------------------------------- diffusers loads it


@pytest.mark.parametrize("save_dtype", [torch.float32, torch.float16])
def test_diffusers_sdxl_pipeline_applies_the_kohya_file_as_the_manual_merge(xl, lora, tmp_path, save_dtype):
    path = write_kohya(lora, tmp_path / "xl.safetensors", metadata=_meta(lora), save_dtype=save_dtype)
    pipe = _pipe(xl)
    base = _embeds(pipe)
    pipe.load_lora_weights(str(path))
    assert sum(".lora_A." in n for n, _ in pipe.text_encoder.named_parameters()) == 12  # every module matched
    assert sum(".lora_A." in n for n, _ in pipe.text_encoder_2.named_parameters()) == 18
    got = _embeds(pipe)
    _close(got, _manual(xl, _read(path)))  # the file's own (fp16-rounded) weights, merged by hand
    assert (got[0] - base[0]).abs().max() > 0.05 and (got[1] - base[1]).abs().max() > 0.05
    width = xl.text_encoder.config.hidden_size  # both encoders' halves of the prompt embedding moved
    assert (got[0][..., :width] - base[0][..., :width]).abs().max() > 0.05
    assert (got[0][..., width:] - base[0][..., width:]).abs().max() > 0.05


@pytest.mark.parametrize("prefix", ["lora_te1", "lora_te2"])
@pytest.mark.parametrize("proj", ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                                  "mlp_fc1", "mlp_fc2"])
def test_every_module_kind_of_both_encoders_is_applied(xl, lora, tmp_path, prefix, proj):
    """All LoRA weights zeroed but one module's (layer 0, which reaches both outputs): diffusers' embeddings still
    move, and exactly as the hand merge of that one module says."""
    keep = f"{prefix}_text_model_encoder_layers_0_{proj}"
    sd = {k: (v if k.startswith(keep + ".") or k.endswith(".alpha") else torch.zeros_like(v)) for k, v in lora.items()}
    path = write_kohya(sd, tmp_path / "one.safetensors", metadata=_meta(sd), save_dtype=torch.float32)
    pipe = _pipe(xl)
    base = _embeds(pipe)
    pipe.load_lora_weights(str(path))
    got = _embeds(pipe)
    assert (got[0] - base[0]).abs().max() > 1e-3, keep
    if prefix == "lora_te2":
        assert (got[1] - base[1]).abs().max() > 1e-3, keep  # te2's projection gives the pooled embedding
    else:
        torch.testing.assert_close(got[1], base[1], rtol=0, atol=0)  # te1 never reaches the pooled embedding
    _close(got, _manual(xl, sd))


def test_a_te2_only_file_holds_only_lora_te2_and_still_loads(xl, lora, tmp_path):
    """`lora.encoders: [te2]`: no lora_te1_ key at all, and diffusers changes only te2's part."""
    te2_only = {k: v for k, v in lora.items() if k.startswith("lora_te2_")}
    path = write_kohya(te2_only, tmp_path / "te2.safetensors", metadata=_meta(te2_only), save_dtype=torch.float32)
    tensors, md = read_kohya(path)
    assert all(k.startswith("lora_te2_") for k in tensors) and len(tensors) == 18 * 3
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("2", "5.0")
    pipe = _pipe(xl)
    base = _embeds(pipe)
    pipe.load_lora_weights(str(path))
    got = _embeds(pipe)
    width = xl.text_encoder.config.hidden_size
    torch.testing.assert_close(got[0][..., :width], base[0][..., :width], rtol=0, atol=0)
    assert (got[0][..., width:] - base[0][..., width:]).abs().max() > 0.05
    _close(got, _manual(xl, tensors))


# ---------------------------------------------------------------------------------------------- other formats


def test_diffusers_format_loads_in_the_sdxl_pipeline_like_the_kohya_file(xl, lora, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    kohya = _pipe(xl)
    kohya.load_lora_weights(str(write_kohya(lora, tmp_path / "k.safetensors", metadata=_meta(lora),
                                            save_dtype=torch.float32)))
    path = export_diffusers(lora, tmp_path / "diffusers", save_dtype=torch.float32)
    sd, alphas, meta = StableDiffusionXLPipeline.lora_state_dict(str(path.parent), return_lora_metadata=True)
    assert {k.split(".", 1)[0] for k in sd} == {"text_encoder", "text_encoder_2"} and len(sd) == 2 * (12 + 18)
    assert (meta["text_encoder.r"], meta["text_encoder_2.r"]) == (4, 2)  # each encoder its own rank
    pipe = _pipe(xl)
    pipe.load_lora_weights(str(path.parent))
    _close(_embeds(pipe), _embeds(kohya))
    # diffusers versions that ignore the metadata assume alpha = r: alpha/r is folded in, so they agree too
    no_meta = _pipe(xl)
    no_meta.load_lora_weights({k: v.clone() for k, v in sd.items()})
    _close(_embeds(no_meta), _embeds(kohya))


def test_peft_writes_one_adapter_per_encoder(xl, lora, tmp_path):
    from peft import PeftModel

    folder = export_peft(lora, tmp_path / "peft", save_dtype=torch.float32, base_model="tiny-sdxl")
    assert sorted(p.name for p in folder.iterdir()) == ["text_encoder", "text_encoder_2"]
    configs = {p.name: json.loads((p / "adapter_config.json").read_text()) for p in folder.iterdir()}
    assert (configs["text_encoder"]["r"], configs["text_encoder"]["lora_alpha"]) == (4, 3.0)
    assert (configs["text_encoder_2"]["r"], configs["text_encoder_2"]["lora_alpha"]) == (2, 5.0)
    assert configs["text_encoder_2"]["auto_mapping"]["base_model_class"] == "CLIPTextModelWithProjection"
    te1 = PeftModel.from_pretrained(copy.deepcopy(xl.text_encoder), str(folder / "text_encoder")).eval()
    te2 = copy.deepcopy(xl.text_encoder_2)
    te2.load_adapter(str(folder / "text_encoder_2"))
    _close(_embeds(_pipe(xl, te1.get_base_model(), te2)), _manual(xl, lora))


def test_every_sdxl_export_reads_back_to_the_same_lora(xl, lora, tmp_path):
    """`sample --lora` and `export` read any of them; the diffusers file of a te1-only SDXL LoRA stays lora_te1."""
    sources = {
        "kohya": write_kohya(lora, tmp_path / "k.safetensors", metadata=_meta(lora), save_dtype=torch.float32),
        "peft": export_peft(lora, tmp_path / "p", save_dtype=torch.float32),
        "diffusers": export_diffusers(lora, tmp_path / "d", save_dtype=torch.float32).parent,
        "peft te2 adapter": tmp_path / "p" / "text_encoder_2",
    }
    bases = {"lora_te1": encoder_state_dict(xl.text_encoder), "lora_te2": encoder_state_dict(xl.text_encoder_2)}
    want = {f.prefix: merge_lora(bases[f.prefix], part) for f, part in split_lora(lora).items()}
    for name, src in sources.items():
        kind, sd = read_tuned(src)
        assert kind == "lora", name
        parts = {f.prefix: part for f, part in split_lora(sd).items()}
        assert set(parts) == ({"lora_te2"} if name == "peft te2 adapter" else {"lora_te1", "lora_te2"}), name
        for prefix, part in parts.items():
            got = merge_lora(bases[prefix], part)
            assert max((got[k] - want[prefix][k]).abs().max().item() for k in got) < 1e-6, (name, prefix)
    te1_only = {k: v for k, v in lora.items() if k.startswith("lora_te1_")}
    kind, sd = read_tuned(export_diffusers(te1_only, tmp_path / "d1", save_dtype=torch.float32))
    assert kind == "lora" and all(k.startswith("lora_te1_") for k in sd)
    with pytest.raises(UserError, match="mixes SD1"):
        split_lora({**te1_only, "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)})


def test_merged_encoders_per_slot_load_in_transformers_and_the_pipeline(xl, lora, tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {f.prefix: part for f, part in split_lora(lora).items()}
    merged = {"text_encoder": (xl.text_encoder, merge_lora(encoder_state_dict(xl.text_encoder), parts["lora_te1"])),
              "text_encoder_2": (xl.text_encoder_2,
                                 merge_lora(encoder_state_dict(xl.text_encoder_2), parts["lora_te2"]))}
    assert "text_projection.weight" in merged["text_encoder_2"][1]  # beside text_model., not inside it
    files, folders = {}, {}
    for component, (base, sd) in merged.items():
        kw = {"save_dtype": torch.float32, "config": base.config, "architecture": type(base).__name__,
              "component": component}
        files[component] = export_encoder(sd, encoder_path(tmp_path / "xl_text_encoder.safetensors", component), **kw)
        folders[component] = export_encoder(sd, encoder_path(tmp_path / "xl_merged", component, several=True), **kw)
    assert [p.name for p in files.values()] == ["xl_text_encoder.safetensors", "xl_text_encoder_2.safetensors"]
    with safe_open(str(files["text_encoder_2"]), "pt") as f:
        assert f.metadata()["tc_lite_component"] == "text_encoder_2"
        assert all(k.startswith(("text_model.", "text_projection.")) for k in f.keys())
    te1 = CLIPTextModel.from_pretrained(tmp_path / "xl_merged", subfolder="text_encoder").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(tmp_path / "xl_merged", subfolder="text_encoder_2").eval()
    assert json.loads((folders["text_encoder_2"] / "config.json").read_text())["architectures"] == [
        "CLIPTextModelWithProjection"]
    _close(_embeds(_pipe(xl, te1, te2)), _manual(xl, lora))
    for component, path in files.items():
        kind, sd = read_tuned(path)
        assert kind == "encoder" and set(sd) == set(merged[component][1])


def test_svd_of_a_full_fine_tune_of_both_encoders_is_one_file_with_both_prefixes(xl, tmp_path):
    """Full rank reproduces each encoder's change exactly; the error is reported per encoder; the one file loads
    in diffusers as the merge."""
    g = torch.Generator().manual_seed(5)
    lora, reports = {}, {}
    for prefix, te in (("lora_te1", xl.text_encoder), ("lora_te2", xl.text_encoder_2)):
        base = encoder_state_dict(te)
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        full = min(te.config.hidden_size, te.config.intermediate_size)
        part, reports[prefix] = extract_lora(base, tuned, rank=full, prefix=prefix)
        assert reports[prefix].rel_error < 1e-6 and 0 < reports[prefix].untargeted_change < 1
        assert all(k.startswith(prefix + "_") for k in part)
        lora.update(part)
        _, low = extract_lora(base, tuned, rank=2, prefix=prefix)
        assert low.rel_error > 0.3
    path = write_kohya(lora, tmp_path / "svd.safetensors", metadata=_meta(lora), save_dtype=torch.float32)
    assert read_kohya(path)[1]["ss_network_dim"] == "Dynamic"  # te1 32, te2 64: each encoder's full rank
    pipe = _pipe(xl)
    pipe.load_lora_weights(str(path))
    _close(_embeds(pipe), _manual(xl, _read(path)), atol=1e-4)
