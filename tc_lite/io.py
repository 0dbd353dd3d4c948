"""Atomic file writes: a file tc-lite writes is either the complete new version or the untouched old one.

Why: training runs are long and get killed (OOM, Ctrl-C, a Colab disconnect). A LoRA, checkpoint or metrics file
half-written at that moment would load as garbage in A1111/ComfyUI or break a resume. Every writer therefore goes
to a temporary file in the destination's own directory (so the final rename never crosses a filesystem), flushes
and fsyncs it, renames it over the destination with ``os.replace`` (atomic on POSIX and Windows), then fsyncs the
directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is only needed by the safetensors helper; keep `tc_lite.io` light to import
    import torch

__all__ = [
    "atomic_path",
    "atomic_write",
    "save_json_atomic",
    "save_safetensors_atomic",
    "save_text_atomic",
]


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # Reading the umask means setting it; do it once per process rather than on every write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    # Writers may hand the path to a library that closes its own handle (safetensors); reopen to fsync.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename. Not possible on Windows (directories cannot be opened); the rename is still atomic."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. certain FUSE/network mounts) refuse directory fsync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path`` atomically.

    The caller writes the whole file to the yielded path (with any library). On any exception, the temporary file
    is deleted and ``path`` is left exactly as it was (absent, or the previous version). Parent directories are
    created. The temporary name starts with a dot and ends in ``.tmp`` so that a crash leftover is recognisable
    and never mistaken for a finished ``.safetensors``/``.json``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        # mkstemp creates 0600; keep the old file's mode, or use what a plain open() would give.
        os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode) if dest.exists() else 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[Path], Any]) -> Path:
    """Call ``write_fn(tmp_path)`` to produce the file, then move it into place atomically; return ``path``."""
    with atomic_path(path) as tmp:
        write_fn(tmp)
    return Path(path)


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a ``.safetensors`` file atomically. Tensors are made contiguous CPU copies (safetensors requires it)."""
    from safetensors.torch import save_file

    meta = None
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:  # safetensors' own message does not say which key; fail before creating anything
            raise TypeError(f"safetensors metadata must be str -> str; non-string entries: {bad}")
        meta = dict(metadata)
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(prepared, str(tmp), metadata=meta))


def save_json_atomic(obj: Any, path: str | os.PathLike[str], *, indent: int | None = 2) -> Path:
    """Write JSON atomically (UTF-8, trailing newline). Serialisation happens first, so a bad object never
    creates a temporary file at all."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n"
    return save_text_atomic(text, path)


def save_text_atomic(text: str, path: str | os.PathLike[str], *, encoding: str = "utf-8") -> Path:
    """Write text atomically."""
    data = text.encode(encoding)

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, _write)
