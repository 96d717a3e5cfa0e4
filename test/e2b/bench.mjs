// Timings of the e2b SDK against smolvm's E2B-compatible API, printed as
// one JSON line: Sandbox.create(), create → the first output of
// commands.run, and commands.run('true') on a running sandbox. Run by
// internal/e2b's BenchmarkSDK (which also times vm.Run in the same run):
//   go test -run '^$' -bench SDK -benchtime 1x ./internal/e2b/
import { Sandbox } from 'e2b'

const creates = Number(process.env.BENCH_CREATES ?? 10)
const commands = Number(process.env.BENCH_COMMANDS ?? 50)
const out = { create_ms: [], first_output_ms: [], command_ms: [] }

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
console.log(JSON.stringify(out))
