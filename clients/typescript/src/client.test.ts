// End-to-end test of the TypeScript client against a running server and a real
// Docker engine. STEVEDORE_ADDR names the server (clients/typescript/test.sh starts one).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import { Stevedore, StevedoreError, type ProgressUpdate } from "./client.js";

const client = new Stevedore(process.env.STEVEDORE_ADDR ?? "127.0.0.1:50051");
const apps: string[] = [];
const uniqueApp = () => {
  const app = `t-ts-${randomUUID().replace(/-/g, "").slice(0, 10)}`;
  apps.push(app);
  return app;
};

after(() => {
  client.close();
  for (const app of apps) {
    const ids = execFileSync("docker", ["ps", "-aq", "--filter", `label=io.stevedore.app=${app}`])
      .toString()
      .split(/\s+/)
      .filter(Boolean);
    if (ids.length) execFileSync("docker", ["rm", "-f", ...ids]);
  }
});

test("deploy streams to PHASE_COMPLETE and the endpoint serves", async () => {
  const updates: ProgressUpdate[] = [];
  for await (const u of client.deploy({
    app: uniqueApp(),
    image: "stevedore-test/web:1",
    ports: [{ container_port: 8080 }],
  })) {
    updates.push(u);
  }
  assert.deepEqual(
    updates.map((u) => Number(u.sequence)),
    updates.map((_, i) => i + 1),
  );
  const totals = updates.map((u) => u.total_progress);
  assert.deepEqual(totals, [...totals].sort((a, b) => a - b));
  const last = updates[updates.length - 1];
  assert.equal(last.phase, "PHASE_COMPLETE");
  assert.equal(last.result?.success, true);
  const response = await fetch(last.result!.endpoints["8080/tcp"]);
  assert.equal((await response.text()).trim(), "v1");

  const status = await client.status(last.deployment_id);
  assert.equal(status.state, "DEPLOYMENT_STATE_SUCCEEDED");

  const replay: ProgressUpdate[] = [];
  for await (const u of client.watch(last.deployment_id, 3)) replay.push(u);
  assert.deepEqual(
    replay.map((u) => u.sequence),
    updates.slice(3).map((u) => u.sequence),
  );
});

test("bad input is INVALID_ARGUMENT naming the field", async () => {
  await assert.rejects(
    async () => {
      for await (const _ of client.deploy({ app: "Bad_Name", image: "stevedore-test/web:1" })) {
        // no update is expected
      }
    },
    (err: StevedoreError) => err.code === "INVALID_ARGUMENT" && err.details.startsWith("app:"),
  );
});

test("errors name the status", async () => {
  await assert.rejects(
    client.status(""),
    (err: StevedoreError) =>
      err instanceof StevedoreError && err.code === "INVALID_ARGUMENT" && err.message.includes("deployment_id"),
  );
});

test("list and cancel", async () => {
  const app = uniqueApp();
  // Holds in HEALTH_CHECK (a line never printed) until cancelled.
  const stream = client
    .deploy({
      app,
      image: "stevedore-test/web:1",
      ports: [{ container_port: 8080 }],
      health_check: { log: { pattern: "never-printed-7f3a" }, timeout: { seconds: 60 } },
    })
    [Symbol.asyncIterator]();
  const first = (await stream.next()).value as ProgressUpdate;
  const page = await client.list({ app });
  assert.deepEqual(
    page.deployments.map((d) => d.deployment_id),
    [first.deployment_id],
  );
  const status = await client.cancel(first.deployment_id);
  assert.equal(status.state, "DEPLOYMENT_STATE_CANCELLED");
  let last = first;
  for (let r = await stream.next(); !r.done; r = await stream.next()) last = r.value;
  assert.equal(last.phase, "PHASE_CANCELLED");
  await assert.rejects(
    client.cancel(first.deployment_id),
    (err: StevedoreError) => err.code === "FAILED_PRECONDITION",
  );
});
