// Drives smolvm's MCP server with the official TypeScript client
// (@modelcontextprotocol/sdk), as an agent host would.
//
//   node client.mjs [--bench N] stdio SMOLVM [ARGS...]   # spawns `SMOLVM ARGS...` (e.g. bin/smolvm mcp)
//   node client.mjs [--bench N] http URL                 # e.g. http://127.0.0.1:7421/mcp; key from $SMOLVM_API_KEY
//
// It lists the tools, runs a one-shot command, goes through create → write →
// run → read → delete, asks for an unknown sandbox and lets a command time
// out; with --bench N it also times N one-shot `echo` calls and N `echo`
// calls in one sandbox. Its summary is one JSON object on stdout; progress
// goes to stderr. It exits 1 when a check fails.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

let args = process.argv.slice(2);
let bench = 0;
if (args[0] === "--bench") {
  bench = Number(args[1]);
  args = args.slice(2);
}
const [mode, target, ...rest] = args;

let transport;
if (mode === "stdio") {
  transport = new StdioClientTransport({ command: target, args: rest, env: process.env, stderr: "inherit" });
} else if (mode === "http") {
  const headers = process.env.SMOLVM_API_KEY ? { Authorization: `Bearer ${process.env.SMOLVM_API_KEY}` } : {};
  transport = new StreamableHTTPClientTransport(new URL(target), { requestInit: { headers } });
} else {
  console.error("usage: node client.mjs [--bench N] stdio SMOLVM [ARGS...] | http URL");
  process.exit(2);
}

const client = new Client({ name: "smolvm-ts-test", version: "1.0.0" });
const checks = [];
let failed = false;

async function check(name, fn) {
  const t0 = performance.now();
  try {
    const detail = await fn();
    checks.push({ name, ok: true, ms: Math.round(performance.now() - t0), ...(detail ? { detail } : {}) });
    console.error(`ok   ${name}`);
  } catch (e) {
    failed = true;
    checks.push({ name, ok: false, error: String(e?.message ?? e) });
    console.error(`FAIL ${name}: ${e?.stack ?? e}`);
  }
}

function expect(cond, what) {
  if (!cond) throw new Error(what);
}

// call calls a tool; the client validates structuredContent against the
// tool's output schema.
async function call(name, args, { timeout = 180000 } = {}) {
  return client.callTool({ name, arguments: args }, undefined, { timeout });
}

function text(res) {
  return (res.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join("\n");
}

async function ok(name, args) {
  const res = await call(name, args);
  expect(!res.isError, `${name}: tool error: ${text(res)}`);
  return res.structuredContent;
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

await client.connect(transport);
const summary = { transport: mode, protocol: transport.protocolVersion ?? null, server: client.getServerVersion() };

await check("list tools", async () => {
  const { tools } = await client.listTools();
  const names = tools.map((t) => t.name).sort();
  for (const want of ["create_sandbox", "run_command", "write_file", "read_file", "list_files", "list_sandboxes", "delete_sandbox", "expose_port", "snapshot_sandbox"]) {
    expect(names.includes(want), `tool ${want} missing from ${names}`);
  }
  return `${names.length} tools`;
});

await check("one-shot run_command", async () => {
  const out = await ok("run_command", { command: "echo hello from $(uname -s)" });
  expect(out.stdout === "hello from Linux\n" && out.exit_code === 0, JSON.stringify(out));
  expect(out.sandbox_id === undefined, "a one-shot run names a sandbox");
});

let id;
await check("create → write → run → read → delete", async () => {
  const sb = await ok("create_sandbox", {});
  id = sb.sandbox_id;
  expect(id && sb.state === "running" && sb.session === true, JSON.stringify(sb));
  await ok("write_file", { sandbox_id: id, path: "/root/app/main.sh", content: "echo ran $1\n" });
  const run = await ok("run_command", { sandbox_id: id, command: "sh /root/app/main.sh ok > /root/app/out.txt; cat /root/app/out.txt" });
  expect(run.stdout === "ran ok\n", JSON.stringify(run));
  const read = await ok("read_file", { sandbox_id: id, path: "/root/app/out.txt" });
  expect(read.content === "ran ok\n" && read.encoding === "utf8", JSON.stringify(read));
  const ls = await ok("list_files", { sandbox_id: id, path: "/root/app" });
  expect(ls.entries.map((e) => e.name).join(",") === "main.sh,out.txt", JSON.stringify(ls));
  const del = await ok("delete_sandbox", { sandbox_id: id });
  expect(del.deleted === true, JSON.stringify(del));
});

await check("unknown sandbox is a tool error", async () => {
  const res = await call("run_command", { sandbox_id: id ?? "nope", command: "true" });
  expect(res.isError && /list_sandboxes/.test(text(res)), `isError ${res.isError}: ${text(res)}`);
  return text(res);
});

await check("timeout is a tool error", async () => {
  const res = await call("run_command", { command: "echo before; sleep 30", timeout_s: 1 });
  const out = res.structuredContent;
  expect(res.isError && out?.timed_out === true && out.exit_code === -1 && out.stdout === "before\n", JSON.stringify(res));
  return text(res);
});

if (bench > 0) {
  await check(`bench ${bench} × echo`, async () => {
    const oneShot = [];
    for (let i = 0; i < bench; i++) {
      const t0 = performance.now();
      await ok("run_command", { command: "echo hi" });
      oneShot.push(performance.now() - t0);
    }
    const sb = await ok("create_sandbox", {});
    const inSandbox = [];
    for (let i = 0; i < bench; i++) {
      const t0 = performance.now();
      await ok("run_command", { sandbox_id: sb.sandbox_id, command: "echo hi" });
      inSandbox.push(performance.now() - t0);
    }
    await ok("delete_sandbox", { sandbox_id: sb.sandbox_id });
    summary.bench = {
      calls: bench,
      one_shot_median_ms: Number(median(oneShot).toFixed(1)),
      in_sandbox_median_ms: Number(median(inSandbox).toFixed(1)),
    };
  });
}

await check("no sandbox of this session left", async () => {
  const { sandboxes } = await ok("list_sandboxes", {});
  const mine = sandboxes.filter((s) => s.session);
  expect(mine.length === 0, JSON.stringify(mine));
});

if (mode === "http") {
  await transport.terminateSession();
}
await client.close();
summary.checks = checks;
summary.passed = checks.filter((c) => c.ok).length;
summary.failed = checks.filter((c) => !c.ok).length;
console.log(JSON.stringify(summary));
process.exit(failed ? 1 : 0);
