"""Atomic writes: a crash mid-write must never leave a partial file or damage the previous one."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from tc_lite.io import atomic_path, atomic_write, save_json_atomic, save_safetensors_atomic, save_text_atomic


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_text_write_and_overwrite(tmp_path):
    dest = tmp_path / "sub" / "notes.txt"  # parent directories are created
    save_text_atomic("first\n", dest)
    save_text_atomic("second ✓\n", dest)
    assert dest.read_text(encoding="utf-8") == "second ✓\n"
    assert _leftovers(dest.parent) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_old_file_and_leaves_nothing(tmp_path, exc):
    dest = tmp_path / "lora.safetensors"
    dest.write_bytes(b"OLD CONTENT")

    def write_half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial new cont")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(dest, write_half_then_fail)
    assert dest.read_bytes() == b"OLD CONTENT"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_failure_on_new_file_creates_nothing(tmp_path):
    dest = tmp_path / "new.json"
    with pytest.raises(ValueError), atomic_path(dest) as tmp:
        tmp.write_text("{")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_roundtrip_with_metadata(tmp_path):
    dest = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "b": torch.tensor(2.5)}  # non-contiguous
    save_safetensors_atomic(tensors, dest, {"ss_network_dim": "4"})
    with safe_open(str(dest), framework="pt") as f:
        assert f.metadata() == {"ss_network_dim": "4"}
        assert torch.equal(f.get_tensor("a"), tensors["a"])
        assert f.get_tensor("b").item() == 2.5
    assert _leftovers(tmp_path) == []


def test_safetensors_rejects_non_string_metadata_before_writing(tmp_path):
    dest = tmp_path / "t.safetensors"
    dest.write_bytes(b"old")
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_safetensors_atomic({"a": torch.zeros(1)}, dest, {"ss_network_dim": 4})  # type: ignore[dict-item]
    assert dest.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_json_unserialisable_keeps_old(tmp_path):
    dest = tmp_path / "state.json"
    save_json_atomic({"step": 1}, dest)
    with pytest.raises(TypeError):
        save_json_atomic({"step": object()}, dest)
    assert json.loads(dest.read_text()) == {"step": 1}
    assert _leftovers(tmp_path) == []


def test_new_file_gets_normal_permissions_and_existing_mode_is_kept(tmp_path):
    dest = tmp_path / "m.txt"
    save_text_atomic("x", dest)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    os.chmod(dest, 0o640)
    save_text_atomic("y", dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
