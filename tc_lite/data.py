"""Prompts: the only training data TextCraftor needs, and a resumable, deterministic order to feed them in.

Formats: ``.txt`` (one prompt per line, ``#`` comments), ``.csv``/``.tsv`` with a named column (``prompt``, or
``Prompt`` as in Parti-Prompts' ``PartiPrompts.tsv``), ``.jsonl`` with a key. ``None`` means the shipped list;
``builtin:NAME`` names any list shipped in ``tc_lite/assets/prompts`` (``builtin:heldout`` for evaluation).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tc_lite.errors import UserError

__all__ = ["PromptSampler", "builtin_prompt_lists", "load_prompts", "prompts_fingerprint"]

BUILTIN_PREFIX = "builtin:"
DEFAULT_LIST = "train"
_DEFAULT_KEYS = ("prompt", "Prompt")
_SUPPORTED = ".txt, .csv, .tsv, .jsonl"


def _assets() -> Any:
    return resources.files("tc_lite").joinpath("assets", "prompts")


def builtin_prompt_lists() -> list[str]:
    """Names usable as ``builtin:NAME`` (files shipped in tc_lite/assets/prompts)."""
    folder = _assets()
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


def _clean(text: str) -> str:
    # Collapse internal whitespace (CSV cells may hold newlines/tabs); CLIP sees the same tokens either way.
    return " ".join(text.split())


def load_prompts(path: str | Path | None, *, column: str | None = None) -> list[str]:
    """Load prompts from ``path`` (see module docstring); errors name the file and the fix."""
    if path is None:
        path = BUILTIN_PREFIX + DEFAULT_LIST
    if isinstance(path, str) and path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        available = builtin_prompt_lists()
        if name not in available:
            raise UserError(f"prompts: no built-in list {name!r}; use one of {[BUILTIN_PREFIX + n for n in available]}")
        text = _assets().joinpath(f"{name}.txt").read_text(encoding="utf-8")
        return _finish(_parse_txt(text), path)

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"prompts file {str(p)!r} does not exist; check the path (or leave it empty for the built-in list)"
        )
    if not p.is_file():
        raise UserError(f"prompts path {str(p)!r} is a directory; point it at a {_SUPPORTED} file")
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".csv", ".tsv", ".jsonl"):
        raise UserError(f"prompts file {str(p)!r} has an unsupported extension {p.suffix!r}; use {_SUPPORTED}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate the BOM Excel writes
    except UnicodeDecodeError as e:
        raise UserError(
            f"prompts file {str(p)!r} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
            "re-save it as UTF-8"
        ) from None
    if suffix == ".txt":
        if column is not None:
            raise UserError(f"prompts: a column ({column!r}) was given but {str(p)!r} is a .txt file (one per line)")
        prompts = _parse_txt(text)
    elif suffix in (".csv", ".tsv"):
        prompts = _parse_table(text, p, column, "\t" if suffix == ".tsv" else ",")
    else:
        prompts = _parse_jsonl(text, p, column)
    return _finish(prompts, str(p))


def _finish(prompts: list[str], source: str) -> list[str]:
    if not prompts:
        raise UserError(f"prompts file {source!r} contains no prompts; add at least one non-empty prompt")
    return prompts


def _parse_txt(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(_clean(s))
    return out


def _pick_column(available: Sequence[str], column: str | None, where: str, what: str) -> str:
    """The named column/key, else 'prompt' or 'Prompt'; ``where`` locates the problem for the message."""
    if column is not None:
        if column in available:
            return column
        raise UserError(
            f"{where} has no {what} {column!r}; available: {list(available)}. Set the prompts column to one of them"
        )
    for key in _DEFAULT_KEYS:
        if key in available:
            return key
    raise UserError(
        f"{where} has no 'prompt' or 'Prompt' {what}; available: {list(available)}. "
        "Name the right one with the prompts column setting"
    )


def _parse_table(text: str, source: Path, column: str | None, delimiter: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h for h in (reader.fieldnames or []) if h is not None]
    if not header:
        raise UserError(f"prompts file {str(source)!r} is empty; it needs a header row with a 'prompt' column")
    key = _pick_column(header, column, f"prompts file {str(source)!r}", "column")
    try:
        return [_clean(v) for row in reader if (v := row.get(key)) and v.strip()]
    except csv.Error as e:
        raise UserError(f"prompts file {str(source)!r} is not valid {'TSV' if delimiter == chr(9) else 'CSV'} "
                        f"(line {reader.line_num}: {e}); fix the quoting") from None


def _parse_jsonl(text: str, source: Path, key: str | None) -> list[str]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"prompts file {str(source)!r}, line {lineno}: not valid JSON ({e.msg}); each line must be one "
                'object such as {"prompt": "a red fox in snow"}'
            ) from None
        if not isinstance(obj, dict):
            raise UserError(
                f"prompts file {str(source)!r}, line {lineno}: expected a JSON object, got {type(obj).__name__}"
            )
        k = _pick_column(list(obj), key, f"prompts file {str(source)!r}, line {lineno},", "key")
        value = obj[k]
        if not isinstance(value, str):
            raise UserError(f"prompts file {str(source)!r}, line {lineno}: {k!r} must be a string, got {value!r}")
        if value.strip():
            out.append(_clean(value))
    return out


def prompts_fingerprint(prompts: Sequence[str]) -> str:
    """Short hash of the prompt list, stored in sampler state so a resume can tell the list changed."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


class PromptSampler:
    """Deterministic, infinite stream of prompt batches.

    Each epoch visits every prompt once in an order shuffled by ``random.Random`` seeded from (seed, epoch):
    reproducible across machines and Python versions, independent of torch's global RNG, and different every epoch.
    Batches run across epoch boundaries so they are always full. ``state_dict()`` after batch n plus
    ``load_state_dict()`` resumes at batch n+1 exactly.
    """

    def __init__(self, prompts: Sequence[str], batch_size: int, seed: int = 0):
        if not prompts:
            raise UserError("prompt sampler: the prompt list is empty; give at least one prompt")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # index into the current epoch's order of the next prompt to hand out
        self._order_epoch = -1
        self._order: list[int] = []
        self._fingerprint = prompts_fingerprint(self.prompts)

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            order = list(range(len(self.prompts)))
            # A string seed is hashed with SHA-512 by random.Random: stable everywhere, and seed 1 / epoch 0 does
            # not repeat seed 0 / epoch 1 as a plain seed+epoch would.
            random.Random(f"tc-lite-prompts:{self.seed}:{self.epoch}").shuffle(order)
            self._order, self._order_epoch = order, self.epoch
        return self._order

    def next_batch(self) -> list[str]:
        batch = []
        while len(batch) < self.batch_size:
            order = self._epoch_order()
            batch.append(self.prompts[order[self.position]])
            self.position += 1
            if self.position == len(order):
                self.epoch += 1
                self.position = 0
        return batch

    def __iter__(self) -> Iterator[list[str]]:
        return self

    def __next__(self) -> list[str]:
        return self.next_batch()

    def __len__(self) -> int:
        """Number of prompts (the stream itself is infinite)."""
        return len(self.prompts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
            "prompts_sha256": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (
            state.get("seed", self.seed) != self.seed
            or state.get("num_prompts", len(self.prompts)) != len(self.prompts)
            or state.get("prompts_sha256", self._fingerprint) != self._fingerprint
        ):
            raise UserError(
                "resume: the prompt list or seed differs from the checkpoint's "
                f"(checkpoint: {state.get('num_prompts')} prompts, seed {state.get('seed')}; now: {len(self.prompts)} "
                f"prompts, seed {self.seed}); resume with the same prompts file and seed, or start a new run"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.prompts):
            raise UserError(
                f"resume: sampler state epoch={epoch} position={position} is out of range; the checkpoint is damaged"
            )
        self.epoch, self.position = epoch, position


def warn_long_prompts(family: Any, components: Any, prompts: list[str], log: Callable[[str], None]) -> int:
    """CLIP sees at most 77 tokens (start and end included); say how many prompts lose their tail."""
    limit, long = family.long_prompts(components, prompts)
    if long:
        log(f"warning: {len(long)} of {len(prompts)} prompts are longer than the text encoder's {limit} tokens and "
            f"are truncated, e.g. {long[0][:80]!r}...")
    return len(long)
