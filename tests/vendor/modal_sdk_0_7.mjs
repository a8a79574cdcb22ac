// npm `modal` 0.7.x (V1 sandboxes; what @paperclipai/plugin-modal pins) against `paperclip-env emulate modal`.
import { run } from './_modal_sdk.mjs'

await run(await import(`${process.env.PAPERCLIP_VENDOR_NODE}/node_modules/modal-0.7/dist/index.js`), 'modal 0.7', { v2: false })
