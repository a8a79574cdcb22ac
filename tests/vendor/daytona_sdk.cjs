#!/usr/bin/env node
// Daytona's official TypeScript SDK against a Daytona API (the emulator).
//
// Pinned SDK: @daytonaio/sdk@0.218.0 (`npm install @daytonaio/sdk@0.218.0`
// next to this file, or anywhere on NODE_PATH: CommonJS so NODE_PATH works).
//
// Reads DAYTONA_API_URL and DAYTONA_API_KEY from the environment, runs one
// check per SDK operation the emulator serves (the same list as
// daytona_sdk.py), prints `N passed, N failed` and exits non-zero when a
// check fails. Every sandbox it creates is deleted at the end.
'use strict'

const SDK_VERSION = '0.218.0'

let sdk
try {
  sdk = require('@daytonaio/sdk')
} catch (error) {
  console.log(`the @daytonaio/sdk package is not installed (npm install @daytonaio/sdk@${SDK_VERSION}): ${error.message}`)
  console.log('0 passed, 1 failed')
  process.exit(1)
}

let passed = 0
let failed = 0

async function check(name, fn) {
  try {
    await fn()
    passed += 1
    console.log(`pass ${name}`)
    return true
  } catch (error) {
    failed += 1
    console.log(`FAIL ${name}: ${error && error.stack ? error.stack.split('\n').slice(0, 4).join('\n') : error}`)
    return false
  }
}

function expect(actual, wanted, what) {
  const a = JSON.stringify(actual)
  const w = JSON.stringify(wanted)
  if (a !== w) throw new Error(`${what}: expected ${w}, got ${a}`)
}

async function waitFor(predicate, what, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    const value = await predicate()
    if (value) return value
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`timed out waiting for ${what}`)
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function main() {
  const apiUrl = process.env.DAYTONA_API_URL
  const apiKey = process.env.DAYTONA_API_KEY
  if (!apiUrl || !apiKey) {
    console.log('DAYTONA_API_URL and DAYTONA_API_KEY must be set')
    console.log('0 passed, 1 failed')
    return 1
  }
  const client = new sdk.Daytona({ apiKey, apiUrl, target: 'us' })
  const runLabel = `sdk-check-${Math.random().toString(16).slice(2, 10)}`
  const created = []
  let sandbox

  const ok = await check('create (snapshot params, labels, env)', async () => {
    sandbox = await client.create({ labels: { suite: runLabel }, envVars: { FROM_CREATE: 'yes' }, autoStopInterval: 15 }, { timeout: 60 })
    created.push(sandbox)
    expect(sandbox.state, 'started', 'state')
  })
  if (!ok) {
    console.log(`${passed} passed, ${failed} failed`)
    return 1
  }
  const proc = sandbox.process
  const fs = sandbox.fs
  const finished = (sid, cid) => waitFor(async () => (await proc.getSessionCommand(sid, cid)).exitCode !== undefined, 'exit code')

  const checks = [
    ['get', async () => {
      const again = await client.get(sandbox.id)
      expect(again.id, sandbox.id, 'id')
      expect(again.labels.suite, runLabel, 'label')
    }],
    ['list with a label filter', async () => {
      const found = []
      for await (const s of client.list({ labels: { suite: runLabel } })) found.push(s.id)
      expect(found, [sandbox.id], 'sandboxes with the run label')
    }],
    ['work and home dirs', async () => {
      const work = await sandbox.getWorkDir()
      const home = await sandbox.getUserHomeDir()
      if (!work || !home) throw new Error(`empty dirs: ${work} ${home}`)
    }],
    ['process.executeCommand with cwd and env', async () => {
      await fs.createFolder('sub', '755')
      const r = await proc.executeCommand('pwd; echo $FOO $FROM_CREATE', 'sub', { FOO: 'bar' })
      expect(r.exitCode, 0, 'exit code')
      const lines = r.result.trim().split('\n')
      expect(lines[lines.length - 1], 'bar yes', 'env')
      if (!lines[0].endsWith('/sub')) throw new Error(`cwd not honoured: ${lines[0]}`)
    }],
    ['process.executeCommand exit code', async () => {
      expect((await proc.executeCommand('exit 7')).exitCode, 7, 'exit code')
    }],
    ['process.executeCommand timeout', async () => {
      let threw = false
      try {
        await proc.executeCommand('sleep 10', undefined, undefined, 1)
      } catch {
        threw = true
      }
      if (!threw) throw new Error('a timed-out command did not fail')
    }],
    ['session: sync exec keeps shell state', async () => {
      await proc.createSession('s1')
      await proc.executeSessionCommand('s1', { command: 'cd sub && export KEPT=1' })
      const r = await proc.executeSessionCommand('s1', { command: 'pwd; echo kept=$KEPT; echo oops >&2' })
      expect(r.exitCode, 0, 'exit code')
      if (!r.stdout.endsWith('/sub\nkept=1\n')) throw new Error(`session state not kept: ${JSON.stringify(r.stdout)}`)
      expect(r.stderr, 'oops\n', 'stderr')
    }],
    ['session: async exec, status, logs', async () => {
      const r = await proc.executeSessionCommand('s1', { command: "printf 'a\\nb'; printf e >&2", runAsync: true })
      await finished('s1', r.cmdId)
      const logs = await proc.getSessionCommandLogs('s1', r.cmdId)
      expect(logs.stdout, 'a\nb\n', 'stdout (per-line framing)')
      expect(logs.stderr, 'e\n', 'stderr')
    }],
    ['session: streamed logs', async () => {
      const r = await proc.executeSessionCommand('s1', { command: 'echo one; sleep 0.3; echo two', runAsync: true })
      const out = []
      await proc.getSessionCommandLogs('s1', r.cmdId, (chunk) => out.push(chunk), () => {})
      expect(out.join(''), 'one\ntwo\n', 'streamed stdout')
    }],
    ['session: send input', async () => {
      const r = await proc.executeSessionCommand('s1', { command: 'read v; echo got-$v', runAsync: true })
      await sleep(300)
      expect((await proc.getSessionCommand('s1', r.cmdId)).exitCode, undefined, 'waits for input')
      await proc.sendSessionCommandInput('s1', r.cmdId, 'x')
      await finished('s1', r.cmdId)
      const logs = await proc.getSessionCommandLogs('s1', r.cmdId)
      if (!logs.stdout.includes('got-x')) throw new Error(`input not delivered: ${JSON.stringify(logs.stdout)}`)
    }],
    ['session: get, list, delete', async () => {
      const session = await proc.getSession('s1')
      expect(session.sessionId, 's1', 'session id')
      if (session.commands.length < 4) throw new Error(`commands missing: ${JSON.stringify(session.commands)}`)
      if (!(await proc.listSessions()).some((s) => s.sessionId === 's1')) throw new Error('listSessions misses s1')
      await proc.deleteSession('s1')
      if ((await proc.listSessions()).some((s) => s.sessionId === 's1')) throw new Error('the session survived its delete')
    }],
    ['files: upload, download, list, delete', async () => {
      await fs.uploadFile(Buffer.from('hello'), 'up/hello.txt')
      await fs.uploadFiles([{ source: Buffer.from('two'), destination: 'up/two.txt' }])
      expect((await fs.downloadFile('up/hello.txt')).toString(), 'hello', 'download')
      expect((await fs.listFiles('up')).map((f) => f.name).sort(), ['hello.txt', 'two.txt'], 'listFiles')
      let refused = false
      try {
        await fs.deleteFile('up')
      } catch {
        refused = true
      }
      if (!refused) throw new Error('deleting a directory without recursive succeeded')
      await fs.deleteFile('up', true)
      if ((await fs.listFiles('.')).some((f) => f.name === 'up')) throw new Error('the directory survived its recursive delete')
    }],
    ['labels and intervals', async () => {
      const labels = await sandbox.setLabels({ suite: runLabel, extra: '1' })
      expect(labels.extra, '1', 'labels')
      await sandbox.setAutostopInterval(30)
      expect(sandbox.autoStopInterval, 30, 'auto-stop interval')
      await sandbox.setAutoDeleteInterval(120)
      expect(sandbox.autoDeleteInterval, 120, 'auto-delete interval')
    }],
    ['preview link', async () => {
      const link = await sandbox.getPreviewLink(3000)
      if (!link.url || !link.token) throw new Error(`preview link: ${JSON.stringify(link)}`)
    }],
    ['stop and start', async () => {
      await sandbox.stop(30)
      await sandbox.refreshData()
      expect(sandbox.state, 'stopped', 'state after stop')
      await sandbox.start(30)
      await sandbox.refreshData()
      expect(sandbox.state, 'started', 'state after start')
      expect((await proc.executeCommand('echo back')).result.trim(), 'back', 'exec after restart')
    }],
    ['archive and restore', async () => {
      await sandbox.stop(30)
      await sandbox.archive()
      await sandbox.refreshData()
      expect(sandbox.state, 'archived', 'state after archive')
      await sandbox.start(30)
      expect((await proc.executeCommand('echo restored')).result.trim(), 'restored', 'exec after restore')
    }],
    ['ssh access', async () => {
      const access = await sandbox.createSshAccess(5)
      if (!access.token || !access.sshCommand) throw new Error(`ssh access: ${JSON.stringify(access)}`)
    }],
  ]
  for (const [name, fn] of checks) await check(name, fn)

  await check('delete', async () => {
    while (created.length) await client.delete(created.pop())
    const left = []
    for await (const s of client.list({ labels: { suite: runLabel } })) left.push(s.id)
    expect(left, [], 'sandboxes left')
  })
  for (const s of created) {
    try {
      await client.delete(s)
    } catch {
      // best-effort cleanup
    }
  }
  console.log(`${passed} passed, ${failed} failed`)
  return failed ? 1 : 0
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.log(`the check script failed: ${error && error.stack}`)
    console.log(`${passed} passed, ${failed + 1} failed`)
    process.exit(1)
  },
)
