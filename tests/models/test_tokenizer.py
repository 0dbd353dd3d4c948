"""The offline CLIP tokenizer must give SD1.5's ids, or prompts mean something else to a real text encoder."""

from __future__ import annotations

import json

import pytest

from tc_lite.errors import UserError
from tc_lite.models import tokenizer as tok_module
from tc_lite.models.tokenizer import clip_tokenizer, clip_tokenizer_dir


def test_ids_match_sd15():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A Photo of a CAT").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # lower-cased like CLIP


def test_pads_to_77_with_end_token():
    tok = clip_tokenizer()
    assert tok.model_max_length == 77
    ids = tok("a red square", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, -1].item() == 49407 == tok.pad_token_id
    long = tok("word " * 100, truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[-1] == 49407


def test_folder_is_sd15_shaped_and_saved_with_max_length():
    folder = clip_tokenizer_dir()
    assert {p.name for p in folder.iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert (folder / "merges.txt").read_text().splitlines()[0].startswith("#version")


def test_missing_open_clip_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TC_LITE_CACHE", str(tmp_path))  # force a rebuild of the files
    monkeypatch.setattr(tok_module, "_open_clip_dirs", lambda: [])
    with pytest.raises(UserError, match="pip install --no-deps open_clip_torch"):
        clip_tokenizer()
    assert not (tmp_path / "clip_tokenizer_v1").exists()  # nothing half-written left behind
