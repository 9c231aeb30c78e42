// Deploys an image and prints its progress, one line per update.
//
//   node dist/example.js --app hello --image stevedore-test/web:1 --port 8080
import { parseArgs } from "node:util";
import { Stevedore, type ProgressUpdate } from "./client.js";

const { values } = parseArgs({
  options: {
    server: { type: "string", default: "127.0.0.1:50051" },
    app: { type: "string" },
    image: { type: "string" },
    port: { type: "string", multiple: true, default: [] },
    token: { type: "string" },
  },
});
if (!values.app || !values.image) {
  console.error("usage: example.js --app APP --image IMAGE [--port N]... [--server ADDR] [--token T]");
  process.exit(2);
}

const client = new Stevedore(values.server, { token: values.token });
let last: ProgressUpdate | undefined;
for await (const u of client.deploy({
  app: values.app,
  image: values.image,
  ports: (values.port ?? []).map((p) => ({ container_port: Number(p) })),
})) {
  const bar = "#".repeat(Math.floor(u.total_progress * 20)).padEnd(20);
  const phase = u.phase.replace(/^PHASE_/, "").padEnd(12);
  console.log(`[${bar}] ${(u.total_progress * 100).toFixed(1).padStart(5)}% ${phase} ${u.message}`);
  last = u;
}
client.close();
const result = last?.result;
if (!result) {
  console.error("stream ended without a result");
  process.exit(2);
}
for (const [name, url] of Object.entries(result.endpoints)) console.log(`endpoint ${name}: ${url}`);
if (!result.success) {
  console.error(`failed: ${result.message}`);
  for (const line of result.diagnostics?.log_tail ?? []) console.error(`  | ${line}`);
  process.exit(1);
}
