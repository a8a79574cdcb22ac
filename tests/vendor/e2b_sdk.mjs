// The `e2b` npm SDK against `paperclip-env emulate e2b` (its `env` and
// PAPERCLIP_VENDOR_NODE, the vendor node_modules prefix, exported by
// scripts/vendor-suites.sh).
import { run } from './_e2b_protocol.mjs'

await run(await import(`${process.env.PAPERCLIP_VENDOR_NODE}/node_modules/e2b/dist/index.mjs`))
