#!/usr/bin/env bash
# Install and run the test suite (offline: tests build tiny models in code and never reach the network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
# Two workers (pytest-xdist), one test file each at a time: the suite is CPU-bound and single-threaded per test, so
# this halves the wall time on a 2-core machine (TC_LITE_TEST_WORKERS=0 runs in one process, e.g. to debug).
workers="${TC_LITE_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  python -m pytest -q tests "$@"
else
  python -m pytest -q -n "$workers" --dist loadfile tests "$@"
fi
