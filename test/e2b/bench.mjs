// Timings of the e2b SDK against smolvm's E2B-compatible API, printed as
// one JSON line: Sandbox.create(), create → the first output of
// commands.run, commands.run('true') on a running sandbox, and N sandboxes
// created at once (each then runs a command): wall time and failures. Run by
// internal/e2b's BenchmarkSDK (which also times vm.Run in the same run):
//   go test -run '^$' -bench SDK -benchtime 1x ./internal/e2b/
import { Sandbox } from 'e2b'

const creates = Number(process.env.BENCH_CREATES ?? 10)
const commands = Number(process.env.BENCH_COMMANDS ?? 50)
const concurrent = Number(process.env.BENCH_CONCURRENT ?? 20)
const out = { create_ms: [], first_output_ms: [], command_ms: [], concurrent_wall_ms: [], concurrent_failures: [] }

for (let i = 0; i < creates; i++) {
  const t0 = performance.now()
  const sbx = await Sandbox.create({ timeoutMs: 300_000 })
  const t1 = performance.now()
  let first
  await sbx.commands.run('echo hi', { onStdout: () => { first ??= performance.now() } })
  out.create_ms.push(t1 - t0)
  out.first_output_ms.push(first - t0)
  if (i === 0) {
    for (let j = 0; j < commands; j++) {
      const c0 = performance.now()
      await sbx.commands.run('true')
      out.command_ms.push(performance.now() - c0)
    }
  }
  await sbx.kill()
}
if (concurrent > 0) {
  const t0 = performance.now()
  const results = await Promise.allSettled(Array.from({ length: concurrent }, async () => {
    const sbx = await Sandbox.create({ timeoutMs: 300_000 })
    try {
      const r = await sbx.commands.run('echo ok')
      if (r.stdout !== 'ok\n') throw new Error(`output ${r.stdout}`)
    } finally {
      await sbx.kill()
    }
  }))
  out.concurrent_wall_ms.push(performance.now() - t0)
  const failed = results.filter((r) => r.status === 'rejected')
  out.concurrent_failures.push(failed.length)
  for (const f of failed) console.error(String(f.reason))
}
console.log(JSON.stringify(out))
