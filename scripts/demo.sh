#!/usr/bin/env bash
# Install and run the offline demo: the tiny built-in model, a colour reward, CPU, about a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
python run.py presets/tiny-cpu.yaml "$@"
