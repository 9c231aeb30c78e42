// Opens the dashboard, starts a deployment from its form, watches the phases advance,
// reloads mid-deployment (the log continues with no line twice), follows the endpoint
// link of the result and saves a screenshot. Usage: node dashboard.mjs BASE_URL APP IMAGE SHOT
import { chromium } from "playwright-core";

const [base, app, image, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
});
const fail = (msg) => { throw new Error(msg); };
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
  page.on("pageerror", (e) => fail(`page error: ${e}`));
  await page.goto(base + "/");
  await page.waitForSelector("#apps");
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
} finally {
  await browser.close();
}
