#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), then runs every
# check CI runs: formatting, lints, all tests, doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/paperclip-env/target}"
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo nextest run --workspace --all-features --no-fail-fast
cargo test --workspace --all-features --doc
