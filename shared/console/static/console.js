"use strict";
// The console: a small static app on the admin API. The admin key lives in this tab's sessionStorage only; it is
// sent as a bearer token, never in a URL; no cookies. Behind App Service Authentication (Easy Auth) no key is needed:
// the platform signs the user in and tells the gateway who it is.
const API = "/console/api";
const $ = (id) => document.getElementById(id);
let consumers = [], sortKey = "id", usageRows = [], mayWrite = false, easyAuth = false, lastTraffic = null, editing = null;

function key() { return sessionStorage.getItem("gateway-admin-key"); }

async function api(method, path, body) {
  const headers = { "x-requested-with": "gateway-console" };  // behind Easy Auth a change needs it (no cross-site forms)
  if (key()) headers.authorization = "Bearer " + key();
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                             credentials: "same-origin", cache: "no-store" });
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
const number = (v) => Number(v).toLocaleString("en-US");
const sum = (a) => a.reduce((s, v) => s + v, 0);

function signOut() {
  sessionStorage.removeItem("gateway-admin-key");
  $("app").hidden = true; $("signin").hidden = false; $("signout").hidden = true; $("who").textContent = "";
}

let timer = null;
async function start() {
  try {
    const who = await api("GET", "/whoami");
    mayWrite = who.may_write;
    $("who").textContent = who.name + " (" + who.role + ")";
    document.body.classList.toggle("reader", !mayWrite);
    for (const control of document.querySelectorAll(".write input, .write button")) control.disabled = !mayWrite;
    $("signin").hidden = true; $("app").hidden = false; $("signout").hidden = easyAuth;
    refresh(); if (timer === null) timer = setInterval(refreshLive, 3000);
  } catch (error) { $("signin-error").textContent = error.message; signOut(); }
}

async function refresh() { await Promise.all([loadConsumers(), loadUsage(), loadAudit(), refreshLive()]).catch(() => {}); }
async function refreshLive() {
  if (!key() && !easyAuth) return;
  await loadTraffic().catch(() => {});
  await loadBackends().catch(() => {});
}

// ---- consumers --------------------------------------------------------------------------------------------------

async function loadConsumers() { consumers = (await api("GET", "/consumers")).data; renderConsumers(); }

function renderConsumers() {
  const query = $("search").value.toLowerCase();
  const body = head($("consumers"), ["id", "name", "enabled", "deployments", "tokens_per_minute", "quota", "budget", "team",
                                     "priority", "key_prefix", ""], (name) => { sortKey = name; renderConsumers(); });
  const shown = consumers.filter((c) => (c.id + " " + c.name).toLowerCase().includes(query))
                         .sort((a, b) => String(a[sortKey]).localeCompare(String(b[sortKey]), undefined, { numeric: true }));
  for (const c of shown) {
    const row = body.insertRow(); row.dataset.id = c.id;
    cell(row, c.id); cell(row, c.name); cell(row, c.enabled ? "yes" : "no");
    cell(row, Array.isArray(c.deployments) ? c.deployments.join(", ") : c.deployments);
    cell(row, c.tokens_per_minute ? number(c.tokens_per_minute) : "-", "num tpm");
    cell(row, c.quota ? number(c.quota) + " " + c.quota_period : "-", "num");
    cell(row, c.budget ? c.budget + " " + c.budget_period : "-", "num");
    cell(row, c.team || "-"); cell(row, c.priority); cell(row, c.key_prefix);
    const actions = row.insertCell();
    const button = (label, action) => {
      const b = document.createElement("button"); b.textContent = label; b.className = label.toLowerCase();
      b.disabled = !mayWrite; if (!mayWrite) b.title = "needs the Gateway.Admin role";
      b.addEventListener("click", action); actions.appendChild(b);
    };
    button("Edit", () => openEdit(c));
    button("Rotate", () => { editing = c; $("r-id").textContent = c.id; $("r-grace").value = "0"; $("rotate").showModal(); });
    button(c.enabled ? "Disable" : "Enable", () => act(() => api("POST", "/consumers/" + c.id + (c.enabled ? "/disable" : "/enable"))));
  }
}

function openEdit(c) {
  editing = c;
  $("e-id").textContent = c.id; $("edit-error").textContent = "";
  $("e-tpm").value = c.tokens_per_minute; $("e-quota").value = c.quota; $("e-quota-period").value = c.quota_period || "";
  $("e-budget").value = c.budget; $("e-budget-period").value = c.budget ? c.budget_period : "";
  $("e-priority").value = c.priority; $("e-team").value = c.team || "";
  $("e-deployments").value = Array.isArray(c.deployments) ? c.deployments.join(", ") : c.deployments;
  $("e-fallback").value = c.fallback;
  $("edit").showModal();
}

function deployments(raw) { raw = raw.trim(); return raw === "*" ? "*" : raw.split(",").map((d) => d.trim()).filter(Boolean); }

async function saveEdit(event) {
  event.preventDefault();
  const change = {
    tokens_per_minute: Number($("e-tpm").value), quota: Number($("e-quota").value),
    quota_period: $("e-quota-period").value || null, budget: Number($("e-budget").value),
    budget_period: $("e-budget-period").value || null, priority: $("e-priority").value,
    team: $("e-team").value.trim() || null, deployments: deployments($("e-deployments").value), fallback: $("e-fallback").value,
  };
  try {
    await api("PATCH", "/consumers/" + editing.id, change);
    $("edit").close();
  } catch (error) { $("edit-error").textContent = error.message; return; }
  await Promise.all([loadConsumers(), loadAudit()]);
}

async function act(work) {
  $("consumer-error").textContent = "";
  try { await work(); } catch (error) { $("consumer-error").textContent = error.message; }
  await Promise.all([loadConsumers(), loadAudit()]);
}

function showKey(value) { $("new-key-value").textContent = value; $("new-key").hidden = false; }

// ---- usage ------------------------------------------------------------------------------------------------------

async function loadUsage() {
  const usage = await api("GET", "/usage?period=" + $("period").value);
  usageRows = usage.usage;
  const body = head($("usage"), ["consumer", "deployment", "requests", "total_tokens", "cost" + (usage.currency ? " (" + usage.currency + ")" : "")]);
  for (const u of usageRows) {
    const row = body.insertRow();
    cell(row, u.consumer); cell(row, u.deployment); cell(row, number(u.requests), "num"); cell(row, number(u.total_tokens), "num");
    cell(row, u.cost.toFixed(4), "num");
  }
  renderUsageChart();
}

function renderUsageChart() {
  // One bar per consumer, split by deployment; the longest bar spans the width.
  const measure = $("usage-measure").value;
  const byConsumer = new Map();
  for (const u of usageRows) {
    if (!byConsumer.has(u.consumer)) byConsumer.set(u.consumer, []);
    byConsumer.get(u.consumer).push(u);
  }
  const names = [...new Set(usageRows.map((u) => u.deployment))];
  const totals = [...byConsumer.entries()].map(([c, rows]) => [c, rows, sum(rows.map((r) => r[measure]))]).sort((a, b) => b[2] - a[2]);
  const peak = Math.max(1e-9, ...totals.map((t) => t[2]));
  const rows = totals.map(([consumer, parts, total]) => {
    const box = document.createElement("div"); box.className = "bar"; box.dataset.consumer = consumer;
    const label = document.createElement("span"); label.className = "label"; label.textContent = consumer;
    const chart = svg("svg", { viewBox: "0 0 400 16", preserveAspectRatio: "none", role: "img" });
    let x = 0;
    for (const part of parts) {
      const w = 400 * part[measure] / peak;
      const rect = svg("rect", { x, y: 1, width: w, height: 14, class: "series-" + (names.indexOf(part.deployment) % 6) });
      const title = svg("title", {}); title.textContent = part.deployment + ": " + number(part[measure]); rect.appendChild(title);
      chart.appendChild(rect); x += w;
    }
    const value = document.createElement("span"); value.className = "total";
    value.textContent = measure === "cost" ? total.toFixed(4) : number(total);
    box.append(label, chart, value); return box;
  });
  const legend = document.createElement("div"); legend.className = "legend";
  for (const [i, name] of names.entries()) {
    const item = document.createElement("span"); item.className = "swatch series-" + (i % 6); item.textContent = name; legend.appendChild(item);
  }
  $("usage-chart").replaceChildren(...rows, ...(names.length ? [legend] : []));
}

function exportCsv() {
  const lines = [["consumer", "deployment", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost"].join(",")];
  for (const u of usageRows) lines.push([u.consumer, u.deployment, u.requests, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost].join(","));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
  link.download = "usage-" + $("period").value + ".csv"; link.click();
}

// ---- live traffic -----------------------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attributes) { const e = document.createElementNS(SVG, tag); for (const k in attributes) e.setAttribute(k, attributes[k]); return e; }

function lineChart(values, peak, index) {
  // One series as a line over a light area, on a shared scale (`peak`), 10 s a point.
  const width = 600, height = 64, top = 12, bottom = 8, n = values.length;
  const x = (i) => (i + 0.5) * width / n, y = (v) => height - bottom - (height - top - bottom) * v / peak;
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, preserveAspectRatio: "none", role: "img" });
  chart.appendChild(svg("line", { class: "base", x1: 0, x2: width, y1: y(0), y2: y(0) }));
  const area = "M" + x(0) + "," + y(0) + " " + values.map((v, i) => "L" + x(i) + "," + y(v)).join(" ") + " L" + x(n - 1) + "," + y(0) + " Z";
  chart.appendChild(svg("path", { class: "area series-" + (index % 6), d: area }));
  chart.appendChild(svg("polyline", { class: "line series-" + (index % 6), points: values.map((v, i) => x(i) + "," + y(v)).join(" ") }));
  return { chart, x, height };
}

function chartRow(kind, id, title, subtitle, chart, headline, detail) {
  const box = document.createElement("div"); box.className = "chart " + kind; box.dataset[kind === "deployment" ? "deployment" : "backend"] = id;
  const label = document.createElement("span"); label.className = "label";
  const name = document.createElement("strong"); name.textContent = title;
  const where = document.createElement("small"); where.textContent = subtitle;
  label.append(name, where);
  const total = document.createElement("span"); total.className = "total";
  const big = document.createElement("strong"); big.textContent = headline;
  const small = document.createElement("small"); small.textContent = detail;
  total.append(big, small);
  box.append(label, chart, total); return box;
}

async function loadTraffic() {
  const traffic = await api("GET", "/traffic?minutes=5");
  lastTraffic = traffic;
  const peak = Math.max(1, ...traffic.backends.flatMap((b) => b.requests));
  const charts = traffic.backends.map((b, index) => {
    const { chart, x, height } = lineChart(b.requests, peak, index);
    b.throttled.forEach((v, i) => { if (v) chart.appendChild(svg("path", { class: "throttle", d: "M" + x(i) + " 1 l5 9 h-10 z" })); });
    b.failovers.forEach((v, i) => { if (v) chart.appendChild(svg("circle", { class: "failover", cx: x(i), cy: height - 4, r: 3.5 })); });
    return chartRow(b.ptu ? "ptu" : "paygo", b.id, b.id, (b.ptu ? "PTU · " : "pay-as-you-go · ") + b.region, chart,
                    number(sum(b.requests)) + " req",
                    number(sum(b.tokens)) + " tokens · " + sum(b.throttled) + " × 429 · " + sum(b.failovers) + " failovers");
  });
  $("traffic").replaceChildren(...charts);
  // Model fallbacks: requests no region of a deployment could take, served by the next deployment of its chain.
  const deployments = traffic.deployments || [];
  const fallbackPeak = Math.max(1, ...deployments.flatMap((d) => d.fallbacks));
  const rows = deployments.map((d, index) => chartRow("deployment", d.id, d.id, "fell back to its chain", lineChart(d.fallbacks, fallbackPeak, index + 3).chart,
                                                      number(sum(d.fallbacks)) + " fallbacks", "in the last 5 minutes"));
  if (!rows.length) { const none = document.createElement("p"); none.className = "quiet"; none.textContent = "None in the last 5 minutes."; rows.push(none); }
  $("fallbacks").replaceChildren(...rows);
}

// ---- backends ---------------------------------------------------------------------------------------------------

function capacityText(capacity, backendId, deployment) {
  // PTU utilisation: this deployment's tokens on this backend over the last minute (every instance), against what it
  // is known (learnt) or said (stated) to hold.
  if (!capacity) return "";
  const limit = capacity.learnt_tokens_per_minute || capacity.stated_tokens_per_minute;
  const parts = [];
  if (capacity.learnt_tokens_per_minute) parts.push("learnt " + number(capacity.learnt_tokens_per_minute) + " TPM");
  else if (capacity.stated_tokens_per_minute) parts.push("stated " + number(capacity.stated_tokens_per_minute) + " TPM");
  const series = lastTraffic && lastTraffic.backends.find((b) => b.id === backendId);
  const used = series && series.deployment_tokens ? series.deployment_tokens[deployment] || [] : [];
  if (series && limit) parts.push(Math.round(100 * sum(used.slice(-6)) / limit) + "% used last minute");
  if (capacity.instance_share_tokens_per_minute) parts.push("this instance " + number(capacity.instance_share_tokens_per_minute) + " TPM");
  if (capacity.diverted) parts.push(number(capacity.diverted) + " diverted");
  if (capacity.last_429_age_s !== undefined) parts.push("last 429 " + capacity.last_429_age_s + " s ago");
  return parts.join(" · ");
}

async function loadBackends() {
  const health = await api("GET", "/backends");
  const body = head($("backends"), ["backend", "region", "PTU", "deployment", "state", "recovers in", "capacity and utilisation"]);
  for (const b of health.backends) for (const [name, d] of Object.entries(b.deployments)) {
    const row = body.insertRow();
    cell(row, b.id); cell(row, b.region); cell(row, b.ptu ? "yes" : "");
    cell(row, name); cell(row, d.state, "state-" + d.state);
    cell(row, d.recovers_in_s ? d.recovers_in_s.toFixed(0) + " s" : "");
    cell(row, capacityText(d.capacity, b.id, name), "capacity");
  }
}

async function loadAudit() {
  const entries = (await api("GET", "/audit?limit=20")).data;
  const body = head($("audit"), ["when", "who", "what", "target"]);
  for (const e of entries) { const row = body.insertRow(); cell(row, e.at); cell(row, e.actor); cell(row, e.action); cell(row, e.target); }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault(); sessionStorage.setItem("gateway-admin-key", $("key").value.trim()); $("key").value = ""; start();
  });
  $("signout").addEventListener("click", signOut);
  $("search").addEventListener("input", renderConsumers);
  $("period").addEventListener("change", loadUsage);
  $("usage-measure").addEventListener("change", renderUsageChart);
  $("csv").addEventListener("click", exportCsv);
  $("copy-key").addEventListener("click", () => navigator.clipboard.writeText($("new-key-value").textContent));
  $("edit-form").addEventListener("submit", saveEdit);
  $("edit-cancel").addEventListener("click", () => $("edit").close());
  $("rotate-cancel").addEventListener("click", () => $("rotate").close());
  $("rotate-form").addEventListener("submit", async (event) => {
    event.preventDefault(); $("rotate").close();
    await act(async () => showKey((await api("POST", "/consumers/" + editing.id + "/rotate", { grace_seconds: Number($("r-grace").value) })).key));
  });
  $("create-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const document_ = { name: $("c-name").value, deployments: deployments($("c-deployments").value) };
    if ($("c-tpm").value) document_.tokens_per_minute = Number($("c-tpm").value);
    await act(async () => { showKey((await api("POST", "/consumers", document_)).key); $("create-form").reset(); });
  });
  try { easyAuth = (await (await fetch(API + "/signin", { cache: "no-store" })).json()).easy_auth === true; } catch (error) { easyAuth = false; }
  if (easyAuth || key()) start(); else signOut();
});
