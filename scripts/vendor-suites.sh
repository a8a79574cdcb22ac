#!/usr/bin/env bash
# Runs the vendor-client suites against the emulators: for every
# tests/vendor/<provider>_*.py (once per pinned venv of that provider's SDK;
# files starting with `_` are shared modules)
# and tests/vendor/<provider>_*.mjs / .cjs, starts `paperclip-env emulate <provider>`,
# runs the suite with the emulator's `env` exported, and stops the emulator.
# Each suite prints `N passed, N failed`; this script fails on any failure
# (or a suite that prints no tally). Installs the clients first
# (scripts/vendor-setup.sh, idempotent).
#
#   bash scripts/vendor-suites.sh [PROVIDER…]   only those providers' suites (e.g. `modal`)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/paperclip-env/target}"
VENDOR="${PAPERCLIP_ENV_VENDOR_DIR:-$HOME/.cache/paperclip-env/vendor}"

bash scripts/vendor-setup.sh
cargo build --quiet -p paperclip-env-cli --bin paperclip-env
BIN="$CARGO_TARGET_DIR/debug/paperclip-env"

work="$(mktemp -d)"
emulator_pid=""
cleanup() {
    if [ -n "$emulator_pid" ]; then
        kill -TERM "$emulator_pid" 2>/dev/null || true
        wait "$emulator_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

failures=0
report=()
only=("$@")

# wanted <provider>: whether the command line selected it (all when none given).
wanted() {
    [ "${#only[@]}" -eq 0 ] && return 0
    local p
    for p in "${only[@]}"; do
        [ "$p" = "$1" ] && return 0
    done
    return 1
}

# run_suite <provider> <label> <command…>
run_suite() {
    local provider="$1" label="$2"
    shift 2
    local line="$work/line.json" log="$work/suite.log"
    : >"$line"
    "$BIN" emulate "$provider" >"$line" 2>"$work/emulator.err" &
    emulator_pid=$!
    for _ in $(seq 1 300); do
        [ -s "$line" ] && break
        kill -0 "$emulator_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -s "$line" ]; then
        echo "vendor-suites: emulate $provider printed nothing: $(cat "$work/emulator.err")" >&2
        failures=$((failures + 1))
        report+=("$label: emulator did not start")
        emulator_pid=""
        return
    fi
    local envs=()
    mapfile -t envs < <(python3 -c 'import json, sys
for k, v in json.load(open(sys.argv[1]))["env"].items():
    print(f"{k}={v}")' "$line")
    local started=$SECONDS status=0
    env "${envs[@]}" PAPERCLIP_VENDOR_NODE="$VENDOR/node" NODE_PATH="$VENDOR/node/node_modules" \
        timeout 600 "$@" >"$log" 2>&1 || status=$?
    kill -TERM "$emulator_pid" 2>/dev/null || true
    wait "$emulator_pid" 2>/dev/null || true
    emulator_pid=""
    sed "s/^/  [$label] /" "$log"
    local tally
    tally="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 || true)"
    if [ -z "$tally" ] || [ "$status" -ne 0 ] || ! [[ "$tally" =~ ^[0-9]+\ passed,\ 0\ failed$ ]]; then
        failures=$((failures + 1))
    fi
    report+=("$label: ${tally:-no tally (exit $status)} in $((SECONDS - started))s")
}

shopt -s nullglob
for suite in tests/vendor/[a-z]*_*.py; do
    name="$(basename "$suite")"
    provider="${name%%_*}"
    wanted "$provider" || continue
    venvs=("$VENDOR"/venv-"$provider"-*)
    if [ "${#venvs[@]}" -eq 0 ]; then
        echo "vendor-suites: no venv for $provider under $VENDOR" >&2
        failures=$((failures + 1))
        report+=("$name: no venv")
        continue
    fi
    for venv in "${venvs[@]}"; do
        run_suite "$provider" "$name ${venv##*/venv-}" "$venv/bin/python" "$suite"
    done
done
for suite in tests/vendor/[a-z]*_*.mjs tests/vendor/[a-z]*_*.cjs; do
    name="$(basename "$suite")"
    wanted "${name%%_*}" || continue
    if ! command -v node >/dev/null 2>&1; then
        report+=("$name: skipped (no node)")
        continue
    fi
    # CommonJS suites find the pinned packages through NODE_PATH.
    run_suite "${name%%_*}" "$name" env NODE_PATH="$VENDOR/node/node_modules" node "$suite"
done

echo "vendor suites:"
printf '  %s\n' "${report[@]}"
if [ "$failures" -gt 0 ]; then
    echo "vendor-suites: $failures suite run(s) failed" >&2
    exit 1
fi
