#!/usr/bin/env bash
# Builds SPEAR and runs the whole test suite (CPU; GPU tests are skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --test-dir build --output-on-failure "$@"
