// Checks of the E2B protocol through an E2B-compatible npm SDK (`e2b`,
// `novita-sandbox`) against `paperclip-env emulate`: each suite file calls
// `run(sdk)`; one check per documented operation; prints
// `N passed, N failed` and exits non-zero on any failure.
import { existsSync } from 'node:fs'
import { randomUUID } from 'node:crypto'

export async function run(sdk) {
  const { Sandbox, CommandExitError, NotFoundError, TimeoutError } = sdk

  let passed = 0
  let failed = 0

  async function check(name, fn) {
    try {
      await fn()
      passed += 1
      console.log(`ok   ${name}`)
    } catch (error) {
      failed += 1
      console.log(`FAIL ${name}: ${error?.name}: ${error?.message}`)
    }
  }

  function expect(condition, message) {
    if (!condition) throw new Error(message)
  }

  const tag = randomUUID().slice(0, 8)
  let sbx

  await check('Sandbox.create with metadata, envs and timeout', async () => {
    sbx = await Sandbox.create('base', {
      timeoutMs: 120_000,
      metadata: { suite: tag, kind: 'main' },
      envs: { FROM_CREATE: 'create-value' },
    })
    expect(sbx.sandboxId, 'no sandbox id')
  })

  if (!sbx) {
    console.log(`${passed} passed, ${failed} failed`)
    process.exit(1)
  }

  await check('Sandbox.isRunning', async () => {
    expect(await sbx.isRunning(), 'not running')
  })

  await check('Sandbox.getInfo (startedAt, endAt, metadata)', async () => {
    const info = await sbx.getInfo()
    expect(info.sandboxId === sbx.sandboxId, info.sandboxId)
    expect(info.metadata.suite === tag, JSON.stringify(info.metadata))
    expect(info.endAt > info.startedAt, `${info.startedAt} .. ${info.endAt}`)
  })

  await check('commands.run: stdout, stderr and exit code 0', async () => {
    const result = await sbx.commands.run('echo hello; echo oops >&2')
    expect(result.stdout === 'hello\n', JSON.stringify(result.stdout))
    expect(result.stderr === 'oops\n', JSON.stringify(result.stderr))
    expect(result.exitCode === 0, result.exitCode)
  })

  await check('commands.run: non-zero exit throws CommandExitError', async () => {
    try {
      await sbx.commands.run('echo partial; exit 3')
    } catch (error) {
      expect(error instanceof CommandExitError, error?.name)
      expect(error.exitCode === 3, error.exitCode)
      expect(error.stdout === 'partial\n', JSON.stringify(error.stdout))
      return
    }
    throw new Error('no CommandExitError')
  })

  await check('commands.run: envs, create envVars, cwd, user and home', async () => {
    await sbx.files.makeDir('/home/user/work')
    const result = await sbx.commands.run('echo "$GREETING|$FROM_CREATE|$USER|$HOME"; pwd', {
      envs: { GREETING: 'hi' },
      cwd: '/home/user/work',
    })
    expect(result.stdout === 'hi|create-value|user|/home/user\n/home/user/work\n', JSON.stringify(result.stdout))
  })

  await check('commands.run: onStdout streams output', async () => {
    const seen = []
    await sbx.commands.run('printf a; sleep 0.2; printf b', { onStdout: (d) => seen.push(d) })
    expect(seen.join('') === 'ab', JSON.stringify(seen))
  })

  await check('commands.run: timeoutMs', async () => {
    try {
      await sbx.commands.run('sleep 30', { timeoutMs: 1000 })
    } catch (error) {
      expect(error instanceof TimeoutError, `${error?.name}: ${error?.message}`)
      return
    }
    throw new Error('no TimeoutError')
  })

  await check('commands.run(background) + sendStdin + wait', async () => {
    const handle = await sbx.commands.run('read line; echo got:$line', { background: true, stdin: true })
    await sbx.commands.sendStdin(handle.pid, 'first\n')
    const result = await handle.wait()
    expect(result.stdout === 'got:first\n', JSON.stringify(result.stdout))
  })

  await check('commands.list, commands.connect and commands.kill', async () => {
    const handle = await sbx.commands.run('sleep 60', { background: true })
    const pids = (await sbx.commands.list()).map((p) => p.pid)
    expect(pids.includes(handle.pid), `${handle.pid} not in ${pids}`)
    const attached = await sbx.commands.connect(handle.pid)
    expect(await sbx.commands.kill(handle.pid), 'kill returned false')
    await attached.wait().catch(() => {})
    expect(!(await sbx.commands.list()).map((p) => p.pid).includes(handle.pid), 'still listed')
  })

  await check('files.write + files.read (absolute and relative)', async () => {
    await sbx.files.write('/home/user/notes/a.txt', 'alpha')
    expect((await sbx.files.read('/home/user/notes/a.txt')) === 'alpha', 'absolute')
    await sbx.files.write('relative.txt', 'beta')
    expect((await sbx.files.read('/home/user/relative.txt')) === 'beta', 'relative against home')
  })

  await check('files.list, exists, getInfo, rename, remove', async () => {
    const names = (await sbx.files.list('/home/user/notes')).map((e) => e.name)
    expect(JSON.stringify(names) === '["a.txt"]', JSON.stringify(names))
    expect(await sbx.files.exists('/home/user/notes/a.txt'), 'exists')
    expect(!(await sbx.files.exists('/home/user/nope')), 'missing exists')
    const info = await sbx.files.getInfo('/home/user/notes/a.txt')
    expect(info.size === 5, info.size)
    await sbx.files.rename('/home/user/notes/a.txt', '/home/user/notes/b.txt')
    expect(await sbx.files.exists('/home/user/notes/b.txt'), 'renamed')
    await sbx.files.remove('/home/user/notes')
    expect(!(await sbx.files.exists('/home/user/notes/b.txt')), 'removed')
  })

  await check('files.read of a missing file throws NotFoundError', async () => {
    try {
      await sbx.files.read('/home/user/missing.txt')
    } catch (error) {
      expect(error instanceof NotFoundError, `${error?.name}: ${error?.message}`)
      return
    }
    throw new Error('no NotFoundError')
  })

  await check('files stay inside the sandbox', async () => {
    const marker = `/tmp/paperclip-vendor-js-${tag}`
    await sbx.files.write(marker, 'inside')
    expect(!existsSync(marker), "the SDK wrote the host's /tmp")
  })

  await check('Sandbox.list with a metadata filter', async () => {
    const other = await Sandbox.create('base', { timeoutMs: 60_000, metadata: { suite: tag, kind: 'other' } })
    try {
      const found = await Sandbox.list({ query: { metadata: { suite: tag, kind: 'main' } } }).nextItems()
      const ids = found.map((s) => s.sandboxId)
      expect(JSON.stringify(ids) === JSON.stringify([sbx.sandboxId]), JSON.stringify(ids))
    } finally {
      await other.kill()
    }
  })

  await check('Sandbox.connect and setTimeout', async () => {
    const again = await Sandbox.connect(sbx.sandboxId)
    expect((await again.commands.run('echo again')).stdout === 'again\n', 'command after connect')
    await again.setTimeout(300_000)
  })

  await check('pause, then connect resumes with files kept', async () => {
    await sbx.files.write('/home/user/kept.txt', 'kept')
    await sbx.pause()
    const resumed = await Sandbox.connect(sbx.sandboxId)
    expect((await resumed.files.read('/home/user/kept.txt')) === 'kept', 'files lost')
  })

  await check('kill', async () => {
    await sbx.kill()
    expect(!(await Sandbox.kill(sbx.sandboxId)), 'second kill found it')
  })

  console.log(`${passed} passed, ${failed} failed`)
  process.exit(failed ? 1 : 0)
}
