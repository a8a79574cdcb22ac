// Shared body of the `modal` npm SDK suites (libmodal JS) against
// `paperclip-env emulate modal`: MODAL_SERVER_URL, MODAL_TOKEN_ID and
// MODAL_TOKEN_SECRET come from the emulator's `env`. Each check runs the
// SDK's public API only; the tally line is what scripts/vendor-suites.sh reads.
import assert from 'node:assert/strict'

// `v2`: whether this SDK line creates V2 sandboxes (an id that is not
// `sb-` + 22 base62 characters) by default.
export async function run(sdk, label, { v2 }) {
  const { ModalClient } = sdk
  const modal = new ModalClient()
  let passed = 0
  let failed = 0
  const check = async (name, body) => {
    try {
      await body()
      passed++
      console.log(`ok   ${label}: ${name}`)
    } catch (error) {
      failed++
      console.log(`FAIL ${label}: ${name}: ${error?.stack ?? error}`)
    }
  }

  let app
  let image
  let sandbox
  await check('app from name (create if missing)', async () => {
    app = await modal.apps.fromName('paperclip-vendor-suite', { createIfMissing: true })
    assert.match(app.appId, /^ap-/)
  })
  await check('sandbox create from a registry image', async () => {
    image = modal.images.fromRegistry('alpine:3.21')
    sandbox = await modal.sandboxes.create(app, image, { timeoutMs: 600_000 })
    assert.match(sandbox.sandboxId, /^sb-/)
    assert.equal(!/^sb-[0-9A-Za-z]{22}$/.test(sandbox.sandboxId), v2, `id shape of ${sandbox.sandboxId}`)
  })
  await check('exec: stdout, stderr and exit code', async () => {
    const p = await sandbox.exec(['sh', '-c', 'printf out; printf err >&2; exit 3'])
    const [stdout, stderr, code] = await Promise.all([p.stdout.readText(), p.stderr.readText(), p.wait()])
    assert.equal(stdout, 'out')
    assert.equal(stderr, 'err')
    assert.equal(code, 3)
  })
  await check('exec: stdin written then closed', async () => {
    const p = await sandbox.exec(['sh', '-c', 'tr a-z A-Z; echo done >&2'])
    await p.stdin.writeText('hello stdin')
    await p.stdin.close()
    const [stdout, stderr, code] = await Promise.all([p.stdout.readText(), p.stderr.readText(), p.wait()])
    assert.equal(stdout, 'HELLO STDIN')
    assert.equal(stderr, 'done\n')
    assert.equal(code, 0)
  })
  await check('exec: multi-line output in order', async () => {
    const p = await sandbox.exec(['sh', '-c', 'for i in 1 2 3 4 5; do echo line-$i; done'])
    const [stdout, code] = await Promise.all([p.stdout.readText(), p.wait()])
    assert.equal(stdout, 'line-1\nline-2\nline-3\nline-4\nline-5\n')
    assert.equal(code, 0)
  })
  let again
  await check('lookup by id and exec on the found sandbox', async () => {
    again = await modal.sandboxes.fromId(sandbox.sandboxId)
    assert.equal(again.sandboxId, sandbox.sandboxId)
    const p = await again.exec(['sh', '-c', 'echo found'])
    const [stdout, code] = await Promise.all([p.stdout.readText(), p.wait()])
    assert.equal(stdout, 'found\n')
    assert.equal(code, 0)
  })
  await check('poll says running before terminate', async () => {
    assert.equal(await again.poll(), null)
  })
  await check('terminate, then wait reports 137', async () => {
    await sandbox.terminate()
    assert.equal(await again.wait(), 137)
  })
  await check('an unknown sandbox id is not found', async () => {
    const ghostId = sandbox.sandboxId.slice(0, -1) + (sandbox.sandboxId.endsWith('A') ? 'B' : 'A')
    // 0.7 looks the id up in fromId, 0.11 on first use.
    await assert.rejects(async () => (await modal.sandboxes.fromId(ghostId)).poll(), /not found/i)
  })
  if (typeof modal.close === 'function') modal.close()
  console.log(`${passed} passed, ${failed} failed`)
  process.exitCode = failed === 0 ? 0 : 1
}
