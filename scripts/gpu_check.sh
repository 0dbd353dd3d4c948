#!/usr/bin/env bash
# Validate tc-lite's GPU paths on this machine's CUDA GPU, in under 8 minutes and without downloading anything:
# bench memory with real steps (aesthetic, all-rewards, aesthetic-b4-12gb), fp16 and bf16 steps, 8-bit AdamW,
# xformers, reward offload cpu/sequential, bench speed -- on SD1.5-architecture models with random weights -- and
# bench memory with real steps of full-size SDXL (random weights, bundled configs) for presets/sdxl-12gb.yaml when
# the time allows (--only memory/sdxl-12gb memory/sdxl-aesthetic runs both SDXL checks alone; --only
# memory/aesthetic-te-unet measures the UNet LoRA preset).
# Results: benchmarks/gpu/<device>.json and .md (e.g. nvidia-geforce-rtx-4090.md). Without a CUDA GPU it says so,
# runs a quick CPU subset (tiny model, seconds) and writes benchmarks/gpu/cpu-only.json and .md.
# It does not install anything (scripts/install.sh would put the CPU torch in place of your CUDA one).
#   bash scripts/gpu_check.sh [--out DIR] [--only CHECK ...] [--list] [--cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec "${PYTHON:-python}" -m tc_lite.bench.gpu_check "$@"
