#!/usr/bin/env bash
# Installs Paperclip's published plugin worker SDK, pinned, for the tests
# that run a real plugin under the SDK host
# (crates/paperclip-env-testkit/tests/sdk_plugin.rs). Idempotent: a second
# run checks the pin and installs nothing.
#
#   ~/.cache/paperclip-env/vendor/plugin-sdk-<version>/node_modules
set -euo pipefail

VERSION=2026.916.1
VENDOR="${PAPERCLIP_ENV_VENDOR_DIR:-$HOME/.cache/paperclip-env/vendor}"
dir="$VENDOR/plugin-sdk-$VERSION"
pkg="$dir/node_modules/@paperclipai/plugin-sdk/package.json"

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "plugin-sdk-setup: node/npm not found; the plugin-sdk tests will fail until Node.js is installed" >&2
    exit 0
fi
have="$(node -e "try{console.log(require('$pkg').version)}catch(e){}" 2>/dev/null || true)"
if [ "$have" = "$VERSION" ]; then
    exit 0
fi
echo "plugin-sdk-setup: @paperclipai/plugin-sdk $VERSION into $dir"
mkdir -p "$dir"
[ -f "$dir/package.json" ] || echo '{"name":"paperclip-env-plugin-sdk","private":true,"type":"module"}' >"$dir/package.json"
npm install --silent --no-audit --no-fund --prefix "$dir" "@paperclipai/plugin-sdk@$VERSION" >/dev/null
