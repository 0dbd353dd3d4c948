"""Find reward weights: a local path or a Hugging Face hub id, with one clear UserError when neither works.

Specs accepted everywhere a reward takes a model or file argument:

* models (``clip_model``, ``model``): an existing local folder saved with ``save_pretrained``, or a hub id
  ``owner/name``;
* single files (``head``): an existing local file, or ``owner/name/path/in/repo`` (hub repo + file name).

Hub files come from the local Hugging Face cache when offline (``HF_HUB_OFFLINE=1``); a miss names the repo/file
and the command that fetches it.

Also here: ``require`` (an optional package, or one clear message with the install command), ``read_state_dict``
(weights-only reading of ``.pt/.pth/.bin/.safetensors`` files) and the shared CLIP vision tower
(``shared_vision`` / ``share_vision``): ``aesthetic`` and ``clip`` built from the same CLIP model spec use one copy
of the vision tower instead of two.
"""

from __future__ import annotations

import importlib
import os
import re
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


# --------------------------------------------------------------------------------------------------- packages


def require(module: str, *, reward: str, install: str, why: str = "") -> Any:
    """Import an optional package or raise one UserError that names the reward and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        reason = f" ({why})" if why else ""
        raise UserError(
            f"reward '{reward}' needs the package '{module}'{reason}, which is not installed or fails to import "
            f"({_first_line(err)}). Install it with: {install}"
        ) from err


# --------------------------------------------------------------------------------------------------- checkpoints


def read_state_dict(path: Path, *, reward: str, key: str) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or a weights-only pickle (``.pt/.pth/.bin``).

    Unwraps ``{"state_dict": ...}`` (Lightning, HPSv2) and a DataParallel ``module.`` prefix. Pickles are read with
    ``weights_only=True``, so a file that needs arbitrary code to load is refused rather than run.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"reward '{reward}': cannot read {key} file '{path}' ({_first_line(err)}). It must be a state dict saved "
            f"with torch.save (.pt/.pth/.bin, tensors only) or a .safetensors file."
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"reward '{reward}': {key} file '{path}' does not hold a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------------- sharing

# spec key -> the vision tower and projection that a live reward already holds (weak: they die with the rewards)
_VISION: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary()
_PROJECTION: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary()


def spec_key(spec: str) -> str:
    """What makes two model specs the same weights: the resolved local folder, or the hub id."""
    local = _local(spec)
    return str(local.resolve()) if local is not None else spec


def _hooked(module: nn.Module) -> bool:
    """True while ``offload: sequential`` hooks hold the module's weights (then it must not be shared further)."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def shared_vision(spec: str) -> tuple[nn.Module, nn.Module] | None:
    """The vision tower + projection another live reward loaded from the same spec, if any (and not hooked)."""
    key = spec_key(spec)
    vision, projection = _VISION.get(key), _PROJECTION.get(key)
    if vision is None or projection is None or _hooked(vision) or _hooked(projection):
        return None
    return vision, projection


def share_vision(spec: str, model: Any) -> Any:
    """Make a freshly loaded ``CLIPModel`` use the vision tower already loaded for ``spec`` (same files, same
    weights), or register its own for the next reward. Returns the model."""
    found = shared_vision(spec)
    if found is not None:
        model.vision_model, model.visual_projection = found
    else:
        key = spec_key(spec)
        _VISION[key], _PROJECTION[key] = model.vision_model, model.visual_projection
    return model
