"""Hugging Face hub snapshots with the errors a user can fix turned into one `UserError` each (gated, missing,
wrong revision, not cached while offline). Only the files a pattern names are fetched."""

from __future__ import annotations

import os
from pathlib import Path

from tc_lite.errors import UserError


def hub_cache_dir() -> str:
    """Read at call time (huggingface_hub reads its environment only at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def snapshot(repo_id: str, patterns: list[str], *, revision: str | None = None, key: str = "model.source") -> Path:
    """The local folder of `repo_id` holding the files matching `patterns` (downloaded unless offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import HFValidationError

    offline = hub_offline()
    # only what tc-lite reads: a bare `hf download` fetches every variant and format the repo holds (SDXL base:
    # single files, fp16 copies, ONNX/OpenVINO exports) where tc-lite needs the fp32 safetensors (~14 GB)
    download = (f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
                + " --include " + " ".join(f"'{p}'" for p in patterns))
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=offline,
                                      allow_patterns=patterns))
    except HFValidationError as err:
        raise UserError(f"{key}: {repo_id!r} is neither an existing local path nor a valid hub id (org/name); "
                        "check the spelling.") from err
    except GatedRepoError as err:
        raise UserError(
            f"{key}: {repo_id!r} is gated. Accept its licence on huggingface.co, then run `hf auth login`."
        ) from err
    except RepositoryNotFoundError as err:
        raise UserError(
            f"{key}: {repo_id!r} is neither a local path nor a model on the Hugging Face hub (check the "
            "spelling; private repos need `hf auth login`)."
        ) from err
    except RevisionNotFoundError as err:
        raise UserError(f"model.revision: {revision!r} does not exist in {repo_id!r}.") from err
    except LocalEntryNotFoundError as err:
        how = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "it could not be downloaded"
        raise UserError(
            f"{key}: {repo_id!r} is not a local path, and {how} ({hub_cache_dir()}). Download it once with "
            f"`{download}` (or run once with network access), or point {key} at a local folder or file."
        ) from err
