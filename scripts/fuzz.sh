#!/usr/bin/env bash
# Fuzzes echo-core's decoders of untrusted bytes with cargo-fuzz (not part of CI).
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (default: all six) for SECONDS (default 60) on one core, with
# debug assertions (so arithmetic overflow is a crash), starting from the
# committed corpus in fuzz/corpus/TARGET plus the seeds scripts/fuzz-seeds.py
# writes to fuzz/seeds/TARGET. Then minimizes the corpus (`cargo fuzz cmin`; set
# FUZZ_CMIN=0 to skip) and prints a line per target: seconds, executions, corpus
# size and crashes. Crashing inputs land in fuzz/artifacts/TARGET; reproduce one
# with `cargo +nightly fuzz run -a TARGET fuzz/artifacts/TARGET/crash-...`.
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). Exits 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(handshake splitter control spec_json hello acks)
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs a nightly toolchain and cargo-fuzz: rustup toolchain install nightly && cargo install cargo-fuzz" >&2
    exit 2
fi

python3 scripts/fuzz-seeds.py fuzz/seeds
cargo +nightly fuzz build -a >&2

summary=()
crashed=0
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    log=$(mktemp)
    echo "== $t: $seconds s" >&2
    set +e
    cargo +nightly fuzz run -a "$t" "$corpus" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 2>&1 | tee "$log" |
        grep -E 'INITED|DONE|pulse|ERROR|panicked|Failing input|SUMMARY' >&2
    status=${PIPESTATUS[0]}
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rm -f "$log"
    if [ "${FUZZ_CMIN:-1}" != 0 ]; then
        # Seeds that add coverage join the corpus; cmin drops what adds none.
        cp -n "fuzz/seeds/$t"/* "$corpus"/ 2>/dev/null || true
        cargo +nightly fuzz cmin -a "$t" "$corpus" >/dev/null 2>&1 ||
            echo "fuzz.sh: cmin failed for $t; corpus left as is" >&2
    fi
    crashes=$(($(find "fuzz/artifacts/$t" -type f | wc -l) - before))
    if [ "$status" -ne 0 ] || [ "$crashes" -gt 0 ]; then
        crashed=1
    fi
    files=$(find "$corpus" -type f | wc -l)
    bytes=$(find "$corpus" -type f -exec cat {} + | wc -c)
    summary+=("$t: ${seconds} s, ${execs:-?} executions, corpus $files files ($bytes bytes), $crashes new crash inputs, exit $status")
done

echo "== summary ($(date -u +%Y-%m-%d))" >&2
printf '%s\n' "${summary[@]}"
exit $crashed
