#!/usr/bin/env bash
# Checks that the facade's registry holds exactly what its features compiled in:
# runs tests/facade_features.rs once per feature combination that matters.
#
#   scripts/test-features.sh            # all combinations
#   CARGO_FLAGS=--release scripts/test-features.sh
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
    echo "== echo facade, features: $*" >&2
    # shellcheck disable=SC2086
    cargo test ${CARGO_FLAGS:-} -p echo --test facade_features "$@"
}

run                                   # default (tcp)
run --no-default-features             # mem only
for f in tcp grpc quic full; do
    run --no-default-features --features "$f"
done
