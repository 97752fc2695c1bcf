#!/usr/bin/env bash
# Builds the echo_rs Python module (echo-py/, pyo3 + maturin) into the project's
# venv and runs its tests (echo-py/tests/, unittest): id-echo's TcpClient and
# the gRPC client in python/ send to an echo_rs.Server, whose batches must hold
# every sample once, byte for byte.
#
#   bash scripts/test-python-binding.sh
#
# The venv and maturin come from scripts/setup-python.sh (python/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(bash scripts/setup-python.sh)"
venv="$(dirname "$(dirname "$py")")"
echo "== echo_rs: maturin develop into $venv" >&2
(cd echo-py && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --quiet)
echo "== echo_rs: Python tests" >&2
"$py" -m unittest discover -s echo-py/tests -v
