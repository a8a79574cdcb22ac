#!/usr/bin/env bash
# Installs the vendors' own clients the vendor-client suites run against the
# emulators (tests/vendor/), pinned, into a cache dir. Idempotent: a second
# run checks the pins and installs nothing.
#
#   ~/.cache/paperclip-env/vendor/venv-<suite>-<version>/  Python venv per pinned SDK
#                                                        (`e2b`, `novita-sandbox`, `daytona`, `kubernetes`)
#   ~/.cache/paperclip-env/vendor/node/                 npm packages (node_modules)
set -euo pipefail
cd "$(dirname "$0")/.."

VENDOR="${PAPERCLIP_ENV_VENDOR_DIR:-$HOME/.cache/paperclip-env/vendor}"
# The oldest 2.x line we promise (2.50.x still has the v1 routes) and the
# newest 2.x seen (v2-only control plane, HTTP/2 transport).
E2B_PY_VERSIONS=(2.50.0 2.63.0)
# PyPI `novita-sandbox` (the E2B protocol with Novita's profile).
NOVITA_PY_VERSIONS=(2.1.1)
# PyPI `daytona`: the newest checked and the one the Paperclip plugin was
# written against.
DAYTONA_PY_VERSIONS=(0.226.1 0.183.0)
# PyPI `kubernetes`: the official Python client (tests/vendor/kubernetes_client.py).
KUBERNETES_PY_VERSIONS=(37.0.2)
# npm: `e2b`, `novita-sandbox`, `@daytonaio/sdk`, and two lines of `modal`
# (libmodal JS) side by side under aliases: 0.7.x, which the Paperclip Modal
# plugin pins (V1 sandboxes), and 0.11.x (V2 sandboxes by default).
NPM_PACKAGES=(e2b@2.51.0 novita-sandbox@2.1.1 @daytonaio/sdk@0.218.0
    modal-0.7@npm:modal@0.7.6 modal-0.11@npm:modal@0.11.1)

mkdir -p "$VENDOR"

# python_venv <suite prefix> <PyPI package> <version>
python_venv() {
    local venv="$VENDOR/venv-$1-$3"
    if [ -x "$venv/bin/python" ] &&
        "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$2') != '$3')" 2>/dev/null; then
        return
    fi
    echo "vendor-setup: $2 $3 (PyPI) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$2==$3"
}
for version in "${E2B_PY_VERSIONS[@]}"; do
    python_venv e2b e2b "$version"
done
for version in "${NOVITA_PY_VERSIONS[@]}"; do
    python_venv novita novita-sandbox "$version"
done
for version in "${DAYTONA_PY_VERSIONS[@]}"; do
    python_venv daytona daytona "$version"
done
for version in "${KUBERNETES_PY_VERSIONS[@]}"; do
    python_venv kubernetes kubernetes "$version"
done

if command -v npm >/dev/null 2>&1; then
    node_dir="$VENDOR/node"
    mkdir -p "$node_dir"
    [ -f "$node_dir/package.json" ] || echo '{"name":"paperclip-env-vendor","private":true,"type":"module"}' >"$node_dir/package.json"
    missing=()
    for spec in "${NPM_PACKAGES[@]}"; do
        # `alias@npm:package@version` installs under the alias.
        case "$spec" in
        *@npm:*) name="${spec%%@npm:*}" ;;
        *) name="${spec%@*}" ;;
        esac
        want="${spec##*@}"
        have="$(node -e "try{console.log(require('$node_dir/node_modules/$name/package.json').version)}catch(e){}" 2>/dev/null || true)"
        [ "$have" = "$want" ] || missing+=("$spec")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "vendor-setup: npm ${missing[*]} into $node_dir"
        npm install --silent --no-audit --no-fund --prefix "$node_dir" "${missing[@]}" >/dev/null
    fi
else
    echo "vendor-setup: npm not found; the .mjs suites will be skipped" >&2
fi
