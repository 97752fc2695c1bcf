#!/usr/bin/env bash
# Runs every test: sets up the Python venv the interop tests use, checks
# formatting and lints, runs the examples that finish on their own, the Python
# binding's tests (echo_rs, built into the venv) and the facade's per-feature
# registry tests, then the whole workspace's tests with all features (last, so
# its summary closes the output).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-python.sh
export ECHO_PYTHON="$PWD/.venv/bin/python"

echo "== format and lints" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "== examples that finish on their own" >&2
cargo run --all-features --example compare_transports -- \
    --sizes 64,65536 --samples 300 --clients 2 --svg target/compare-ci/throughput.svg \
    --json target/compare-ci/results.json
cargo run --all-features --example custom_transport
bash scripts/learner-actor.sh

echo "== the Python learner binding (echo_rs)" >&2
bash scripts/test-python-binding.sh

echo "== facade registry per feature combination" >&2
bash scripts/test-features.sh

echo "== workspace tests" >&2
cargo test --workspace --all-features --no-fail-fast
