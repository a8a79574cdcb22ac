#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), then runs every
# check CI runs: formatting, lints, all tests, doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/paperclip-env/target}"
bash scripts/setup.sh
bash scripts/target-guard.sh
cargo fmt --all -- --check
# Licenses, banned crates and sources (deny.toml). Advisories need the
# advisory database from GitHub, which CI cannot reach.
cargo deny --log-level error check licenses bans sources
cargo clippy --workspace --all-targets --all-features -- -D warnings
# Each provider feature on its own, so feature-gated code never depends on a
# neighbour's feature being enabled (about 30 s once built).
for feature in fake http e2b novita cloudflare daytona exe-dev ssh modal kubernetes; do
  cargo clippy --quiet -p paperclip-env-providers --features "$feature" -- -D warnings
done
cargo clippy --quiet -p paperclip-env-core -- -D warnings
cargo clippy --quiet -p paperclip-env-core --features plugin -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --workspace --all-features --no-deps
cargo nextest run --workspace --all-features --no-fail-fast
cargo test --workspace --all-features --doc
# Every example against the emulator it starts itself, never a real account
# (about 10 s once built).
for example in quickstart e2b novita daytona modal kubernetes cloudflare exe_dev ssh plugin; do
  env -u E2B_API_KEY -u NOVITA_API_KEY -u DAYTONA_API_KEY -u MODAL_TOKEN_ID -u KUBECONFIG \
    -u EXE_API_KEY -u PAPERCLIP_ENV_EXAMPLE_ENV \
    cargo run --quiet --all-features --example "$example" > /dev/null
done
# The vendors' own clients (pinned e2b, novita-sandbox and daytona SDKs,
# Python and npm) against `paperclip-env emulate` (about 40 s once installed;
# PAPERCLIP_ENV_VENDOR_SUITES=0 skips).
if [ "${PAPERCLIP_ENV_VENDOR_SUITES:-1}" != "0" ]; then
  bash scripts/vendor-suites.sh
fi
