"""The tc-lite cache folder and atomic writes into it.

Several processes (test workers, a CLI run next to a notebook) may build the same cached artefact at once, so every
write goes to a private temporary name first and is renamed into place; a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """`$TC_LITE_CACHE`, else `~/.cache/tc_lite`; read at call time so tests and users can redirect it."""
    env = os.environ.get("TC_LITE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "tc_lite"
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create folder `final` by letting `fill` populate a temporary sibling, then renaming it into place.

    If another process wins the race, its (complete) folder is kept and ours is discarded.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_file(final: Path, write: Callable[[Path], None]) -> Path:
    """Write file `final` through `write(tmp_path)` and an atomic `os.replace`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final
