#!/usr/bin/env bash
# Runs examples/learner and python/actor.py side by side, end to end, and checks
# that both finish cleanly: the learner serves TCP on an ephemeral port and stops
# after BATCHES batches; ACTORS actors send exactly that many steps between them.
#
#   scripts/learner-actor.sh                  # debug build, small run
#   CARGO_FLAGS=--release BATCHES=100 scripts/learner-actor.sh
#
# Env: BATCHES (default 8), ACTORS (default 2), BATCH_SIZE (default 64),
#      PYTHON (default .venv/bin/python, made by scripts/setup-python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

BATCHES="${BATCHES:-8}"
ACTORS="${ACTORS:-2}"
BATCH_SIZE="${BATCH_SIZE:-64}"
PYTHON="${PYTHON:-.venv/bin/python}"
total=$((BATCHES * BATCH_SIZE))
if ((total % ACTORS != 0)); then
    echo "learner-actor: BATCHES*BATCH_SIZE ($total) must divide among $ACTORS actors" >&2
    exit 64
fi

# shellcheck disable=SC2086
cargo build ${CARGO_FLAGS:-} -p echo --example learner
# shellcheck disable=SC2086
learner_bin="$(cargo build ${CARGO_FLAGS:-} -p echo --example learner --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)"
[[ -x "$learner_bin" ]] || { echo "learner-actor: learner binary not found" >&2; exit 1; }

log="$(mktemp)"
learner_pid=""
trap 'kill "$learner_pid" 2>/dev/null || true; rm -f "$log"' EXIT
timeout 120 "$learner_bin" --listen tcp://127.0.0.1:0 --batch-size "$BATCH_SIZE" \
    --batches "$BATCHES" >"$log" 2>&1 &
learner_pid=$!

port=""
for _ in $(seq 1 300); do
    port="$(sed -n 's|^listening on tcp://127.0.0.1:\([0-9]*\).*|\1|p' "$log" | head -n1)"
    [[ -n "$port" ]] && break
    kill -0 "$learner_pid" 2>/dev/null || break
    sleep 0.1
done
[[ -n "$port" ]] || { echo "learner-actor: learner did not start:" >&2; cat "$log" >&2; exit 1; }

timeout 120 "$PYTHON" python/actor.py --port "$port" --actors "$ACTORS" \
    --steps $((total / ACTORS)) --timeout 100
status=0
wait "$learner_pid" || status=$?
learner_pid=""
cat "$log"
((status == 0)) || { echo "learner-actor: learner exited with $status" >&2; exit 1; }
grep -q "^done: $BATCHES batches, $total samples" "$log" \
    || { echo "learner-actor: the learner did not consume $BATCHES batches" >&2; exit 1; }
echo "learner-actor: ok ($BATCHES batches of $BATCH_SIZE from $ACTORS actors)"
