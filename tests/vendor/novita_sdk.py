"""The `novita-sandbox` Python SDK against `paperclip-env emulate novita`
(NOVITA_API_URL, NOVITA_SANDBOX_URL, NOVITA_API_KEY exported by
scripts/vendor-suites.sh). Its 2.1 line has no `commands.close_stdin`."""

import novita_sandbox.core as novita

from _e2b_protocol import run

run(novita, close_stdin=False)
