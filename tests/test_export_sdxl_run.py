"""`tc_lite export RUN_DIR` on SDXL run folders: every format covers every encoder slot the run trained.

The run folders are built by hand (config.yaml, the adapters' final files and a checkpoint, written by the recipe's
own `export_trained` and `save_checkpoint`) on the tiny SDXL saved as a diffusers folder, which is the run's
`model.source`: this tests export without waiting for SDXL training, and the base encoders come through the family's
loader (`RunWeights.base_model()`), as for a real run. Each output is checked in diffusers' SDXL pipeline against
the hand merge of the run's own kohya file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tc_lite.cli import main
from tc_lite.commands.export import export_run
from tc_lite.errors import UserError
from tc_lite.export import encoder_state_dict, load_encoder_weights, read_kohya, read_tuned
from tests.test_export_sdxl import _close, _embeds, _manual, _pipe, xl  # noqa: F401 (xl: fixture)

PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny-cpu.yaml"
PER_ENCODER = ["lora.per_encoder.te1.rank=4", "lora.per_encoder.te1.alpha=3", "lora.per_encoder.te2.rank=2",
               "lora.per_encoder.te2.alpha=5", "lora.per_encoder.te2.lr=5e-5", "optim.lr=1e-4"]


@pytest.fixture(scope="module")
def xl_folder(xl, tmp_path_factory) -> Path:  # noqa: F811
    from tc_lite.families import FAMILIES

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    FAMILIES["sdxl"].pipeline(xl).save_pretrained(folder)
    return folder


def _make_run(run: Path, source: Path, *overrides: str) -> Path:
    """A finished run as the recipe leaves it: config.yaml, its final file(s) and a checkpoint at step 7."""
    from tc_lite.adapters import build_adapters
    from tc_lite.checkpoint import save_checkpoint
    from tc_lite.config import load_config, save_config
    from tc_lite.export.trained import export_trained
    from tc_lite.families import load_model

    cfg = load_config(PRESET, [f"model.source={source}", f"output.dir={run}", "output.name=xl",
                               "output.save_precision=fp32", *overrides])
    family, comps = load_model(cfg.model, torch.float32)
    adapters = build_adapters(cfg, family, comps)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapters.parameters():  # a LoRA's lora_B is zero at the start: move everything, as training does
            p += (0.2 if p.numel() < 10_000 else 0.01) * torch.randn(p.shape, generator=g)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    export_trained(adapters, family, cfg, steps=7, precision="fp32", started_at=1_700_000_000.0, log=lambda _: None)
    save_checkpoint(run / "checkpoints", 7, {"adapters": adapters.state_dict()}, keep=2)
    return run


def _modules(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(k.startswith(prefix + "_") and k.endswith(".alpha") for k in tensors)


def _check_outputs(xl, exp: Path, lora: dict[str, torch.Tensor]) -> None:  # noqa: F811
    """Every exported format gives the pipeline the embeddings of the hand-merged run LoRA."""
    want = _manual(xl, lora)
    pipe = _pipe(xl)
    pipe.load_lora_weights(str(exp / "xl_diffusers"))
    _close(_embeds(pipe), want)
    kind, peft = read_tuned(exp / "xl_peft")
    assert kind == "lora" and peft.keys() == lora.keys()
    merged = []
    for base, name in ((xl.text_encoder, "xl_text_encoder"), (xl.text_encoder_2, "xl_text_encoder_2")):
        te = copy.deepcopy(base)
        load_encoder_weights(te, read_tuned(exp / f"{name}.safetensors")[1], source=name)
        merged.append(te)
    _close(_embeds(_pipe(xl, *merged)), want)


def test_sdxl_lora_run_exports_every_format_for_both_encoders(xl, xl_folder, tmp_path, capsys):  # noqa: F811
    run = _make_run(tmp_path / "run", xl_folder, *PER_ENCODER)
    trained, meta = read_kohya(run / "xl.safetensors")
    assert (_modules(trained, "lora_te1"), _modules(trained, "lora_te2")) == (12, 18)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_resolution"] == "(16, 16)"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert meta["ss_text_encoder_lr"] == "[0.0001, 5e-05]" and meta["ss_steps"] == "7"
    encoders = json.loads(meta["tc_lite_encoders"])
    assert encoders["te1"] == {"prefix": "lora_te1", "modules": 12, "rank": 4, "alpha": 3.0, "lr": 1e-4}
    assert encoders["te2"] == {"prefix": "lora_te2", "modules": 18, "rank": 2, "alpha": 5.0, "lr": 5e-5}

    for fmt in ("kohya", "peft", "diffusers", "merged"):
        assert main(["export", str(run), "--format", fmt, "--save-precision", "fp32"]) == 0, fmt
    out = capsys.readouterr().out
    assert "te1: 12 modules, rank 4, alpha 3.0; te2: 18 modules, rank 2, alpha 5.0" in out
    assert "pipe.text_encoder_2" in out and "te2 (LoRA merged" in out
    exp = run / "export"
    assert sorted(p.name for p in exp.iterdir()) == ["xl.safetensors", "xl_diffusers", "xl_peft",
                                                     "xl_text_encoder.safetensors", "xl_text_encoder_2.safetensors"]
    again, again_meta = read_kohya(exp / "xl.safetensors")
    assert again.keys() == trained.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    assert again_meta["ss_base_model_version"] == "sdxl_base_v1-0" and again_meta["ss_network_dim"] == "Dynamic"
    assert sorted(p.name for p in (exp / "xl_peft").iterdir()) == ["text_encoder", "text_encoder_2"]
    _check_outputs(xl, exp, trained)

    path = export_run(run, "kohya", checkpoint=run / "checkpoints" / "step_000007.pt", save_precision="fp32",
                      log=lambda _: None)
    from_ckpt = read_kohya(path)[0]
    assert path.name == "xl_step000007.safetensors" and from_ckpt.keys() == trained.keys()
    assert all(torch.equal(from_ckpt[k], trained[k]) for k in trained)


def test_te2_only_run_holds_only_lora_te2_and_merged_keeps_te1_as_the_base(xl, xl_folder, tmp_path,  # noqa: F811
                                                                           capsys):
    run = _make_run(tmp_path / "run", xl_folder, *PER_ENCODER, "lora.encoders=[te2]")
    trained, meta = read_kohya(run / "xl.safetensors")
    assert all(k.startswith("lora_te2_") for k in trained) and _modules(trained, "lora_te2") == 18
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_text_encoder_lr"]) == ("2", "5.0", "5e-05")
    for fmt in ("kohya", "peft", "diffusers", "merged"):
        assert main(["export", str(run), "--format", fmt, "--save-precision", "fp32"]) == 0, fmt
    assert "te1 (not trained: a copy of the base" in capsys.readouterr().out
    exp = run / "export"
    assert [p.name for p in (exp / "xl_peft").iterdir()] == ["text_encoder_2"]
    _check_outputs(xl, exp, trained)
    te1 = read_tuned(exp / "xl_text_encoder.safetensors")[1]
    base = {f"text_model.{k}" if not k.startswith("text_model.") else k: v
            for k, v in xl.text_encoder.state_dict().items() if "position_ids" not in k}
    assert all(torch.equal(te1[k], v) for k, v in base.items())


def test_full_run_of_both_encoders_exports_merged_and_an_svd_lora_per_encoder(xl, xl_folder, tmp_path,  # noqa: F811
                                                                              capsys):
    run = _make_run(tmp_path / "run", xl_folder, "lora.mode=full")
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["xl_text_encoder.safetensors",
                                                                 "xl_text_encoder_2.safetensors"]
    _, te2 = read_tuned(run / "xl_text_encoder_2.safetensors")
    assert "text_projection.weight" in te2 and all(k.startswith(("text_model.", "text_projection.")) for k in te2)
    with pytest.raises(UserError, match="--format merged.*--rank"):
        export_run(run, "kohya", log=lambda _: None)
    assert main(["export", str(run), "--format", "kohya", "--rank", "32", "--save-precision", "fp32"]) == 0
    out = capsys.readouterr().out
    errors = {slot: float(out.split(f"SVD extraction of {slot}, rank 32: relative error ")[1].split("%")[0]) / 100
              for slot in ("te1", "te2")}
    assert errors["te1"] < 1e-4 < errors["te2"]  # te1's linears are at most rank 32, te2's rank 64
    lora, meta = read_kohya(run / "export" / "xl_r32.safetensors")
    assert (_modules(lora, "lora_te1"), _modules(lora, "lora_te2")) == (12, 18)
    svd = json.loads(meta["tc_lite_svd"])
    assert svd["te2"]["rel_error"] == pytest.approx(errors["te2"], rel=1e-2) and svd["te1"]["rank"] == 32
    assert float(meta["tc_lite_svd_rel_error"]) == pytest.approx(errors["te2"], rel=1e-2)  # the worst encoder
    pipe = _pipe(xl)
    pipe.load_lora_weights(str(run / "export" / "xl_r32.safetensors"))
    _close(_embeds(pipe), _manual(xl, lora), atol=1e-4)

    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "folder")]) == 0
    from transformers import CLIPTextModelWithProjection

    te = encoder_state_dict(CLIPTextModelWithProjection.from_pretrained(tmp_path / "folder", subfolder="text_encoder_2"))
    assert te.keys() == te2.keys() and all(torch.equal(te[k], v) for k, v in te2.items())


def test_a_mixed_run_writes_a_lora_and_a_full_encoder_and_exports_both(xl, xl_folder, tmp_path):  # noqa: F811
    """`lora.per_encoder.te2.mode: full`: te1's LoRA in xl.safetensors, te2 whole in xl_text_encoder_2.safetensors."""
    run = _make_run(tmp_path / "run", xl_folder, "lora.per_encoder.te2.mode=full")
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["xl.safetensors", "xl_text_encoder_2.safetensors"]
    assert all(k.startswith("lora_te1_") for k in read_kohya(run / "xl.safetensors")[0])
    with pytest.raises(UserError, match="--rank"):
        export_run(run, "diffusers", log=lambda _: None)
    path = export_run(run, "kohya", rank=8, log=lambda _: None)
    lora = read_kohya(path)[0]
    assert (_modules(lora, "lora_te1"), _modules(lora, "lora_te2")) == (12, 18)
    first = export_run(run, "merged", log=lambda _: None)
    assert first.name == "xl_text_encoder.safetensors"
    assert (first.parent / "xl_text_encoder_2.safetensors").is_file()
    _, te2 = read_tuned(first.parent / "xl_text_encoder_2.safetensors")
    _, trained_te2 = read_tuned(run / "xl_text_encoder_2.safetensors")
    assert all(torch.equal(te2[k], v) for k, v in trained_te2.items())
