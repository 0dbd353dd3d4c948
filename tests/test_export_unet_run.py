"""`tc_lite export RUN_DIR` on runs with a UNet LoRA (`unet.mode: lora`): every format holds the UNet part, and
each one, loaded the way its users load it (diffusers' `load_lora_weights`, peft's `PeftModel`, diffusers'
`UNet2DConditionModel.from_pretrained`), gives the UNet that diffusers makes of the run's kohya file.

Run folders are built by hand as the recipe leaves them (tests/test_export_sdxl_run.py `_make_run`: config.yaml, the
`export_trained` file and a checkpoint), on the pretrained tiny SD1 (`model.source: tiny`) and on the tiny SDXL saved
as a diffusers folder. Every export is fp32, so the UNet outputs agree to float reassociation (1e-5).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tc_lite.cli import main
from tc_lite.commands.export import export_run
from tc_lite.errors import UserError
from tc_lite.export import read_kohya, read_tuned
from tc_lite.unet_lora import load_unet_lora, split_unet_lora
from tests.test_export_sdxl import xl  # noqa: F401 (fixture)
from tests.test_export_sdxl_run import _make_run, xl_folder  # noqa: F401 (xl_folder: fixture)
from tests.test_export_unet import unet_out

UNET = ["unet.mode=lora", "unet.rank=2", "unet.alpha=5"]  # the text encoders keep the preset's 4 / 4.0


def _base(run: Path) -> Any:
    """The run's base model, fp32, as its config names it."""
    from tc_lite.config import load_config
    from tc_lite.families import load_model

    return load_model(load_config(run / "config.yaml").model, torch.float32)


def _pipe(family: Any, base: Any) -> Any:
    """A pipeline on copies of the base (loading a LoRA changes the modules in place)."""
    replace = {"unet": copy.deepcopy(base.unet)}
    for slot in family.slots:
        replace[slot.encoder_attr] = copy.deepcopy(slot.encoder(base))
    return family.pipeline(base, **replace)


def _loaded(family: Any, base: Any, source: Path) -> Any:
    pipe = _pipe(family, base)
    pipe.load_lora_weights(str(source))
    return pipe


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def sd1_run(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("sd1") / "run", Path("tiny"), *UNET)


def test_sd1_run_exports_the_unet_in_every_format_and_each_gives_the_kohya_files_unet(sd1_run, capsys):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    trained = read_kohya(sd1_run / "xl.safetensors")[0]
    assert (sum(k.startswith("lora_unet_") for k in trained) // 3, sum(k.startswith("lora_te_") for k in trained) // 3) \
        == (48, 12)
    for fmt in ("kohya", "peft", "diffusers", "merged"):
        assert main(["export", str(sd1_run), "--format", fmt, "--save-precision", "fp32"]) == 0, fmt
    out = capsys.readouterr().out
    assert "te: 12 modules, rank 4, alpha 4.0; unet: 48 modules, rank 2, alpha 5.0" in out
    assert "strength_clip and strength_model" in out and "pipe.unet" in out and "wrote merged UNet" in out
    exp = sd1_run / "export"
    assert sorted(p.name for p in exp.iterdir()) == ["xl.safetensors", "xl_diffusers", "xl_peft",
                                                     "xl_text_encoder.safetensors", "xl_unet"]
    again = read_kohya(exp / "xl.safetensors")[0]
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)

    family, base = _base(sd1_run)
    want_pipe = _loaded(family, base, sd1_run / "xl.safetensors")
    want = unet_out(want_pipe.unet, base)
    assert (want - unet_out(base.unet, base)).abs().max() > 0.05  # the LoRA does change the UNet
    _close(unet_out(_loaded(family, base, exp / "xl_diffusers").unet, base), want)
    assert sorted(p.name for p in (exp / "xl_peft").iterdir()) == ["text_encoder", "unet"]
    _close(unet_out(PeftModel.from_pretrained(copy.deepcopy(base.unet), exp / "xl_peft" / "unet"), base), want)
    merged = UNet2DConditionModel.from_pretrained(exp / "xl_unet")
    _close(unet_out(merged, base), want)
    assert read_tuned(exp / "xl_diffusers")[1].keys() == trained.keys()  # SD1: the same names come back
    assert read_tuned(exp / "xl_peft")[1].keys() == trained.keys()

    ids = base.tokenizer(["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():  # the text encoder as the kohya file gives it, from the diffusers file
        te_want = want_pipe.text_encoder(ids)[0]
        _close(_loaded(family, base, exp / "xl_diffusers").text_encoder(ids)[0], te_want)


def test_exporting_a_checkpoint_leaves_the_base_unet_clean(sd1_run, tmp_path):
    """The checkpoint's UNet LoRA goes into a copy of the base UNet: the merged export from it is the final one."""
    from diffusers import UNet2DConditionModel

    from tc_lite.export.run_weights import load_run
    from tc_lite.lora import lora_layers

    ckpt = sd1_run / "checkpoints" / "step_000007.pt"
    rw = load_run(sd1_run, ckpt, log=lambda _: None)
    assert lora_layers(rw.base_model()[1].unet) == [] and len(split_unet_lora(rw.lora)[1]) == 3 * 48
    path = export_run(sd1_run, "kohya", checkpoint=ckpt, save_precision="fp32", log=lambda _: None)
    trained = read_kohya(sd1_run / "xl.safetensors")[0]
    got = read_kohya(path)[0]
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in trained)
    first = export_run(sd1_run, "merged", checkpoint=ckpt, out=tmp_path / "m", log=lambda _: None)
    assert first == tmp_path / "m" and (tmp_path / "m" / "unet" / "config.json").is_file()
    family, base = _base(sd1_run)
    want = unet_out(_loaded(family, base, sd1_run / "xl.safetensors").unet, base)
    _close(unet_out(UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet"), base), want)


def test_sdxl_run_exports_the_unet_by_sgm_names_and_every_format_loads(xl, xl_folder, tmp_path):  # noqa: F811
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from tc_lite.families import FAMILIES

    run = _make_run(tmp_path / "run", xl_folder, *UNET)
    trained, meta = read_kohya(run / "xl.safetensors")
    unet_part = split_unet_lora(trained)[1]
    assert len(unet_part) // 3 == 88 and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                                           "lora_unet_output_blocks_")) for k in unet_part)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and json.loads(meta["tc_lite_unet"])["rank"] == 2
    for fmt in ("peft", "diffusers", "merged"):
        export_run(run, fmt, save_precision="fp32", log=lambda _: None)
    exp, family = run / "export", FAMILIES["sdxl"]
    want = unet_out(_loaded(family, xl, run / "xl.safetensors").unet, xl)
    _close(unet_out(_loaded(family, xl, exp / "xl_diffusers").unet, xl), want)
    assert sorted(p.name for p in (exp / "xl_peft").iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    _close(unet_out(PeftModel.from_pretrained(copy.deepcopy(xl.unet), exp / "xl_peft" / "unet"), xl), want)
    _close(unet_out(UNet2DConditionModel.from_pretrained(exp / "xl_unet"), xl), want)
    assert (exp / "xl_text_encoder.safetensors").is_file() and (exp / "xl_text_encoder_2.safetensors").is_file()
    # read back from diffusers' keys, the UNet modules carry diffusers-path names; they load the same UNet
    kind, back = read_tuned(exp / "xl_diffusers")
    unet_back = split_unet_lora(back)[1]
    assert kind == "lora" and all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_",
                                                "lora_unet_up_blocks_")) for k in unet_back)
    unet = copy.deepcopy(xl.unet)
    load_unet_lora(unet, unet_back, source="xl_diffusers")
    _close(unet_out(unet, xl), want)


def test_a_unet_only_run_writes_only_unet_parts(tmp_path):
    from tc_lite.config import load_config
    from tc_lite.export.trained import result_paths
    from tc_lite.families import FAMILIES

    run = _make_run(tmp_path / "run", Path("tiny"), *UNET, "lora.encoders=[]")
    kohya, full = result_paths(load_config(run / "config.yaml"), FAMILIES["sd1"], run)
    assert kohya == run / "xl.safetensors" and full == {}
    tensors, meta = read_kohya(kohya)
    assert all(k.startswith("lora_unet_") for k in tensors) and meta["tc_lite_component"] == "unet"
    merged = export_run(run, "merged", log=lambda _: None)
    assert merged == run / "export" / "xl_unet" and sorted(p.name for p in (run / "export").iterdir()) == ["xl_unet"]
    peft = export_run(run, "peft", log=lambda _: None)
    assert [p.name for p in peft.iterdir()] == ["unet"]
    with pytest.raises(UserError, match="a UNet LoRA included.*drop --rank"):
        export_run(run, "kohya", rank=2, log=lambda _: None)
