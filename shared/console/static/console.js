"use strict";
// The console: a small static app on the admin API. The admin key lives in this tab's sessionStorage only; it is
// sent as a bearer token, never in a URL; no cookies.
const API = "/console/api";
const $ = (id) => document.getElementById(id);
let consumers = [], sortKey = "id", usageRows = [];

function key() { return sessionStorage.getItem("gateway-admin-key"); }

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + key() };
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                             credentials: "omit", cache: "no-store" });
  const data = await response.json();
  if (response.status === 401) { signOut(); }
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td; }
function head(table, names, onSort) {
  table.replaceChildren();
  const row = table.createTHead().insertRow();
  for (const name of names) {
    const th = document.createElement("th"); th.textContent = name; row.appendChild(th);
    if (onSort) th.addEventListener("click", () => onSort(name));
  }
  return table.createTBody();
}

function signOut() { sessionStorage.removeItem("gateway-admin-key"); $("app").hidden = true; $("signin").hidden = false; $("signout").hidden = true; $("who").textContent = ""; }

async function start() {
  try {
    const who = await api("GET", "/whoami");
    $("who").textContent = who.name + " (" + who.role + ")";
    $("signin").hidden = true; $("app").hidden = false; $("signout").hidden = false;
    refresh(); setInterval(refreshLive, 3000);
  } catch (error) { $("signin-error").textContent = error.message; signOut(); }
}

async function refresh() { await Promise.all([loadConsumers(), loadUsage(), loadAudit(), refreshLive()]); }
async function refreshLive() { if (key()) await Promise.all([loadTraffic(), loadBackends()]).catch(() => {}); }

async function loadConsumers() {
  consumers = (await api("GET", "/consumers")).data; renderConsumers();
}

function renderConsumers() {
  const query = $("search").value.toLowerCase();
  const body = head($("consumers"), ["id", "name", "enabled", "deployments", "tokens_per_minute", "quota", "key_prefix", ""],
                    (name) => { sortKey = name; renderConsumers(); });
  const shown = consumers.filter((c) => (c.id + " " + c.name).toLowerCase().includes(query))
                         .sort((a, b) => String(a[sortKey]).localeCompare(String(b[sortKey]), undefined, { numeric: true }));
  for (const c of shown) {
    const row = body.insertRow(); row.dataset.id = c.id;
    cell(row, c.id); cell(row, c.name); cell(row, c.enabled ? "yes" : "no");
    cell(row, Array.isArray(c.deployments) ? c.deployments.join(", ") : c.deployments);
    const tpm = cell(row, c.tokens_per_minute, "num"); cell(row, c.quota ? c.quota + " " + c.quota_period : "-", "num");
    cell(row, c.key_prefix);
    const actions = row.insertCell();
    const button = (label, action) => { const b = document.createElement("button"); b.textContent = label; b.className = label.toLowerCase();
                                        b.addEventListener("click", action); actions.appendChild(b); };
    button("Limit", async () => {
      const value = prompt("Tokens per minute for " + c.id + " (0: none)", c.tokens_per_minute);
      if (value !== null) await act(() => api("PATCH", "/consumers/" + c.id, { tokens_per_minute: Number(value) }));
    });
    button("Rotate", async () => {
      const grace = prompt("Seconds the old key keeps working", "0");
      if (grace !== null) await act(async () => showKey((await api("POST", "/consumers/" + c.id + "/rotate", { grace_seconds: Number(grace) })).key));
    });
    button(c.enabled ? "Disable" : "Enable", () => act(() => api("POST", "/consumers/" + c.id + (c.enabled ? "/disable" : "/enable"))));
    tpm.title = "tokens per minute";
  }
}

async function act(work) {
  $("consumer-error").textContent = "";
  try { await work(); } catch (error) { $("consumer-error").textContent = error.message; }
  await Promise.all([loadConsumers(), loadAudit()]);
}

function showKey(value) { $("new-key-value").textContent = value; $("new-key").hidden = false; }

async function loadUsage() {
  const usage = await api("GET", "/usage?period=" + $("period").value);
  usageRows = usage.usage;
  const body = head($("usage"), ["consumer", "deployment", "requests", "total_tokens", "cost" + (usage.currency ? " (" + usage.currency + ")" : "")]);
  for (const u of usageRows) {
    const row = body.insertRow();
    cell(row, u.consumer); cell(row, u.deployment); cell(row, u.requests, "num"); cell(row, u.total_tokens, "num");
    cell(row, u.cost.toFixed(4), "num");
  }
}

function exportCsv() {
  const lines = [["consumer", "deployment", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost"].join(",")];
  for (const u of usageRows) lines.push([u.consumer, u.deployment, u.requests, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost].join(","));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
  link.download = "usage-" + $("period").value + ".csv"; link.click();
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attributes) { const e = document.createElementNS(SVG, tag); for (const k in attributes) e.setAttribute(k, attributes[k]); return e; }

async function loadTraffic() {
  const traffic = await api("GET", "/traffic?minutes=5");
  const peak = Math.max(1, ...traffic.backends.flatMap((b) => b.requests));
  const charts = traffic.backends.map((b) => {
    const box = document.createElement("div"); box.className = "chart " + (b.ptu ? "ptu" : "paygo"); box.dataset.backend = b.id;
    const label = document.createElement("span"); label.className = "label"; label.textContent = b.id + (b.ptu ? " (PTU)" : "") + " · " + b.region;
    const width = 300, height = 48, n = b.requests.length, x = (i) => (i + 0.5) * width / n, y = (v) => height - 4 - (height - 10) * v / peak;
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, preserveAspectRatio: "none", role: "img" });
    chart.appendChild(svg("polyline", { class: "line", points: b.requests.map((v, i) => x(i) + "," + y(v)).join(" ") }));
    b.throttled.forEach((v, i) => { if (v) chart.appendChild(svg("path", { class: "throttle", d: "M" + x(i) + " 2 l3 6 h-6 z" })); });
    b.failovers.forEach((v, i) => { if (v) chart.appendChild(svg("circle", { class: "failover", cx: x(i), cy: height - 3, r: 2.5 })); });
    const sum = (a) => a.reduce((s, v) => s + v, 0);
    const total = document.createElement("span"); total.className = "total";
    total.textContent = sum(b.requests) + " req · " + sum(b.tokens) + " tok";
    box.append(label, chart, total); return box;
  });
  $("traffic").replaceChildren(...charts);
}

async function loadBackends() {
  const health = await api("GET", "/backends");
  const body = head($("backends"), ["backend", "region", "PTU", "deployment", "state", "recovers in", "capacity"]);
  for (const b of health.backends) for (const [name, d] of Object.entries(b.deployments)) {
    const row = body.insertRow();
    cell(row, b.id); cell(row, b.region); cell(row, b.ptu ? "yes" : "");
    cell(row, name); cell(row, d.state, "state-" + d.state);
    cell(row, d.recovers_in_s ? d.recovers_in_s.toFixed(0) + " s" : "");
    cell(row, d.capacity ? JSON.stringify(d.capacity) : "");
  }
}

async function loadAudit() {
  const entries = (await api("GET", "/audit?limit=20")).data;
  const body = head($("audit"), ["when", "who", "what", "target"]);
  for (const e of entries) { const row = body.insertRow(); cell(row, e.at); cell(row, e.actor); cell(row, e.action); cell(row, e.target); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault(); sessionStorage.setItem("gateway-admin-key", $("key").value.trim()); $("key").value = ""; start();
  });
  $("signout").addEventListener("click", signOut);
  $("search").addEventListener("input", renderConsumers);
  $("period").addEventListener("change", loadUsage);
  $("csv").addEventListener("click", exportCsv);
  $("copy-key").addEventListener("click", () => navigator.clipboard.writeText($("new-key-value").textContent));
  $("create-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const raw = $("c-deployments").value.trim();
    const document_ = { name: $("c-name").value, deployments: raw === "*" ? "*" : raw.split(",").map((d) => d.trim()).filter(Boolean) };
    if ($("c-tpm").value) document_.tokens_per_minute = Number($("c-tpm").value);
    await act(async () => { showKey((await api("POST", "/consumers", document_)).key); $("create-form").reset(); });
  });
  if (key()) start(); else signOut();
});
