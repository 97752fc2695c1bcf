#!/usr/bin/env bash
# Runs every test: sets up the Python venv the interop tests use, checks
# formatting and lints, then runs the whole workspace's tests with all features.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-python.sh
export ECHO_PYTHON="$PWD/.venv/bin/python"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo test --workspace --all-features --no-fail-fast
