"""peft LoRA on a tiny 12-layer CLIP text encoder: names, dtypes, gradients, disable/scale, and the merge maths."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from tc_lite.errors import UserError
from tc_lite.lora import (
    ADAPTER_NAME,
    add_lora,
    enable_full_finetune,
    has_lora,
    kohya_module_name,
    kohya_state_dict,
    load_kohya_state_dict,
    lora_disabled,
    lora_layers,
    set_lora_scale,
    trainable_parameters,
)

CANONICAL = re.compile(
    r"^lora_te_text_model_encoder_layers_(\d|1[01])_"
    r"(self_attn_q_proj|self_attn_k_proj|self_attn_v_proj|self_attn_out_proj|mlp_fc1|mlp_fc2)"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
HIDDEN, FFN, RANK, ALPHA = 32, 64, 4, 3.0  # alpha != rank on purpose: catches exporters that write alpha = rank


def tiny_config(layers: int = 12) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=HIDDEN,
    )


@pytest.fixture(scope="module")
def base() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(tiny_config()).eval()


@pytest.fixture()
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 49000, (2, 77), generator=g)
    x[:, 0], x[:, 9] = 49406, 49407
    return x


def lora_te(base: CLIPTextModel, *, randomize_b: bool = True, rank: int = RANK, alpha: float = ALPHA):
    te = add_lora(copy.deepcopy(base), rank=rank, alpha=alpha, init_seed=0)
    if randomize_b:  # lora_B starts at zero; give the LoRA a real effect
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for _, layer in lora_layers(te):
                w = layer.lora_B[ADAPTER_NAME].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return te


def out(te, ids):
    with torch.no_grad():
        return te(ids).last_hidden_state


def test_216_canonical_keys_with_right_shapes(base):
    te = lora_te(base)
    sd = kohya_state_dict(te)
    assert len(sd) == 216 and len(lora_layers(te)) == 72
    assert all(CANONICAL.match(k) for k in sd), [k for k in sd if not CANONICAL.match(k)][:3]
    assert not any("lora_te_encoder_layers" in k for k in sd)  # the transformers>=5.6 trap
    fc1 = "lora_te_text_model_encoder_layers_5_mlp_fc1"
    assert sd[f"{fc1}.lora_down.weight"].shape == (RANK, HIDDEN)  # [r, in]
    assert sd[f"{fc1}.lora_up.weight"].shape == (FFN, RANK)  # [out, r]
    fc2 = "lora_te_text_model_encoder_layers_5_mlp_fc2"
    assert sd[f"{fc2}.lora_down.weight"].shape == (RANK, FFN)
    assert sd[f"{fc2}.lora_up.weight"].shape == (HIDDEN, RANK)
    alphas = {v.item() for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas == {ALPHA}  # the real alpha, not the rank
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())


def test_still_a_clip_text_model_and_lora_starts_as_identity(base, ids):
    te = add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA)
    assert isinstance(te, CLIPTextModel) and has_lora(te)
    assert torch.equal(out(te, ids), out(base, ids))  # lora_B = 0 at init


def test_gradients_reach_only_lora(base, ids):
    te = lora_te(base)
    te.train()
    te(ids).last_hidden_state.pow(2).mean().backward()
    lora, frozen = [], []
    for name, p in te.named_parameters():
        (lora if ".lora_" in name else frozen).append((name, p))
    assert len(lora) == 144
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)
    assert all(not p.requires_grad and p.grad is None for _, p in frozen)
    assert {id(p) for p in trainable_parameters(te)} == {id(p) for _, p in lora}


@pytest.mark.parametrize(
    "base_dtype, autocast_dtype",
    [
        (torch.float16, None),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.float32, None),
    ],
)
def test_half_base_stays_half_and_lora_stays_fp32(base, ids, base_dtype, autocast_dtype):
    # NB: an fp16 base under bf16 autocast fails inside stock transformers (fp16 residual + bf16 -> fp32 into an
    # fp16 LayerNorm), with or without a LoRA; the autocast dtype must match the base's half dtype.
    te = add_lora(copy.deepcopy(base).to(base_dtype), rank=RANK, alpha=ALPHA, init_seed=0)
    for name, p in te.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in name else base_dtype), name
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = te(ids).last_hidden_state
    assert torch.isfinite(y).all()
    y.float().pow(2).mean().backward()
    grads = [p.grad for p in trainable_parameters(te)]
    assert len(grads) == 144 and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_lora_disabled_gives_exact_base_output_and_restores_state(base, ids):
    te = lora_te(base)
    tuned = out(te, ids)
    assert (tuned - out(base, ids)).abs().max() > 1e-2  # the LoRA really changes the output
    flags = [p.requires_grad for p in te.parameters()]
    with lora_disabled(te):
        assert torch.equal(out(te, ids), out(base, ids))
    assert torch.equal(out(te, ids), tuned)
    assert [p.requires_grad for p in te.parameters()] == flags  # peft's toggle would otherwise rewrite these

    te.requires_grad_(False)  # e.g. frozen for sampling: must stay frozen after the context
    with lora_disabled(te):
        pass
    assert trainable_parameters(te) == []


def test_lora_disabled_touches_only_tc_lites_own_adapter(base, ids):
    """Another program's LoRA on the same encoder (diffusers names its adapters default_N) stays active inside
    `lora_disabled`, and neither its requires_grad flags nor the module's mode change."""
    other = add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, init_seed=3, adapter="default_0")
    with torch.no_grad():
        for _, layer in lora_layers(other, "default_0"):
            layer.lora_B["default_0"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(4))
    with_other = out(other, ids)
    assert (with_other - out(base, ids)).abs().max() > 1e-2  # the foreign LoRA does change the output
    flags = [p.requires_grad for p in other.parameters()]
    other.train()
    with lora_disabled(other):
        assert torch.equal(out(other, ids), with_other)
        assert other.training
    assert [p.requires_grad for p in other.parameters()] == flags


def merged_copy(base, sd: dict[str, torch.Tensor], scale: float = 1.0) -> CLIPTextModel:
    """What A1111/ComfyUI do: W + scale * (alpha / r) * up @ down, on a plain encoder."""
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    for key, down in sd.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)$", stem)
        assert m
        up, alpha = sd[f"{stem}.lora_up.weight"], sd[f"{stem}.alpha"].item()
        lin = modules[f"encoder.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"]
        with torch.no_grad():
            lin.weight += scale * (alpha / down.shape[0]) * (up @ down)
    return merged


def test_lora_output_equals_manual_merge(base, ids):
    te = lora_te(base)
    sd = kohya_state_dict(te)
    err = (out(te, ids) - out(merged_copy(base, sd), ids)).abs().max().item()
    assert err < 1e-5, err


def test_set_lora_scale_is_the_multiplier(base, ids):
    te = lora_te(base)
    sd = kohya_state_dict(te)
    set_lora_scale(te, 0.5)
    assert (out(te, ids) - out(merged_copy(base, sd, scale=0.5), ids)).abs().max() < 1e-5
    assert kohya_state_dict(te)[next(k for k in sd if k.endswith(".alpha"))].item() == ALPHA  # export unaffected
    set_lora_scale(te, 0.0)
    assert torch.allclose(out(te, ids), out(base, ids), atol=1e-6)
    set_lora_scale(te, 1.0)
    assert (out(te, ids) - out(merged_copy(base, sd), ids)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "name",
    [
        "text_model.encoder.layers.3.mlp.fc1",  # transformers < 5.6
        "encoder.layers.3.mlp.fc1",  # transformers >= 5.6
        "base_model.model.encoder.layers.3.mlp.fc1",  # get_peft_model wrapper
        "encoder.layers.3.mlp.fc1.lora_A.default.weight",  # a parameter name
    ],
)
def test_name_mapping_is_independent_of_the_module_tree(name):
    assert kohya_module_name(name) == "lora_te_text_model_encoder_layers_3_mlp_fc1"


def test_name_mapping_rejects_non_targets():
    q = "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    assert kohya_module_name("encoder.layers.3.self_attn.q_proj") == q
    assert kohya_module_name("encoder.layers.3.mlp.q_proj") is None  # wrong block
    assert kohya_module_name("encoder.layers.3.layer_norm1") is None
    assert kohya_module_name("embeddings.token_embedding") is None
    assert kohya_module_name("encoder.layers.10.self_attn.out_proj", prefix="lora_te2") == (
        "lora_te2_text_model_encoder_layers_10_self_attn_out_proj"
    )


def test_kohya_roundtrip_into_fresh_and_existing_lora(base, ids):
    te = lora_te(base)
    sd = kohya_state_dict(te)
    fresh = load_kohya_state_dict(copy.deepcopy(base), sd)
    assert len(lora_layers(fresh)) == 72
    assert torch.equal(out(fresh, ids), out(te, ids))
    assert len(trainable_parameters(fresh)) == 144  # ready to resume training

    existing = add_lora(copy.deepcopy(base), rank=RANK, alpha=1.0, init_seed=5)
    load_kohya_state_dict(existing, sd)  # alpha comes from the file
    assert torch.equal(out(existing, ids), out(te, ids))
    assert all(layer.lora_alpha[ADAPTER_NAME] == ALPHA for _, layer in lora_layers(existing))


def test_load_partial_file_and_missing_alpha(base, ids):
    te = lora_te(base)
    sd = kohya_state_dict(te)
    part = {k: v for k, v in sd.items() if "_layers_0_" in k and "alpha" not in k}  # 6 modules, no alpha keys
    loaded = load_kohya_state_dict(copy.deepcopy(base), part)
    assert len(lora_layers(loaded)) == 6
    assert all(layer.scaling[ADAPTER_NAME] == 1.0 for _, layer in lora_layers(loaded))  # alpha = rank


def test_load_accepts_non_canonical_names_written_by_new_transformers(base, ids):
    te = lora_te(base)
    sd = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in kohya_state_dict(te).items()}
    assert torch.equal(out(load_kohya_state_dict(copy.deepcopy(base), sd), ids), out(te, ids))


def test_load_errors_are_user_errors(base):
    sd = kohya_state_dict(lora_te(base))
    with pytest.raises(UserError, match=r"my\.safetensors.*lora_unet_down"):
        load_kohya_state_dict(
            copy.deepcopy(base), {**sd, "lora_unet_down_blocks_0.alpha": torch.tensor(1.0)}, source="my.safetensors"
        )
    with pytest.raises(UserError, match="rank"):
        load_kohya_state_dict(add_lora(copy.deepcopy(base), rank=RANK * 2, alpha=1.0), sd)
    bad_rank = dict(sd)
    bad_rank["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, HIDDEN)
    bad_rank["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(FFN, 2)
    with pytest.raises(UserError, match="different ranks"):
        load_kohya_state_dict(copy.deepcopy(base), bad_rank)
    deep = {"lora_te_text_model_encoder_layers_20_mlp_fc1.lora_down.weight": torch.zeros(RANK, HIDDEN),
            "lora_te_text_model_encoder_layers_20_mlp_fc1.lora_up.weight": torch.zeros(FFN, RANK)}
    with pytest.raises(UserError, match="different base model"):
        load_kohya_state_dict(copy.deepcopy(base), deep)
    with pytest.raises(UserError, match="lora_down/lora_up missing"):
        load_kohya_state_dict(copy.deepcopy(base), {k: v for k, v in sd.items() if "lora_up" not in k})
    with pytest.raises(UserError, match="no LoRA weights"):
        load_kohya_state_dict(copy.deepcopy(base), {})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0, "alpha": 1.0}, "rank"),
        ({"rank": 4, "alpha": 0}, "alpha"),
        ({"rank": 4, "alpha": 4, "dropout": 1.0}, "dropout"),
        ({"rank": 4, "alpha": 4, "targets": ["to_q"]}, "targets"),
        ({"rank": 4, "alpha": 4, "targets": []}, "targets"),
    ],
)
def test_add_lora_rejects_bad_settings(base, kwargs, match):
    with pytest.raises(UserError, match=match):
        add_lora(copy.deepcopy(base), **kwargs)


def test_target_subset_and_double_add(base):
    te = add_lora(copy.deepcopy(base), rank=2, alpha=2, targets=["q_proj", "v_proj"])
    assert len(kohya_state_dict(te)) == 12 * 2 * 3
    with pytest.raises(ValueError, match="already"):
        add_lora(te, rank=2, alpha=2)


def test_init_seed_is_reproducible_and_leaves_global_rng_alone(base):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = kohya_state_dict(add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, init_seed=7))
    assert torch.equal(torch.get_rng_state(), before)
    b = kohya_state_dict(add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, init_seed=7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = kohya_state_dict(add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, init_seed=8))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_enable_full_finetune(base):
    te = enable_full_finetune(copy.deepcopy(base).half())
    params = list(te.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert len(trainable_parameters(te)) == len(params)
    with pytest.raises(ValueError):
        enable_full_finetune(add_lora(copy.deepcopy(base), rank=2, alpha=2))
