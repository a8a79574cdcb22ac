#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine. Idempotent:
# a second run installs nothing and takes well under a second.
set -euo pipefail

need_apt=()
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v tar >/dev/null 2>&1 || need_apt+=(tar)
# The PostgreSQL lease store tests start a throwaway server (initdb/pg_ctl).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)

if [ "${#need_apt[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# sshd refuses to start as root without its privilege-separation directory.
if [ "$(id -u)" -eq 0 ] && [ ! -d /run/sshd ]; then
    mkdir -p -m 0755 /run/sshd
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest"
    cargo install --locked cargo-nextest >/dev/null
fi

# Dependency policy (deny.toml): licenses, bans, sources.
if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "setup: installing cargo-deny"
    cargo install --locked cargo-deny >/dev/null
fi

# Paperclip's plugin worker SDK (npm, pinned) for the real-plugin tests.
bash "$(dirname "$0")/plugin-sdk-setup.sh"
