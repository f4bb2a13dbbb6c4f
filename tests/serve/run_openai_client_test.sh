#!/usr/bin/env bash
# Runs openai_client_test.py in a virtual environment under the build tree with the pinned official OpenAI
# client (created on first use from PyPI; nothing installed system-wide).
# usage: run_openai_client_test.sh BUILD_DIR SPEAR_BINARY MODEL_DIR
set -euo pipefail
build=$1 spear=$2 model=$3
venv="$build/pyenv-openai"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "openai==3.57.0"
fi
exec "$venv/bin/python" "$(dirname "$0")/openai_client_test.py" "$spear" "$model"
