"""Find reward weights: a local path or a Hugging Face hub id, with one clear UserError when neither works.

Specs accepted everywhere a reward takes a model or file argument:

* models (``clip_model``, ``model``): an existing local folder saved with ``save_pretrained``, or a hub id
  ``owner/name``;
* single files (``head``): an existing local file, or ``owner/name/path/in/repo`` (hub repo + file name).

Hub files come from the local Hugging Face cache when offline (``HF_HUB_OFFLINE=1``); a miss names the repo/file
and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tc_lite.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILE = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)/(.+)$")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _local(spec: str) -> Path | None:
    path = Path(os.path.expanduser(spec))
    return path if path.exists() else None


def resolve_file(spec: str, *, reward: str, key: str) -> Path:
    """Local file path, or download ``owner/name/file`` from the hub (cache first)."""
    local = _local(spec)
    if local is not None:
        if not local.is_file():
            raise UserError(f"reward '{reward}': {key} '{spec}' is a folder; point it at the weights file itself.")
        return local
    match = _HUB_FILE.match(spec)
    if match is None or spec.startswith((".", "~", "/")):
        raise UserError(
            f"reward '{reward}': {key} file '{spec}' does not exist. Give an existing local file or a hub file "
            f"as 'owner/name/file.pth'."
        )
    repo, filename = match.groups()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as err:  # offline miss, 404, auth, network: all mean "the user must fetch it"
        raise UserError(
            f"reward '{reward}': {key} '{spec}' is not a local file and hub repo '{repo}' file '{filename}' "
            f"could not be loaded ({_first_line(err)}). Download it once while online with "
            f"`hf download {repo} {filename}`, or set {key} to a local file."
        ) from err


def load_pretrained(loader: Any, spec: str, *, reward: str, key: str, what: str = "model") -> Any:
    """``loader.from_pretrained(spec)`` for a local folder or a hub id, turning failures into a UserError."""
    local = _local(spec)
    if local is None and (not _HUB_ID.match(spec) or spec.startswith((".", "~", "/"))):
        raise UserError(
            f"reward '{reward}': {key} '{spec}' is neither an existing local folder nor a hub id 'owner/name'."
        )
    try:
        return loader.from_pretrained(str(local) if local is not None else spec)
    except Exception as err:
        if local is not None:
            raise UserError(
                f"reward '{reward}': cannot load the {what} from folder {key}='{spec}' ({_first_line(err)}). "
                f"It must be a folder written by `save_pretrained` (config.json plus weights)."
            ) from err
        raise UserError(
            f"reward '{reward}': cannot load the {what} '{spec}' from the Hugging Face hub ({_first_line(err)}). "
            f"Download it once while online with `hf download {spec}`, or set {key} to a local folder."
        ) from err
