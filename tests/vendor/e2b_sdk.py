"""The `e2b` Python SDK against `paperclip-env emulate e2b` (E2B_API_URL,
E2B_SANDBOX_URL, E2B_API_KEY exported by scripts/vendor-suites.sh)."""

import e2b

from _e2b_protocol import run

run(e2b)
