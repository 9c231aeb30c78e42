// Stevedore dashboard: a client of the HTTP JSON API, nothing else. The token stays
// in this tab's sessionStorage and travels only in the Authorization header; event
// streams are read with fetch (not EventSource, which cannot send headers) and
// resumed with Last-Event-ID after the last event shown, so no line repeats.

const PHASES = ["QUEUED", "VALIDATING", "PULLING", "CREATING", "STARTING", "HEALTH_CHECK", "HOOKS", "SWITCHING", "CLEANUP", "COMPLETE"];
// A removal (RemoveApp) goes through these, SWITCHING stopping and CLEANUP removing.
const REMOVAL_PHASES = [["QUEUED", "queued"], ["SWITCHING", "stopping"], ["CLEANUP", "removing"], ["COMPLETE", "complete"]];
const REMOVAL = "OPERATION_REMOVE_APP";
const TERMINAL = new Set(["PHASE_COMPLETE", "PHASE_FAILED", "PHASE_CANCELLED"]);
const main = document.getElementById("main");

const token = () => sessionStorage.getItem("stevedore.token") || "";
const headers = (extra = {}) => (token() ? { ...extra, Authorization: `Bearer ${token()}` } : extra);

// Who the token is (GET /v1/whoami), asked once per token: Deploy, Cancel and Remove
// are shown only to a caller with the deploy scope.
let identity = null;
async function whoami() {
  if (!identity || identity.token !== token()) {
    const me = await api("GET", "/v1/whoami").catch((e) => { showError(e.message); return { scopes: [] }; });
    identity = { token: token(), scopes: me.scopes || [] };
  }
  return identity;
}
const mayDeploy = async () => (await whoami()).scopes.includes("deploy");

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

function showError(msg) {
  const e = document.getElementById("error");
  e.textContent = msg || "";
  e.hidden = !msg;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const data = r.status === 204 ? null : await r.json().catch(() => null);
  if (!r.ok) throw new Error(data ? `${data.code}: ${data.message}` : `HTTP ${r.status}`);
  return data;
}

const short = (s) => (s || "").replace(/^(DEPLOYMENT_STATE_|PHASE_|LEVEL_)/, "");
const secs = (d) => (d ? parseFloat(d) : 0);
const fmtSecs = (s) => (s < 60 ? `${s.toFixed(1)}s` : `${Math.floor(s / 60)}m${Math.round(s % 60)}s`);
const fmtBytes = (n) => { n = Number(n || 0); const u = ["B", "KB", "MB", "GB"]; let i = 0; while (n >= 1024 && i < 3) { n /= 1024; i++; } return `${n.toFixed(i ? 1 : 0)} ${u[i]}`; };
const when = (t) => (t ? new Date(t).toLocaleString() : "");
const links = (endpoints) => Object.entries(endpoints || {}).map(([k, url]) => h("a", { href: url, target: "_blank", rel: "noopener", class: "endpoint" }, `${k} → ${url}`));

function setConn(state) {
  const c = document.getElementById("conn");
  c.dataset.state = state;
  c.textContent = state === "idle" ? "" : state;
}

// ---------------------------------------------------------------- overview

async function overview() {
  setConn("idle");
  const canDeploy = await mayDeploy();
  const apps = h("section", { id: "apps" }, h("h2", {}, "Apps"), h("p", { class: "muted" }, "loading…"));
  const recent = h("section", { id: "deployments" }, h("h2", {}, "Recent deployments"));
  main.replaceChildren(...[apps, canDeploy ? deployForm() : null, recent].filter((c) => c));
  loadApps(apps, canDeploy);
  loadDeployments(recent);
}

async function loadApps(section, canDeploy) {
  try {
    const { apps = [] } = await api("GET", "/v1/apps");
    const rows = apps.map((a) => h("tr", {},
      h("td", {}, a.app),
      h("td", {}, a.current ? [a.current.image, h("br"), h("span", { class: "muted" }, `since ${when(a.current.since)}`)] : h("span", { class: "muted" }, "nothing running")),
      h("td", {}, a.current ? links(a.current.endpoints) : ""),
      h("td", {}, a.latest ? h("a", { href: `/deployments/${a.latest.deploymentId}`, class: `state-${a.latest.state}` }, short(a.latest.state)) : ""),
      h("td", {}, canDeploy ? h("button", { class: "remove", "data-app": a.app, onclick: () => removeApp(a.app) }, "Remove") : "")));
    section.replaceChildren(h("h2", {}, "Apps"), apps.length
      ? h("table", {}, h("tr", {}, h("th", {}, "App"), h("th", {}, "Running"), h("th", {}, "Endpoints"), h("th", {}, "Latest"), h("th", {})), rows)
      : h("p", { class: "muted" }, "No apps yet."));
  } catch (e) { showError(e.message); }
}

// The removal is an operation like a deployment (202 with its status): follow it.
async function removeApp(app) {
  if (!confirm(`Remove every container of ${app}? The history stays.`)) return;
  try {
    const removal = await api("DELETE", `/v1/apps/${encodeURIComponent(app)}`);
    navigate(`/deployments/${removal.deploymentId}`);
  } catch (e) { showError(e.message); }
}

function deployForm() {
  const app = h("input", { name: "app", placeholder: "app", required: true });
  const image = h("input", { name: "image", placeholder: "image", required: true, size: 40 });
  const port = h("input", { name: "port", placeholder: "container port", size: 8 });
  const form = h("form", { id: "deploy-form" }, app, " ", image, " ", port, " ", h("button", { type: "submit" }, "Deploy"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { app: app.value, image: image.value };
    if (port.value) body.ports = [{ containerPort: Number(port.value) }];
    try {
      const d = await api("POST", "/v1/deployments", body);
      navigate(`/deployments/${d.deploymentId}`);
    } catch (e) { showError(e.message); }
  });
  return h("section", {}, h("h2", {}, "Deploy"), form);
}

async function loadDeployments(section) {
  const app = h("input", { placeholder: "app", size: 12 });
  const state = h("select", {}, ["", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"].map((s) => h("option", { value: s }, s || "any state")));
  const table = h("table");
  const refresh = async () => {
    try {
      const q = new URLSearchParams({ app: app.value, state: state.value, page_size: "50" });
      const { deployments = [] } = await api("GET", `/v1/deployments?${q}`);
      table.replaceChildren(h("tr", {}, h("th", {}, "Deployment"), h("th", {}, "App"), h("th", {}, "Image"), h("th", {}, "State"), h("th", {}, "Created")),
        deployments.map((d) => h("tr", {},
          h("td", {}, h("a", { href: `/deployments/${d.deploymentId}` }, d.deploymentId.slice(0, 8))),
          h("td", {}, d.app), h("td", {}, d.operation === REMOVAL ? h("em", {}, "removal") : d.image),
          h("td", { class: `state-${d.state}` }, short(d.state), d.supersededBy ? h("span", { class: "muted" }, " (replaced)") : ""),
          h("td", {}, when(d.createdAt)))));
    } catch (e) { showError(e.message); }
  };
  app.addEventListener("change", refresh);
  state.addEventListener("change", refresh);
  section.replaceChildren(h("h2", {}, "Recent deployments"), h("div", {}, app, " ", state), table);
  refresh();
}

// ---------------------------------------------------------------- one deployment

let current = null; // the open deployment view; replaced on navigation

async function deploymentView(id) {
  if (current) current.abort.abort();
  const view = {
    id, abort: new AbortController(), last: 0, phaseStart: {}, phaseEnd: {}, phase: null,
    started: null, ended: false, layers: new Map(), pullSamples: [],
  };
  current = view;
  const el = (id) => document.getElementById(id);
  let s;
  try { s = await api("GET", `/v1/deployments/${id}`); } catch (e) { showError(e.message); return; }
  const canDeploy = await mayDeploy();
  if (view !== current) return;
  const removal = s.operation === REMOVAL;
  view.removal = removal;
  const phases = removal ? REMOVAL_PHASES : PHASES.map((p) => [p, p.replace("_", " ").toLowerCase()]);
  main.replaceChildren(
    h("section", {},
      h("h2", {}, removal ? `Removal of app ${s.app} ` : "Deployment ", h("code", {}, id)),
      h("div", {}, h("strong", { id: "state" }, "…"), " ", h("span", { id: "elapsed", class: "muted" }), " ",
        canDeploy ? h("button", { id: "cancel", hidden: true, onclick: () => cancel(id) }, "Cancel") : null),
      h("ol", { class: "stepper", id: "stepper" }, phases.map(([p, label]) => h("li", { "data-phase": `PHASE_${p}` }, label, h("span", { class: "dur" })))),
      h("div", {}, "Total ", h("span", { id: "total-pct" }, "0%")), h("div", { class: "bar" }, h("div", { id: "total-bar" })),
      h("div", { id: "phase-line", class: "muted" }),
      h("div", { id: "pull", hidden: true }, h("div", { id: "pull-line" }), h("div", { class: "bar" }, h("div", { id: "pull-bar" })), h("table", { class: "layers", id: "layers" }))),
    h("section", {}, h("h2", {}, "Log"), h("div", { class: "log", id: "log" })),
    h("section", { id: "result", hidden: true }),
  );
  view.started = s.createdAt ? new Date(s.createdAt) : new Date();
  el("state").textContent = short(s.state);
  el("state").className = `state-${s.state}`;
  // A removal can be cancelled only while it waits in the queue.
  if (el("cancel")) el("cancel").hidden = !!s.finishedAt || (removal && s.state !== "DEPLOYMENT_STATE_PENDING");
  const tick = setInterval(() => {
    if (view !== current || view.ended) return clearInterval(tick);
    el("elapsed").textContent = fmtSecs((Date.now() - view.started) / 1000);
  }, 250);
  follow(view);
}

async function cancel(id) {
  if (!confirm("Cancel this? What a deployment created is removed and the previous version keeps running; a queued removal removes nothing.")) return;
  try { await api("POST", `/v1/deployments/${id}/cancel`); } catch (e) { showError(e.message); }
}

// Reads the event stream; reconnects after the last event shown until the end.
async function follow(view) {
  let delay = 1000;
  while (!view.ended && view === current) {
    setConn(view.last ? "reconnecting" : "live");
    try {
      const r = await fetch(`/v1/deployments/${view.id}/events`, {
        headers: headers(view.last ? { "Last-Event-ID": String(view.last) } : {}),
        signal: view.abort.signal,
      });
      if (r.status === 204) { view.ended = true; break; }
      if (!r.ok) {
        const e = await r.json().catch(() => ({}));
        showError(`${e.code || r.status}: ${e.message || ""}`);
        if (r.status === 401 || r.status === 403 || r.status === 404) { view.ended = true; break; }
      } else {
        setConn("live");
        await readStream(r.body, view, (d) => { delay = d; });
      }
    } catch (e) {
      if (view.abort.signal.aborted) return;
    }
    if (!view.ended) await new Promise((res) => setTimeout(res, delay));
  }
  if (view === current) setConn("ended");
}

async function readStream(body, view, setRetry) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const ev = { event: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const [k, ...rest] = line.split(":");
        const v = rest.join(":").replace(/^ /, "");
        if (k === "id") ev.id = v; else if (k === "event") ev.event = v;
        else if (k === "data") ev.data += v; else if (k === "retry") setRetry(Number(v));
      }
      if (!ev.data) continue;
      const data = JSON.parse(ev.data);
      if (ev.event === "update" || ev.event === "result") {
        const seq = Number(ev.id);
        if (seq <= view.last) continue; // never show a line twice
        view.last = seq;
        apply(view, data);
        if (ev.event === "result") { view.ended = true; return; }
      } else if (ev.event === "out_of_range") {
        logLine("LEVEL_WARNING", `history before sequence ${data.oldest_sequence} is no longer held; continuing from there`);
        view.last = Number(data.oldest_sequence) - 1;
      } else if (ev.event === "error") {
        logLine("LEVEL_WARNING", `${data.code}: ${data.message}`);
      }
    }
  }
}

function logLine(level, text, t) {
  const log = document.getElementById("log");
  if (!log) return;
  const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  log.append(h("div", { class: `lv-${level}` }, t ? `${new Date(t).toLocaleTimeString()} ` : "", text));
  if (follow) log.scrollTop = log.scrollHeight;
}

function apply(view, u) {
  const el = (id) => document.getElementById(id);
  const t = u.timestamp ? new Date(u.timestamp) : new Date();
  if (u.phase && u.phase !== view.phase) {
    if (view.phase) view.phaseEnd[view.phase] = t;
    if (!TERMINAL.has(u.phase)) view.lastRunning = u.phase;
    view.phase = u.phase;
    view.phaseStart[u.phase] ??= t;
  }
  for (const li of el("stepper").children) {
    const p = li.dataset.phase;
    // Done: seen and left (a phase that never ran, e.g. hooks without hooks, stays plain).
    li.className = p === u.phase ? (u.phase === "PHASE_COMPLETE" ? "done" : "active") : view.phaseStart[p] ? "done" : "";
    if (TERMINAL.has(u.phase) && u.phase !== "PHASE_COMPLETE" && p === view.lastRunning) li.className = "failed";
    const s = view.phaseStart[p], e = view.phaseEnd[p];
    li.querySelector(".dur").textContent = s && e ? ` ${fmtSecs((e - s) / 1000)}` : "";
  }
  const pct = Math.round((u.totalProgress || 0) * 100);
  el("total-pct").textContent = `${pct}%`;
  el("total-bar").style.width = `${pct}%`;
  el("phase-line").textContent = `${short(u.phase)} ${Math.round((u.phaseProgress || 0) * 100)}%` + (u.metadata && u.metadata.milestone ? ` · milestone ${u.metadata.milestone}` : "") + (u.metadata && u.metadata.hook ? ` · hook ${u.metadata.hook}` : "");
  if (view.removal && u.phase !== "PHASE_QUEUED" && el("cancel")) el("cancel").hidden = true;
  if (u.pull) pull(view, u.pull, t);
  logLine(u.level || "LEVEL_INFO", u.message, u.timestamp);
  if (u.result) result(view, u);
}

function pull(view, p, t) {
  const el = (id) => document.getElementById(id);
  el("pull").hidden = false;
  const cur = Number(p.imageCurrentBytes || 0), tot = Number(p.imageTotalBytes || 0);
  view.pullSamples.push([t.getTime(), cur]);
  const first = view.pullSamples.find(([ts]) => t.getTime() - ts < 5000) || view.pullSamples[0];
  const rate = t.getTime() > first[0] ? ((cur - first[1]) * 1000) / (t.getTime() - first[0]) : 0;
  el("pull-line").textContent = `pulled ${fmtBytes(cur)} of ${fmtBytes(tot)} · ${fmtBytes(rate)}/s · layers ${p.layersDone || 0}/${p.layersTotal || 0}`;
  el("pull-bar").style.width = tot ? `${(cur / tot) * 100}%` : "0";
  if (p.layerId) view.layers.set(p.layerId, [Number(p.currentBytes || 0), Number(p.totalBytes || 0)]);
  el("layers").replaceChildren(...[...view.layers].map(([id, [c, tt]]) => {
    const bar = h("div");
    bar.style.width = tt ? `${(c / tt) * 100}%` : "0";
    return h("tr", {}, h("td", {}, h("code", {}, id.slice(0, 12)), " ", h("span", { class: "muted" }, `${fmtBytes(c)} / ${fmtBytes(tt)}`)), h("td", {}, h("div", { class: "bar" }, bar)));
  }));
}

function result(view, u) {
  const el = (id) => document.getElementById(id);
  const r = u.result;
  view.ended = true;
  el("state").textContent = short(u.phase);
  el("state").className = r.success ? "state-DEPLOYMENT_STATE_SUCCEEDED" : "state-DEPLOYMENT_STATE_FAILED";
  if (el("cancel")) el("cancel").hidden = true;
  el("elapsed").textContent = fmtSecs(secs(u.elapsed));
  const d = r.diagnostics;
  el("result").hidden = false;
  el("result").replaceChildren(...[
    h("h2", {}, r.success ? "Succeeded" : "Did not succeed"),
    h("p", {}, r.message),
    h("div", { id: "endpoints" }, links(r.endpoints)),
    r.containersRemoved ? h("p", { id: "removed" }, `${r.containersRemoved} container(s) removed`) : null,
    r.imageDigest ? h("p", { class: "muted" }, r.imageDigest) : null,
    (r.health || []).length ? h("ul", {}, r.health.map((c) => h("li", { class: c.healthy ? "healthy" : "unhealthy" }, `${c.check}: ${c.healthy ? "healthy" : "unhealthy"} after ${c.attempts || 0} attempt(s) ${c.message || ""}`))) : null,
    d ? h("div", {}, h("p", {}, `Failed in ${short(d.failedPhase)} at ${d.step}` + (d.exitCode !== undefined ? `, exit code ${d.exitCode}` : "") + (d.oomKilled ? ", killed: out of memory" : "")),
      (d.logTail || []).length ? h("pre", { class: "log" }, d.logTail.join("\n")) : null) : null,
  ].filter((c) => c !== null));
}

// ---------------------------------------------------------------- routing

function navigate(path) {
  history.pushState({}, "", path);
  route();
}

function route() {
  showError("");
  const m = location.pathname.match(/^\/deployments\/([0-9a-f-]+)$/);
  if (m) deploymentView(m[1]); else { if (current) current.abort.abort(); current = null; overview(); }
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a");
  if (a && a.origin === location.origin && !a.target && !ev.ctrlKey && !ev.metaKey) { ev.preventDefault(); navigate(a.pathname + a.search); }
});
window.addEventListener("popstate", route);
document.getElementById("token").value = token();
document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = document.getElementById("token").value.trim();
  if (v) sessionStorage.setItem("stevedore.token", v); else sessionStorage.removeItem("stevedore.token");
  route();
});
route();
