// The `novita-sandbox` npm SDK against `paperclip-env emulate novita` (its
// `env` and PAPERCLIP_VENDOR_NODE exported by scripts/vendor-suites.sh).
import { run } from './_e2b_protocol.mjs'

await run(await import(`${process.env.PAPERCLIP_VENDOR_NODE}/node_modules/novita-sandbox/dist/index.mjs`))
