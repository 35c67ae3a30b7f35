#!/usr/bin/env bash
# Builds the native kernels with AddressSanitizer + UBSan into a temporary directory and runs
# the kernel property tests (sign and sparse kernels) against that build (the normal build is not touched).
# Same as the pytest test it runs: tests/unit/test_kernels_asan.py. Extra args go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-"$ROOT/.venv/bin/python"}
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_kernels_asan.py "$@"
