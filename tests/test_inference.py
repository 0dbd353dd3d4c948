"""Generation with tuned encoders: w=0 is the base model bit for bit, embeddings are linear in w, the tuned-steps
schedule, LoRA mixing, and that a LoRA file gives what the trainer's own encoder gives."""

from __future__ import annotations

import copy

import pytest
import torch

from tc_lite.errors import UserError
from tc_lite.export import export_kohya, kohya_metadata
from tc_lite.inference import encode_prompts, generate, sample_images
from tc_lite.lora import ADAPTER_NAME, add_lora, lora_layers

PROMPTS = ["a red square", "a blue circle"]
SEEDS = [0, 1]
FAST = {"steps": 4, "guidance": 4.0}


def _lora(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    te = add_lora(copy.deepcopy(base), rank=4, alpha=4.0, init_seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(te):
            w = layer.lora_B[ADAPTER_NAME].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return te.eval()


@pytest.fixture(scope="module")
def setup(tiny_components, tmp_path_factory):
    comps = copy.copy(tiny_components)  # shallow: generate() never modifies the modules
    folder = tmp_path_factory.mktemp("loras")
    tuned, files = [], []
    for i, seed in enumerate((1, 2)):
        te = _lora(comps.text_encoder, seed)
        meta = kohya_metadata(output_name=f"l{i}", rank=4, alpha=4.0, lr=1e-3, seed=seed, steps=1,
                              mixed_precision="fp32", optimizer="adamw")
        files.append(export_kohya(te, folder / f"l{i}.safetensors", metadata=meta, save_dtype=torch.float32))
        tuned.append(te)
    return comps, tuned, files


def test_weight_zero_is_the_base_model_exactly(setup):
    comps, _, files = setup
    base = generate(comps, PROMPTS, SEEDS, **FAST)
    assert base.shape == (4, 3, 16, 16) and 0 <= base.min() and base.max() <= 1
    assert torch.equal(generate(comps, PROMPTS, SEEDS, loras=[(files[0], 0.0)], **FAST), base)
    emb = encode_prompts(comps, PROMPTS, files)
    assert torch.equal(sample_images(comps, emb, SEEDS, [0.0, 0.0], **FAST), base)
    tuned = sample_images(comps, emb, SEEDS, [1.0, 0.0], **FAST)
    assert (tuned - base).abs().max() > 0.02  # and the LoRA does change the images


def test_embeddings_are_linear_in_w_and_mix_several_loras(setup):
    comps, _, files = setup
    emb = encode_prompts(comps, PROMPTS, files)
    d0, d1 = emb.tuned[0].hidden - emb.orig.hidden, emb.tuned[1].hidden - emb.orig.hidden
    assert d0.abs().max() > 0.05 and d1.abs().max() > 0.05
    for w in (0.5, 1.0, 1.7, -0.3):
        assert torch.allclose(emb.mix([w, 0.0]).hidden - emb.orig.hidden, w * d0, atol=1e-6)
    half = emb.mix([0.5, 0.0]).hidden
    assert torch.allclose(half, 0.5 * (emb.mix([0.0, 0.0]).hidden + emb.mix([1.0, 0.0]).hidden), atol=1e-6)
    assert torch.allclose(emb.mix([0.6, 0.4]).hidden, emb.orig.hidden + 0.6 * d0 + 0.4 * d1, atol=1e-6)
    with pytest.raises(UserError, match="one per LoRA"):
        emb.mix([1.0])


def test_lora_file_gives_the_trainers_encoder(setup):
    """The tuned embedding read from the kohya file equals the trainer's encoder (with its LoRA) on the same
    prompts, and so do images generated from the file and from the live module."""
    comps, tuned, files = setup
    from_file = encode_prompts(comps, PROMPTS, [files[0]])
    from_module = encode_prompts(comps, PROMPTS, [tuned[0]])
    assert torch.allclose(from_file.tuned[0].hidden, from_module.tuned[0].hidden, atol=1e-6)
    ids = comps.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(from_file.tuned[0].hidden[:2], tuned[0](ids)[0], atol=1e-6)
    a = generate(comps, PROMPTS[:1], [0], loras=[(files[0], 1.0)], **FAST)
    b = generate(comps, PROMPTS[:1], [0], loras=[(tuned[0], 1.0)], **FAST)
    assert (a - b).abs().max() < 1e-5


def test_tuned_steps_schedule(setup):
    comps, _, files = setup
    emb = encode_prompts(comps, PROMPTS[:1], files[:1])
    run = lambda n: sample_images(comps, emb, [0], [1.0], tuned_steps=n, **FAST)
    base = sample_images(comps, emb, [0], [0.0], **FAST)
    assert torch.equal(run(0), base)  # the tuned embedding on no step: the base model
    full = run(None)
    assert torch.equal(run(FAST["steps"]), full)
    late = run(2)
    assert (late - base).abs().max() > 1e-4 and (late - full).abs().max() > 1e-4
    with pytest.raises(UserError, match="tuned_steps"):
        run(5)


def test_trainer_components_with_a_lora_still_give_the_base(setup):
    """A trainer's encoder carries its LoRA in place; generate() uses it disabled as the original."""
    comps, tuned, files = setup
    wrapped = copy.copy(comps)
    wrapped.text_encoder = tuned[0]
    base = generate(comps, PROMPTS[:1], [3], **FAST)
    assert torch.equal(generate(wrapped, PROMPTS[:1], [3], **FAST), base)
    # and with its own LoRA as the tuned encoder, w=1 matches loading that LoRA on the plain model
    own = generate(wrapped, PROMPTS[:1], [3], loras=[(tuned[0], 1.0)], **FAST)
    plain = generate(comps, PROMPTS[:1], [3], loras=[(tuned[0], 1.0)], **FAST)
    assert torch.equal(own, plain)
    # a file loads onto the base weights, not on top of the encoder's own LoRA
    other = generate(wrapped, PROMPTS[:1], [3], loras=[(files[1], 1.0)], **FAST)
    assert (other - generate(comps, PROMPTS[:1], [3], loras=[(files[1], 1.0)], **FAST)).abs().max() < 1e-6


def test_bad_inputs_are_user_errors(setup, tmp_path):
    comps = setup[0]
    with pytest.raises(UserError, match="does not exist"):
        generate(comps, PROMPTS, SEEDS, loras=[(tmp_path / "nope.safetensors", 1.0)], **FAST)
    with pytest.raises(UserError, match="multiple of 2"):
        generate(comps, PROMPTS, SEEDS, height=15, **FAST)
    with pytest.raises(UserError, match="scheduler"):
        generate(comps, PROMPTS, SEEDS, scheduler="plms", **FAST)
    with pytest.raises(UserError, match="prompt"):
        generate(comps, [], SEEDS, **FAST)
