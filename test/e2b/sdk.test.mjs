// The official e2b SDK (npm e2b, pinned in package.json) against smolvm's
// E2B-compatible API, unchanged: the Go test TestSDK (internal/e2b) starts
// the server and runs `node --test` here with E2B_API_KEY, E2B_API_URL and
// E2B_SANDBOX_URL pointing at it.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import {
  Sandbox, CommandExitError, TimeoutError, AuthenticationError, NotFoundError,
} from 'e2b'

const run = randomBytes(4).toString('hex') // tells this run's sandboxes apart
const made = []
async function create(opts = {}) {
  const sbx = await Sandbox.create({ timeoutMs: 600_000, ...opts, metadata: { run, ...(opts.metadata ?? {}) } })
  made.push(sbx)
  return sbx
}
after(async () => {
  for (const sbx of made) await sbx.kill().catch(() => {})
})

test('create with metadata and envs; getInfo', async () => {
  const sbx = await create({ metadata: { role: 'info' }, envs: { SANDBOX_WIDE: 'yes' } })
  const info = await sbx.getInfo()
  assert.equal(info.sandboxId, sbx.sandboxId)
  assert.equal(info.templateId, 'base')
  assert.equal(info.metadata.role, 'info')
  assert.equal(info.state, 'running')
  assert.ok(info.endAt > info.startedAt)
  const r = await sbx.commands.run('echo $SANDBOX_WIDE')
  assert.equal(r.stdout, 'yes\n')
})

test('commands: streaming, cwd, env, exit codes, timeouts, stdin', async () => {
  const sbx = await create()
  const chunks = []
  const r = await sbx.commands.run('for i in 1 2 3; do echo line$i; sleep 0.2; done; echo oops >&2', {
    onStdout: (d) => chunks.push(d),
  })
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'line1\nline2\nline3\n')
  assert.equal(r.stderr, 'oops\n')
  assert.ok(chunks.length >= 2, `output came in ${chunks.length} chunk(s), want it streamed`)
  assert.equal(chunks.join(''), r.stdout)

  const w = await sbx.commands.run('pwd; echo $GREETING', { cwd: '/tmp', envs: { GREETING: 'hi' } })
  assert.equal(w.stdout, '/tmp\nhi\n')

  await assert.rejects(sbx.commands.run('echo partial; exit 7'), (err) => {
    assert.ok(err instanceof CommandExitError, `got ${err}`)
    assert.equal(err.exitCode, 7)
    assert.equal(err.stdout, 'partial\n')
    return true
  })

  await assert.rejects(sbx.commands.run('sleep 60', { timeoutMs: 1500 }), (err) => {
    assert.ok(err instanceof TimeoutError, `got ${err}`)
    return true
  })

  const h = await sbx.commands.run('read a; read b; echo "$a+$b"; cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(h.pid, 'one\n')
  await h.sendStdin('two\nthree\n')
  await h.closeStdin()
  const done = await h.wait()
  assert.equal(done.stdout, 'one+two\nthree\n')
})

test('background commands: list, disconnect, connect, kill', async () => {
  const sbx = await create()
  const h = await sbx.commands.run('echo started; sleep 600', { background: true })
  const listed = await sbx.commands.list()
  const p = listed.find((x) => x.pid === h.pid)
  assert.ok(p, `pid ${h.pid} not in ${JSON.stringify(listed)}`)
  assert.equal(p.cmd, '/bin/bash')
  await h.disconnect()
  assert.ok((await sbx.commands.list()).some((x) => x.pid === h.pid), 'a disconnected command must keep running')
  const again = await sbx.commands.connect(h.pid)
  assert.equal(await sbx.commands.kill(h.pid), true)
  await assert.rejects(again.wait(), (err) => err instanceof CommandExitError)
  assert.ok(!(await sbx.commands.list()).some((x) => x.pid === h.pid))
  assert.equal(await sbx.commands.kill(h.pid), false)
})

test('pty: an interactive shell, input, resize, kill', async () => {
  const sbx = await create()
  let seen = ''
  let resolve
  const got = new Promise((r) => { resolve = r })
  const term = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => {
    seen += new TextDecoder().decode(d)
    if (seen.includes('cols=100')) resolve()
  } })
  await sbx.pty.resize(term.pid, { cols: 100, rows: 30 })
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('echo cols=$(stty size | cut -d" " -f2)\n'))
  await got
  assert.equal(await sbx.pty.kill(term.pid), true)
  await assert.rejects(term.wait(), (err) => err instanceof CommandExitError)
})

test('files: write and read a few MiB, list, exists, makeDir, rename, remove', async () => {
  const sbx = await create()
  const data = randomBytes(3 * 1024 * 1024 + 5)
  const info = await sbx.files.write('/tmp/data/big.bin', data)
  assert.equal(info.path, '/tmp/data/big.bin')
  const back = await sbx.files.read('/tmp/data/big.bin', { format: 'bytes' })
  assert.equal(Buffer.compare(Buffer.from(back), data), 0, 'bytes read back differ')
  await sbx.files.write('/tmp/data/small.txt', 'hello', { useOctetStream: true })
  assert.equal(await sbx.files.read('/tmp/data/small.txt'), 'hello')
  await sbx.files.write([{ path: '/tmp/data/a.txt', data: 'A' }, { path: '/tmp/data/b.txt', data: 'B' }])
  assert.equal(await sbx.files.read('/tmp/data/b.txt'), 'B')

  assert.equal(await sbx.files.exists('/tmp/data/small.txt'), true)
  assert.equal(await sbx.files.exists('/tmp/data/none'), false)
  assert.equal(await sbx.files.makeDir('/tmp/data/sub/deeper'), true)
  assert.equal(await sbx.files.makeDir('/tmp/data/sub/deeper'), false)
  const moved = await sbx.files.rename('/tmp/data/small.txt', '/tmp/data/sub/moved.txt')
  assert.equal(moved.path, '/tmp/data/sub/moved.txt')
  const names = (await sbx.files.list('/tmp/data')).map((e) => `${e.name}:${e.type}`).sort()
  assert.deepEqual(names, ['a.txt:file', 'b.txt:file', 'big.bin:file', 'sub:dir'])
  const st = await sbx.files.getInfo('/tmp/data/big.bin')
  assert.equal(st.size, data.length)
  await sbx.files.remove('/tmp/data/sub')
  assert.equal(await sbx.files.exists('/tmp/data/sub/moved.txt'), false)
  await assert.rejects(sbx.files.read('/tmp/data/sub/moved.txt'), (err) => err instanceof NotFoundError)
})

test('files: watchDir reports a new file', async () => {
  const sbx = await create()
  await sbx.files.makeDir('/tmp/watched')
  let resolve
  const seen = new Promise((r) => { resolve = r })
  const handle = await sbx.files.watchDir('/tmp/watched', (ev) => {
    if (ev.name === 'new.txt' && ev.type === 'create') resolve()
  })
  await sbx.files.write('/tmp/watched/new.txt', 'x')
  await seen
  await handle.stop()
})

test('files: a recursive watchDir reports renames, removes and a new subfolder\'s files', async () => {
  const sbx = await create()
  await sbx.files.makeDir('/tmp/tree')
  const events = []
  let wake = () => {}
  const handle = await sbx.files.watchDir('/tmp/tree', (ev) => { events.push(`${ev.type} ${ev.name}`); wake() }, { recursive: true })
  const until = async (want) => {
    while (!events.includes(want)) await new Promise((r) => { wake = r })
  }
  await sbx.commands.run('echo a > /tmp/tree/a && mv /tmp/tree/a /tmp/tree/b && rm /tmp/tree/b && mkdir -p /tmp/tree/sub && echo x > /tmp/tree/sub/x')
  for (const want of ['create a', 'rename a', 'create b', 'remove b', 'create sub', 'create sub/x']) await until(want)
  await handle.stop()
})

test('list by metadata, connect, kill', async () => {
  const a = await create({ metadata: { pick: 'me' } })
  await create({ metadata: { pick: 'not-me' } })
  const page = await Sandbox.list({ query: { metadata: { run, pick: 'me' } } }).nextItems()
  assert.deepEqual(page.map((s) => s.sandboxId), [a.sandboxId])

  const same = await Sandbox.connect(a.sandboxId)
  assert.equal((await same.commands.run('echo via-connect')).stdout, 'via-connect\n')
  assert.equal(await same.isRunning(), true)

  assert.equal(await a.kill(), true)
  assert.equal(await Sandbox.kill(a.sandboxId), false)
  await assert.rejects(Sandbox.getInfo(a.sandboxId), (err) => err instanceof NotFoundError)
  assert.equal(await a.isRunning(), false)
})

test('the sandbox timeout expires; setTimeout moves it', async () => {
  const sbx = await create({ timeoutMs: 3_000 })
  await sbx.setTimeout(600_000)
  const info = await sbx.getInfo()
  assert.ok(info.endAt - Date.now() > 500_000, `endAt ${info.endAt} after setTimeout(600 s)`)
  await sbx.setTimeout(2_000)
  const deadline = Date.now() + 120_000
  while (await sbx.isRunning()) {
    assert.ok(Date.now() < deadline, 'sandbox still running 2 minutes after its timeout')
    await new Promise((r) => setTimeout(r, 250))
  }
  await assert.rejects(sbx.getInfo(), (err) => err instanceof NotFoundError)
})

test('a wrong API key is refused', async () => {
  await assert.rejects(Sandbox.create({ apiKey: 'wrong-key' }), (err) => err instanceof AuthenticationError)
  await assert.rejects(Sandbox.list({ apiKey: 'wrong-key' }).nextItems(), (err) => err instanceof AuthenticationError)
})
