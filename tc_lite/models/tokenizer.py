"""SD1.x's CLIP tokenizer, built offline from the BPE file that `open_clip_torch` ships.

SD1.5's tokenizer is OpenAI CLIP's: 256 byte symbols, the same with `</w>`, the first 48,894 BPE merges joined, then
`<|startoftext|>` and `<|endoftext|>` (49,408 tokens). open_clip carries that merge list, so tests, the tiny model and
single-file loading need no download. We never `import open_clip` (it pulls in torchvision); we only locate its files.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tc_lite.errors import UserError
from tc_lite.models._cache import atomic_dir, cache_root

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 77  # SD1 pads/truncates to 77; saving it matters (other programs pad to model_max_length)
_NUM_MERGES = 49152 - 256 - 2  # = 48,894: the merges CLIP actually uses
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_FOLDER = "clip_tokenizer_v1"  # bump if the files written below change
# SDXL's second tokenizer (OpenCLIP ViT-bigG's) is the same BPE, but pads with "!" (id 0) instead of <|endoftext|>:
# the padded positions differ, so its hidden states (and a LoRA trained on them) differ too.
PAD_TOKENS = {"<|endoftext|>": _FOLDER, "!": _FOLDER + "_pad_bang"}

# The SD1.5 tokenizer folder's own settings, so the written folder loads the same in any transformers version.
_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": MODEL_MAX_LENGTH,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
_SPECIAL_TOKENS = {k: _TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}


def _open_clip_dirs() -> list[str]:
    """Where the installed open_clip package lives, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    return list(spec.submodule_search_locations or []) if spec else []


def _bpe_path() -> Path:
    for loc in _open_clip_dirs():
        path = Path(loc) / _BPE_FILE
        if path.is_file():
            return path
    raise UserError(
        f"The CLIP tokenizer vocabulary ({_BPE_FILE}) comes from the open_clip_torch package, which is not installed. "
        "Install it without its dependencies: pip install --no-deps open_clip_torch"
    )


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return [chr(c) for c in symbols]


def _write_tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]  # line 0 is a version header
    byte_syms = _byte_symbols()
    tokens = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408:
        raise RuntimeError(f"built a CLIP vocabulary of {len(vocab)} tokens, expected 49408 ({_bpe_path()})")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {**_TOKENIZER_CONFIG, "pad_token": pad_token}
    special = {**_SPECIAL_TOKENS, "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def clip_tokenizer_dir(pad_token: str = "<|endoftext|>") -> Path:
    """A folder laid out like SD1.5's `tokenizer/` (vocab.json, merges.txt, configs), written once into the cache.

    `pad_token="!"` gives SDXL's `tokenizer_2`."""
    if pad_token not in PAD_TOKENS:
        raise ValueError(f"pad_token {pad_token!r}: one of {list(PAD_TOKENS)}")
    return atomic_dir(cache_root() / PAD_TOKENS[pad_token], lambda d: _write_tokenizer_files(d, pad_token))


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """SD1.x's `CLIPTokenizer` (49,408 tokens, `model_max_length=77`), with no network access.

    A fresh instance each call (loading takes ~40 ms), so a caller that adds tokens does not change anyone else's.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad_token)), model_max_length=MODEL_MAX_LENGTH)
