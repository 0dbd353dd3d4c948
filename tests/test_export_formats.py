"""Export formats, each checked by the library that will load it: diffusers, peft, transformers; plus SVD extraction.

Tolerances: files saved in fp32 must reproduce our encoder to 1e-5 (float reassociation only); the kohya file is
fp16 by default, and compared with its own (rounded) weights it must still agree to 1e-5 across loaders.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from tc_lite.errors import UserError
from tc_lite.export import (
    encoder_state_dict,
    export_diffusers,
    export_encoder,
    export_kohya,
    export_peft,
    extract_lora,
    kohya_metadata,
    load_encoder_weights,
    merge_lora,
    read_kohya,
    read_tuned,
    update_retention,
)
from tc_lite.lora import (
    ADAPTER_NAME,
    add_lora,
    kohya_state_dict,
    load_kohya_state_dict,
    lora_layers,
)

RANK, ALPHA = 4, 3.0  # alpha != rank, so a loader that assumes alpha = rank is caught


def _randomise_lora(te: torch.nn.Module, seed: int = 3, scale: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(te):
            w = layer.lora_B[ADAPTER_NAME].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)
    return te.eval()


@pytest.fixture(scope="module")
def base12() -> CLIPTextModel:
    """SD1's encoder shape (12 layers: 72 LoRA modules) at a tiny width."""
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
    return CLIPTextModel(cfg).eval()


@pytest.fixture(scope="module")
def trained12(base12) -> CLIPTextModel:
    return _randomise_lora(add_lora(copy.deepcopy(base12), rank=RANK, alpha=ALPHA, init_seed=0))


@pytest.fixture()
def ids() -> torch.Tensor:
    x = torch.randint(1, 49000, (2, 77), generator=torch.Generator().manual_seed(1))
    x[:, 0], x[:, 7] = 49406, 49407
    return x


def _meta() -> dict[str, str]:
    return kohya_metadata(output_name="style", rank=RANK, alpha=ALPHA, lr=1e-4, seed=0, steps=10,
                          mixed_precision="fp32", optimizer="adamw", timestamp=1_700_000_000)


def _out(te: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return te(ids).last_hidden_state


# ---------------------------------------------------------------------------------------------- the pipeline


def test_kohya_in_diffusers_pipeline_matches_trainer_and_manual_merge(tmp_path, tiny_components):
    """The fp16 kohya file, loaded by StableDiffusionPipeline.load_lora_weights into the base pipeline, gives the
    prompt embeddings of (a) our encoder holding the file's weights (1e-5), (b) a manual merge
    W + (alpha/r)·up@down of the file written as a merged encoder and loaded by transformers (1e-5), and (c) the
    trainer's unrounded fp32 encoder within fp16 rounding (2e-3)."""
    from diffusers import StableDiffusionPipeline

    comps = tiny_components
    trained = _randomise_lora(add_lora(copy.deepcopy(comps.text_encoder), rank=RANK, alpha=ALPHA, init_seed=0))
    path = export_kohya(trained, tmp_path / "style.safetensors", metadata=_meta())  # fp16, the default
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=copy.deepcopy(comps.text_encoder),
                                   tokenizer=comps.tokenizer, unet=comps.unet, scheduler=comps.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base_emb = pipe.encode_prompt("a red square", "cpu", 1, False)[0]
    pipe.load_lora_weights(str(path))
    diffusers_emb = pipe.encode_prompt("a red square", "cpu", 1, False)[0]

    ids = comps.tokenizer(["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    tensors, _ = read_kohya(path)
    ours = _out(load_kohya_state_dict(copy.deepcopy(comps.text_encoder), tensors), ids)
    merged_dir = export_encoder(merge_lora(encoder_state_dict(comps.text_encoder), tensors), tmp_path / "merged",
                                save_dtype=torch.float32, config=comps.text_encoder.config)
    manual = _out(CLIPTextModel.from_pretrained(merged_dir).eval(), ids)

    assert (diffusers_emb - base_emb).abs().max() > 0.05  # the LoRA visibly changes the embedding
    assert (diffusers_emb - ours).abs().max().item() < 1e-5
    assert (diffusers_emb - manual).abs().max().item() < 1e-5
    assert (diffusers_emb - _out(trained, ids)).abs().max().item() < 2e-3


# ---------------------------------------------------------------------------------------------- peft / diffusers


def test_peft_and_diffusers_exports_load_with_their_libraries_and_agree(tmp_path, base12, trained12, ids):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import PeftModel

    lora = kohya_state_dict(trained12)
    want = _out(trained12, ids)

    peft_dir = export_peft(lora, tmp_path / "peft", save_dtype=torch.float32)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (RANK, ALPHA, "LORA")
    with safe_open(str(peft_dir / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 144  # lora_A + lora_B for 72 modules
    by_peft = PeftModel.from_pretrained(copy.deepcopy(base12), str(peft_dir)).eval()
    by_transformers = copy.deepcopy(base12)
    by_transformers.load_adapter(str(peft_dir))

    diff_file = export_diffusers(lora, tmp_path / "diffusers", save_dtype=torch.float32)
    assert diff_file.name == "pytorch_lora_weights.safetensors"
    state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(diff_file.parent), return_lora_metadata=True)
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in state_dict) and len(state_dict) == 144
    by_diffusers = copy.deepcopy(base12)
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state_dict, alphas, by_diffusers, metadata=metadata)
    # old diffusers ignore the metadata and assume alpha = rank: alpha/r is folded into lora_B, so they agree too
    no_meta = copy.deepcopy(base12)
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state_dict, None, no_meta)

    assert (want - _out(base12, ids)).abs().max() > 0.05
    for te in (by_peft, by_transformers, by_diffusers, no_meta):
        assert (_out(te, ids) - want).abs().max().item() < 1e-5


def test_every_export_reads_back_to_the_same_lora(tmp_path, trained12):
    """`sample --lora` and `export` accept any of our outputs: each reads back to the same weight change."""
    lora = kohya_state_dict(trained12)
    base = {k: torch.zeros_like(v) for k, v in encoder_state_dict(trained12).items()}
    want = merge_lora(base, lora)
    sources = {
        "kohya": export_kohya(trained12, tmp_path / "k.safetensors", metadata=_meta(), save_dtype=torch.float32),
        "peft": export_peft(lora, tmp_path / "p", save_dtype=torch.float32),
        "diffusers": export_diffusers(lora, tmp_path / "d", save_dtype=torch.float32).parent,
    }
    for name, src in sources.items():
        kind, sd = read_tuned(src)
        assert kind == "lora", name
        got = merge_lora(base, sd)
        assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6, name
    merged = export_encoder(encoder_state_dict(trained12), tmp_path / "m.safetensors", save_dtype=torch.float32)
    kind, sd = read_tuned(merged)
    assert kind == "encoder" and all(k.startswith("text_model.") for k in sd)


# ---------------------------------------------------------------------------------------------- merged encoder


def test_merged_encoder_has_canonical_names_and_loads(tmp_path, base12, trained12, ids):
    sd = encoder_state_dict(trained12)
    assert all(k.startswith("text_model.") for k in sd) and not any("lora" in k or "base_layer" in k for k in sd)
    path = export_encoder(sd, tmp_path / "te.safetensors", save_dtype=torch.float32, config=base12.config)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert "text_model.encoder.layers.11.mlp.fc2.weight" in set(f.keys())
    plain = copy.deepcopy(base12)
    _, tensors = read_tuned(path)
    load_encoder_weights(plain, tensors, source="te.safetensors")
    assert (_out(plain, ids) - _out(trained12, ids)).abs().max().item() < 1e-5

    folder = export_encoder(sd, tmp_path / "te_folder", save_dtype=torch.float32, config=base12.config)
    assert (_out(CLIPTextModel.from_pretrained(folder).eval(), ids) - _out(trained12, ids)).abs().max() < 1e-5

    other = CLIPTextModel(CLIPTextConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=12,
                                         num_attention_heads=4))
    with pytest.raises(UserError, match=r"te\.safetensors.*different|te\.safetensors.*base model"):
        load_encoder_weights(other, tensors, source="te.safetensors")


def test_half_precision_can_erase_a_small_update():
    """Why merged defaults to fp32: an update of 1e-6 relative (the paper's lr) is below fp16's resolution."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g).half().float()}  # weights loaded from an fp16 checkpoint
    tuned = {"w": base["w"] * (1 + 1e-6 * torch.randn(64, 64, generator=g))}
    assert update_retention(tuned, base, torch.float32) == 0.0
    assert update_retention(tuned, base, torch.float16) > 0.9


# ---------------------------------------------------------------------------------------------- SVD extraction


def _full_finetune(base: CLIPTextModel, seed: int = 5) -> dict[str, torch.Tensor]:
    """A dense change of every weight, as full fine-tuning makes (biases and LayerNorms included)."""
    g = torch.Generator().manual_seed(seed)
    sd = encoder_state_dict(base)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def test_svd_extraction_full_rank_exact_lower_rank_reports_error(base12, ids):
    base, tuned = encoder_state_dict(base12), _full_finetune(base12)
    lora, report = extract_lora(base, tuned, rank=32)  # full rank of 32x32 / 64x32 linears
    assert report.rel_error < 1e-6
    assert len(lora) == 216 and all(float(v) == 32 for k, v in lora.items() if k.endswith(".alpha"))
    rebuilt = merge_lora(base, lora)
    key = "text_model.encoder.layers.3.mlp.fc1.weight"
    assert (rebuilt[key] - tuned[key]).abs().max().item() < 1e-5
    assert 0 < report.untargeted_change < 1  # biases/LayerNorms/embeddings changed too and are reported

    low, low_report = extract_lora(base, tuned, rank=4)
    # Eckart-Young: the error of the best rank-4 approximation is the norm of the dropped singular values
    d = tuned[key] - base[key]
    s = torch.linalg.svdvals(d.double())
    got = merge_lora(base, low)[key] - tuned[key]
    assert got.norm().item() == pytest.approx(s[4:].norm().item(), rel=1e-4)
    assert 0.3 < low_report.rel_error < 1 and low_report.worst_error >= low_report.rel_error
    assert "rank 4" in str(low_report) and "%" in str(low_report)
    loaded = load_kohya_state_dict(copy.deepcopy(base12), low)  # a valid LoRA the trainer can load
    assert (_out(loaded, ids) - _out(base12, ids)).abs().max() > 0

    with pytest.raises(UserError, match="--rank"):
        extract_lora(base, tuned, rank=33)
