"""kohya LoRA export: file contents, metadata, and that diffusers / ComfyUI / A1111 naming actually match it."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from tc_lite.errors import UserError
from tc_lite.export import export_kohya, kohya_metadata, read_kohya
from tc_lite.lora import ADAPTER_NAME, add_lora, load_kohya_state_dict, lora_layers

HIDDEN, RANK, ALPHA = 32, 4, 3.0


@pytest.fixture(scope="module")
def base() -> CLIPTextModel:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=12,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=HIDDEN,
    )
    return CLIPTextModel(cfg).eval()


@pytest.fixture(scope="module")
def trained(base) -> CLIPTextModel:
    """A LoRA-wrapped copy with nonzero lora_B (as after training)."""
    te = add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, init_seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(te):
            w = layer.lora_B[ADAPTER_NAME].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return te.eval()


@pytest.fixture()
def ids() -> torch.Tensor:
    x = torch.randint(1, 49000, (2, 77), generator=torch.Generator().manual_seed(1))
    x[:, 0], x[:, 7] = 49406, 49407
    return x


def meta(**over) -> dict[str, str]:
    kw: dict = {
        "output_name": "my_lora",
        "rank": RANK,
        "alpha": ALPHA,
        "lr": 1e-4,
        "seed": 42,
        "steps": 500,
        "mixed_precision": "fp16",
        "optimizer": "torch.optim.AdamW",
        "timestamp": 1_700_000_000,
    }
    kw.update(over)
    return kohya_metadata(**kw)


def test_metadata_keys_and_all_strings():
    m = meta(base_model="runwayml/stable-diffusion-v1-5", dropout=0.1, extra={"rewards": {"aesthetic": 1.0}, "ss_x": 1})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
    assert m["ss_network_module"] == "networks.lora"
    assert m["ss_network_dim"] == "4" and m["ss_network_alpha"] == "3.0"
    assert m["ss_base_model_version"] == "sd_v1" and m["ss_v2"] == "False"
    assert m["ss_output_name"] == "my_lora" and m["modelspec.title"] == "my_lora"
    assert m["ss_text_encoder_lr"] == "0.0001" and m["ss_seed"] == "42" and m["ss_steps"] == "500"
    assert m["ss_mixed_precision"] == "fp16" and m["ss_optimizer"] == "torch.optim.AdamW"
    assert m["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5" and m["ss_network_dropout"] == "0.1"
    assert m["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert m["modelspec.sai_model_spec"] == "1.0.1" and m["modelspec.implementation"] == "diffusers"
    assert m["modelspec.resolution"] == "512x512" and m["modelspec.prediction_type"] == "epsilon"
    assert m["modelspec.date"] == "2023-11-14T22:13:20+00:00"
    assert json.loads(m["tc_lite_rewards"]) == {"aesthetic": 1.0}  # unprefixed extra gets tc_lite_
    assert m["ss_x"] == "1"  # known prefixes are kept
    with pytest.raises(UserError, match="base_model_version"):
        meta(base_model_version="sd_v3")


def test_export_file_contents(tmp_path, trained):
    path = export_kohya(trained, tmp_path / "out" / "my_lora.safetensors", metadata=meta())
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["my_lora.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert len(keys) == 216
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_dim"] == "4" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    for k, v in tensors.items():
        if k.endswith(".alpha"):
            assert v.dtype == torch.float32 and v.ndim == 0 and v.item() == ALPHA
        else:
            assert v.dtype == torch.float16
    # A1111 uses sshs_model_hash instead of hashing the file: it must equal the hash of the file's data section.
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{8}", md["sshs_legacy_hash"])


def _tiny_pipeline(text_encoder, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    # A throwaway tokenizer: the pipeline needs one, load_lora_weights never uses it.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=2,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("save_dtype", [torch.float32, torch.float16])
def test_loads_in_diffusers_and_matches_our_encoder(tmp_path, base, trained, ids, save_dtype):
    """diffusers must read the file exactly as we do: compared with our encoder holding the file's own (possibly
    fp16-rounded) weights, outputs agree to 1e-5. Against the unrounded trained encoder, an fp16 file differs by
    ~3e-3 here (a deliberately large LoRA across 12 layers), so that check uses 1e-2; fp32 files stay at 1e-5."""
    path = export_kohya(trained, tmp_path / "l.safetensors", metadata=meta(), save_dtype=save_dtype)
    pipe = _tiny_pipeline(copy.deepcopy(base), tmp_path)
    pipe.load_lora_weights(str(path))
    assert sum(".lora_A." in n for n, _ in pipe.text_encoder.named_parameters()) == 72  # all modules matched
    tensors, _ = read_kohya(path)
    same_weights = load_kohya_state_dict(copy.deepcopy(base), tensors)
    with torch.no_grad():
        ours = trained(ids).last_hidden_state
        theirs = pipe.text_encoder(ids).last_hidden_state
        from_file = same_weights(ids).last_hidden_state
        plain = base(ids).last_hidden_state
    assert (ours - plain).abs().max() > 0.05  # the LoRA has a visible effect
    assert (from_file - theirs).abs().max().item() < 1e-5
    assert (ours - theirs).abs().max().item() < (1e-5 if save_dtype == torch.float32 else 1e-2)


def _comfy_clip_key_map(state_dict_keys) -> dict[str, str]:
    """ComfyUI's rule, restated: for its own CLIP state dict (`clip_l.transformer.text_model.encoder.layers.N.
    <block>.<proj>.weight`), it accepts the LoRA module `lora_te_text_model_encoder_layers_N_<block>_<proj>`."""
    out = {}
    for k in state_dict_keys:
        m = re.fullmatch(r"clip_l\.transformer\.text_model\.encoder\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight", k)
        if m and m.group(3) in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
            out[f"lora_te_text_model_encoder_layers_{m.group(1)}_{m.group(2)}_{m.group(3)}"] = k
    return out


def test_names_match_comfyui_and_a1111(tmp_path, base, trained):
    tensors, _ = read_kohya(export_kohya(trained, tmp_path / "l.safetensors", metadata=meta()))
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    assert len(modules) == 72

    # Both UIs hold the SD1 encoder under its original tree, which has `text_model.` whatever transformers does.
    def with_text_model(name: str) -> str:
        return name if name.startswith("text_model.") else f"text_model.{name}"

    linears = {with_text_model(n): m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}

    comfy = _comfy_clip_key_map(f"clip_l.transformer.{with_text_model(k)}" for k in base.state_dict())
    # A1111: `lora_te_text_model_encoder_layers_(\d+)_(.+)` -> `transformer_text_model_encoder_layers_N_rest`,
    # looked up among the checkpoint's module names with dots turned into underscores.
    a1111 = {"transformer_" + n.replace(".", "_") for n in linears}

    for module in modules:
        assert module in comfy, module
        m = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", module)
        assert m and f"transformer_text_model_encoder_layers_{m.group(1)}_{m.group(2)}" in a1111, module
        lm = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)", module)
        target = linears[f"text_model.encoder.layers.{lm.group(1)}.{lm.group(2)}.{lm.group(3)}"]
        delta = tensors[f"{module}.lora_up.weight"].float() @ tensors[f"{module}.lora_down.weight"].float()
        assert delta.shape == target.weight.shape


def test_read_back_and_resume(tmp_path, base, trained, ids):
    path = export_kohya(trained, tmp_path / "l.safetensors", metadata=meta(), save_dtype=torch.float32)
    tensors, md = read_kohya(path)
    assert md["ss_output_name"] == "my_lora"
    resumed = load_kohya_state_dict(copy.deepcopy(base), tensors, source="l.safetensors")
    with torch.no_grad():
        assert torch.equal(resumed(ids).last_hidden_state, trained(ids).last_hidden_state)


def test_refuses_nan_and_fp16_overflow_without_touching_the_old_file(tmp_path, trained):
    dest = tmp_path / "l.safetensors"
    dest.write_bytes(b"previous good export")
    bad = copy.deepcopy(trained)
    layer = lora_layers(bad)[5][1]
    with torch.no_grad():
        layer.lora_B[ADAPTER_NAME].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        export_kohya(bad, dest, metadata=meta())
    with torch.no_grad():
        layer.lora_B[ADAPTER_NAME].weight[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(UserError, match="float32"):
        export_kohya(bad, dest, metadata=meta())
    assert dest.read_bytes() == b"previous good export"
    assert [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]
    export_kohya(bad, dest, metadata=meta(), save_dtype=torch.float32)  # the fix the message suggests works


def test_export_errors(tmp_path, base, trained):
    with pytest.raises(UserError, match=r"\.safetensors"):
        export_kohya(trained, tmp_path / "l.pt", metadata=meta())
    with pytest.raises(UserError, match="no LoRA"):
        export_kohya(base, tmp_path / "l.safetensors", metadata=meta())
    with pytest.raises(ValueError, match="ss_network_alpha"):  # the alpha = rank trap, caught at the source
        export_kohya(trained, tmp_path / "l.safetensors", metadata=meta(alpha=RANK))
    with pytest.raises(ValueError, match="ss_network_dim"):
        export_kohya(trained, tmp_path / "l.safetensors", metadata=meta(rank=8))
    assert list(tmp_path.iterdir()) == []


def test_read_kohya_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_kohya(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match="junk.safetensors"):
        read_kohya(junk)
