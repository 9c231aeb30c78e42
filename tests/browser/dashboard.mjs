// Opens the dashboard, starts a deployment from its form, watches the phases advance,
// reloads mid-deployment (the log continues with no line twice), follows the endpoint
// link of the result and saves a screenshot. Then, with a deployment of APP-s running:
// a read-only token sees no Cancel, no Remove and no deploy form; the deploy token sees
// them, cancels it, and removes APP from the page, following the removal to its end.
// Usage: READ_TOKEN=… DEPLOY_TOKEN=… node dashboard.mjs BASE_URL APP IMAGE SHOT
import { chromium } from "playwright-core";

const [base, app, image, shot] = process.argv.slice(2);
const { READ_TOKEN: readToken, DEPLOY_TOKEN: deployToken } = process.env;
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
});
const fail = (msg) => { throw new Error(msg); };
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
  page.on("pageerror", (e) => fail(`page error: ${e}`));
  page.on("dialog", (d) => d.accept()); // the confirmations of Cancel and Remove
  const useToken = async (t) => {
    await page.fill("#token", t);
    await page.click("#token-form button[type=submit]");
  };
  await page.goto(base + "/");
  await useToken(deployToken);
  await page.waitForSelector("#deploy-form");
  await page.fill("#deploy-form [name=app]", app);
  await page.fill("#deploy-form [name=image]", image);
  await page.fill("#deploy-form [name=port]", "8080");
  await page.click("#deploy-form button[type=submit]");
  await page.waitForURL(/\/deployments\/[0-9a-f-]+$/, { timeout: 30000 });
  // Phases advance: the first log line, then reload while it runs.
  await page.waitForSelector("#log div", { timeout: 60000 });
  await page.reload();
  await page.waitForSelector("#result:not([hidden])", { timeout: 180000 });
  const lines = await page.$$eval("#log div", (ds) => ds.map((d) => d.textContent));
  const seen = new Set();
  for (const l of lines) { if (seen.has(l)) fail(`a log line shows twice: ${l}`); seen.add(l); }
  const done = await page.$$eval(".stepper li.done", (ls) => ls.map((l) => l.dataset.phase));
  for (const p of ["PHASE_VALIDATING", "PHASE_STARTING", "PHASE_COMPLETE"]) if (!done.includes(p)) fail(`phase ${p} not shown done: ${done}`);
  if (done.includes("PHASE_HOOKS")) fail(`a phase that never ran is shown done: ${done}`);
  if ((await page.textContent("#result")).includes("null")) fail("the result card shows null");
  if ((await page.textContent("#state")) !== "COMPLETE") fail(`state: ${await page.textContent("#state")}`);
  if ((await page.textContent("#conn")) !== "ended") fail(`connection: ${await page.textContent("#conn")}`);
  const href = await page.getAttribute("#endpoints a.endpoint", "href");
  if (!href) fail("no endpoint link");
  await page.screenshot({ path: shot, fullPage: true });
  const r = await fetch(href);
  if (r.status !== 200) fail(`endpoint ${href} answered ${r.status}`);
  console.log(`ok: ${lines.length} log lines, phases done ${done.join(",")}, endpoint ${href}, screenshot ${shot}`);

  // A deployment that stays in HEALTH_CHECK (its health never settles).
  const slow = await fetch(`${base}/v1/deployments`, {
    method: "POST",
    headers: { Authorization: `Bearer ${deployToken}`, "Content-Type": "application/json" },
    body: JSON.stringify({ app: `${app}-s`, image: "stevedore-test/slowhealth:1", ports: [{ containerPort: 8080 }], healthCheck: { docker: {}, timeout: "300s" } }),
  });
  if (slow.status !== 202) fail(`deploy of ${app}-s: ${slow.status} ${await slow.text()}`);
  const slowId = (await slow.json()).deploymentId;
  const viewRendered = async () => { await page.waitForSelector("#log div", { timeout: 60000 }); await page.waitForSelector("#state:not(:empty)"); };

  // Read-only: no Cancel on a running deployment, no Remove, no deploy form.
  await useToken(readToken);
  await page.goto(`${base}/deployments/${slowId}`);
  await viewRendered();
  if (await page.$("#cancel")) fail("a read-only token is shown Cancel");
  await page.goto(base + "/");
  await page.waitForSelector(`#apps td >> text=${app}`);
  if ((await page.$$("button.remove")).length) fail("a read-only token is shown Remove");
  if (await page.$("#deploy-form")) fail("a read-only token is shown the deploy form");

  // Deploy token: Cancel is there and cancels.
  await useToken(deployToken);
  await page.goto(`${base}/deployments/${slowId}`);
  await viewRendered();
  await page.click("#cancel:not([hidden])");
  await page.waitForSelector("#result:not([hidden])", { timeout: 120000 });
  if ((await page.textContent("#state")) !== "CANCELLED") fail(`after Cancel: ${await page.textContent("#state")}`);

  // Remove is there; the removal is followed live to its end, and the app is gone.
  await page.goto(base + "/");
  await page.click(`button.remove[data-app="${app}"]`);
  await page.waitForURL(/\/deployments\/[0-9a-f-]+$/, { timeout: 30000 });
  await page.waitForSelector("#result:not([hidden])", { timeout: 120000 });
  if ((await page.textContent("#state")) !== "COMPLETE") fail(`removal: ${await page.textContent("#state")}`);
  const removed = await page.textContent("#removed");
  if (!/^[1-9]\d* container\(s\) removed/.test(removed)) fail(`removal result: ${removed}`);
  const steps = await page.$$eval(".stepper li.done", (ls) => ls.map((l) => l.dataset.phase));
  for (const p of ["PHASE_SWITCHING", "PHASE_CLEANUP", "PHASE_COMPLETE"]) if (!steps.includes(p)) fail(`removal phase ${p} not shown done: ${steps}`);
  const log = await page.$$eval("#log div", (ds) => ds.map((d) => d.textContent).join("\n"));
  if (!log.includes("removed container")) fail(`removal log: ${log}`);
  await page.goto(base + "/");
  await page.waitForSelector(`#apps td >> text=${app}-s`);
  if (await page.$(`button.remove[data-app="${app}"]`)) fail(`${app} is still listed after its removal`);
  console.log(`ok: Cancel and Remove only for the deploy token; ${app}: ${removed}`);
} finally {
  await browser.close();
}
