#!/usr/bin/env bash
# Install and run the test suite (offline: tests build tiny models in code and never reach the network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
python -m pytest -q tests "$@"
