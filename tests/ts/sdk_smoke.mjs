// The official TypeScript SDK (npm tensorlake) against a `sandboxd host`, unchanged.
// Run by tests/test_typescript_sdk.py with TENSORLAKE_API_URL set; prints one JSON line.
import { Sandbox } from "tensorlake";

const apiUrl = process.env.TENSORLAKE_API_URL;
const out = {};
const sbx = await Sandbox.create({ apiUrl, cpus: 1, memoryMb: 256, name: "ts-smoke" });
try {
  out.sandboxId = sbx.sandboxId;
  const r = await sbx.run("sh", { args: ["-c", "echo hello from ts; echo oops >&2; exit 3"] });
  out.run = { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr };
  await sbx.writeFile("/tmp/ts.txt", new TextEncoder().encode("written by ts"));
  out.readBack = new TextDecoder().decode(await sbx.readFile("/tmp/ts.txt"));
  const p = await sbx.startProcess("sleep", { args: ["300"] });
  out.started = { pid: p.pid, command: p.command };
  out.processes = (await sbx.listProcesses()).map((x) => ({ pid: x.pid, command: x.command, status: x.status }));
  out.listed = (await Sandbox.list({ apiUrl })).map((s) => ({ id: s.sandboxId, status: s.status }));
} finally {
  await sbx.terminate();
}
out.afterTerminate = (await Sandbox.list({ apiUrl })).filter((s) => s.sandboxId === out.sandboxId).map((s) => s.status);
console.log(JSON.stringify(out));
