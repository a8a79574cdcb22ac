// npm `modal` 0.11.x (V2 sandboxes by default) against `paperclip-env emulate modal`.
import { run } from './_modal_sdk.mjs'

await run(await import(`${process.env.PAPERCLIP_VENDOR_NODE}/node_modules/modal-0.11/dist/index.js`), 'modal 0.11', { v2: true })
