#!/usr/bin/env bash
# Install tc-lite's dependencies. torch comes first and pinned, so no other requirement pulls a multi-GB CUDA build
# on a CPU machine; set TC_LITE_TORCH to choose another build (e.g. TC_LITE_TORCH="torch" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
$PIP install -q "${TC_LITE_TORCH:-torch==2.13.0}"
$PIP install -q -r requirements-dev.txt
$PIP install -q --no-deps "open_clip_torch>=2.24"   # only its bundled CLIP BPE vocabulary is used
