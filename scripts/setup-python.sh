#!/usr/bin/env bash
# Create/refresh the Python virtualenv used by echo's interop tests and
# benchmarks (id-echo reference client/server, numpy, optree, grpc).
#
#   scripts/setup-python.sh            # -> prints the venv's python path last
#   PY=$(scripts/setup-python.sh)      # progress goes to stderr, path to stdout
#
# Idempotent and quick when nothing changed: a stamp file in the venv holds
# a hash of python/requirements.txt (plus the interpreter version); pip only
# runs when it differs. Safe to run concurrently (flock).
#
# Env: PYTHON  interpreter to build the venv from (default: python3, >= 3.10)
#      ECHO_VENV  venv location (default: $REPO/.venv)
set -euo pipefail

log() { printf 'setup-python: %s\n' "$*" >&2; }
die() { printf 'setup-python: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; printf "setup-python: ERROR: command failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="${ECHO_VENV:-$REPO/.venv}"
REQ="$REPO/python/requirements.txt"
STAMP="$VENV/.echo-requirements.sha256"
PYTHON="${PYTHON:-python3}"

[[ -f "$REQ" ]] || die "missing $REQ"
command -v "$PYTHON" >/dev/null 2>&1 || die "interpreter '$PYTHON' not found (set PYTHON=...)"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); id-echo needs Python >= 3.10"

# Serialise concurrent runs (e.g. several test binaries starting at once).
if command -v flock >/dev/null 2>&1; then
    lock_id="$(printf '%s' "$VENV" | sha256sum | cut -c1-16)"
    exec 9>"${TMPDIR:-/tmp}/echo-setup-python-$lock_id.lock"
    flock -w 600 9 || die "timed out waiting for another setup-python.sh run"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# A venv whose interpreter no longer runs (interrupted creation, python moved
# or upgraded) is rebuilt from scratch.
if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "venv at $VENV is broken; recreating"
    rm -rf "$VENV"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv at $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV" \
        || die "python -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi

want="$( { sha256sum <"$REQ" | cut -d' ' -f1; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"

if [[ "$want" != "$have" ]]; then
    rm -f "$STAMP"
    log "upgrading pip"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip \
        || die "pip upgrade failed (is PyPI reachable?)"
    log "installing $REQ"
    "$VENV/bin/python" -m pip install --quiet -r "$REQ" \
        || die "pip install -r $REQ failed"
    printf '%s\n' "$want" >"$STAMP"
else
    log "requirements unchanged; skipping pip"
fi

"$VENV/bin/python" -c 'import echo, numpy, optree, grpc' \
    || die "smoke import failed in $VENV (delete it and re-run)"
log "ok: id-echo $("$VENV/bin/python" -c 'import echo; print(echo.__version__)')"

# Last line on stdout: the interpreter to use.
printf '%s\n' "$VENV/bin/python"
