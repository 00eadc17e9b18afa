// The batchdb dashboard: loads the first page of each table once, then follows
// /events (SSE). Each event refreshes only the instance it names (batched every
// 250 ms); a burst naming more than 40 instances at once reloads only the first page
// of each table instead, at most every 2 s. Rows, charts and the instance panel are in rows.js,
// charts.js and panel.js. Everything is shown with textContent: job output and
// payloads are never parsed as HTML.
"use strict";

const base = document.querySelector('meta[name="batchdb-base"]').content;
let token = localStorage.getItem("batchdb-token") || "";

const $ = (id) => document.getElementById(id);

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function withToken(url) {
  if (!token) return url;
  return url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(token);
}

async function api(method, path, body, type, headers) {
  const r = await fetch(base + path, {
    method,
    headers: authHeaders(Object.assign(type ? { "Content-Type": type } : {}, headers || {})),
    body,
  });
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    if (r.status === 401) $("token-box").open = true;
    throw new Error(msg + " (HTTP " + r.status + ")");
  }
  return r;
}

const getJSON = async (path) => (await api("GET", path)).json();

function say(text, ok) {
  const m = $("message");
  m.textContent = text;
  m.className = ok ? "ok" : "";
  m.hidden = !text;
  if (ok) setTimeout(() => { if (m.textContent === text) m.hidden = true; }, 4000);
}

async function act_on(what, id) {
  try {
    await api("POST", "/api/" + what + "/id:" + id);
    say(what === "cancel" ? "cancel requested for #" + id : "pushed #" + id + " again", true);
    refresh(id);
  } catch (e) {
    say(what + " #" + id + ": " + e.message);
  }
}

// ---- live updates -------------------------------------------------------

const dirty = new Set();
let flushTimer = null;
let countsTimer = null;

function refresh(id) {
  dirty.add(id);
  if (!flushTimer) flushTimer = setTimeout(flush, 250);
}

const BURST = 40; // instances per flush refreshed one by one; more reload first pages
const RELOAD_EVERY = 2000; // ms between two such reloads, however busy the queue
let lastReload = 0;
let reloadDue = false;

async function flush() {
  flushTimer = null;
  const ids = [...dirty];
  dirty.clear();
  if (ids.length > BURST || reloadDue) {
    const wait = lastReload + RELOAD_EVERY - Date.now();
    reloadDue = wait > 0;
    if (reloadDue) { flushTimer = setTimeout(flush, wait); return; }
    lastReload = Date.now();
    await reloadTables();
    if (panel && ids.includes(panel.id)) refreshPanel();
    return;
  }
  await Promise.all(ids.map(async (id) => {
    try {
      place(fromDetail(await getJSON("/api/instance/" + id)), true);
      if (panel && panel.id === id) refreshPanel();
    } catch (e) { say("instance #" + id + ": " + e.message); }
  }));
}

let counts = null; // the latest /api/counts

async function loadCountsOnly() {
  try {
    counts = await getJSON("/api/counts");
    for (const k of ["pending", "waiting", "running", "result", "fail", "cancelled"]) $("count-" + k).textContent = counts[k];
  } catch (e) { say("counts: " + e.message); }
}

async function loadBatches() {
  try { showBatches(await getJSON("/api/batches")); } catch (e) { say("batches: " + e.message); }
}

async function loadCounts() {
  countsTimer = null;
  await Promise.all([loadCountsOnly(), loadBatches()]);
}

// ---- batches ------------------------------------------------------------

function bar(b) {
  const div = document.createElement("div");
  div.className = "bar";
  div.title = b.result + " results, " + b.fail + " failed, " + b.cancelled + " cancelled, " +
    b.running + " running, " + b.waiting + " waiting, " + b.pending + " pending";
  for (const k of ["result", "fail", "cancelled", "running", "waiting"]) {
    const s = document.createElement("span");
    s.className = k;
    s.style.width = (b.total ? 100 * b[k] / b.total : 0) + "%";
    div.appendChild(s);
  }
  return div;
}

function showBatches(list) {
  const body = $("batches").tBodies[0];
  body.textContent = "";
  for (const b of list.slice(-50).reverse()) {
    const tr = document.createElement("tr");
    tr.dataset.batch = b.batch;
    const name = cell(tr, "");
    const a = document.createElement("a");
    a.className = "batch";
    a.textContent = b.batch;
    a.addEventListener("click", () => pick(b.batch));
    name.appendChild(a);
    cell(tr, "").appendChild(bar(b));
    cell(tr, (b.result + b.fail + b.cancelled) + "/" + b.total, "mono");
    cell(tr, b.running, "mono");
    cell(tr, b.waiting, "mono");
    cell(tr, b.fail + b.cancelled, "mono");
    const act = cell(tr, "");
    if (b.pending + b.waiting + b.running > 0) {
      button(act, "cancel", "cancel", () => batchAct("cancel", b.batch, ""));
    }
    if (b.fail + b.cancelled > 0) {
      button(act, "retry", "retry", () => batchAct("retry", b.batch, "?with_dependents=true"));
    }
    body.appendChild(tr);
  }
  empties();
}

async function batchAct(what, name, query) {
  try {
    await api("POST", "/api/" + what + "/batch:" + name + query);
    say(what + " of batch " + name + " done", true);
    countsSoon();
  } catch (e) {
    say(what + " batch " + name + ": " + e.message);
  }
}

function countsSoon() {
  if (!countsTimer) countsTimer = setTimeout(loadCounts, 200);
}

let events = null;
let lastEvent = 0;

function follow() {
  if (events) events.close();
  events = new EventSource(withToken(base + "/events?after=" + lastEvent));
  events.onopen = () => { $("live").textContent = "live"; $("live").className = "live on"; };
  events.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "live off"; };
  events.onmessage = (e) => {
    let ev;
    try { ev = JSON.parse(e.data); } catch (_) { return; }
    lastEvent = ev.id;
    if (ev.instance) refresh(ev.instance);
    countsSoon();
    chartsSoon();
  };
}

// Where the next page of each table starts (null: no more).
const next = { pending: null, results: null, failures: null, cancelled: null };

function listQuery(extra) {
  const q = new URLSearchParams(extra);
  if (filter.batch) q.set("batch", filter.batch);
  if (filter.text) q.set("text", filter.text);
  return q.toString();
}

async function loadPending(more) {
  const q = { limit: 200 };
  if (more && next.pending) q.after = next.pending;
  const page = await getJSON("/api/list/pending?" + listQuery(q));
  for (const r of page.rows) place(fromList("pending", r));
  next.pending = page.next;
  $("pending-more").hidden = next.pending == null;
}

// One page of ended rows, newest first: from the end of the event log, or (for one
// batch, whose rows the list finds by batch) in push order.
async function loadDone(kind, more) {
  const q = { limit: KEEP_DONE };
  const cursor = next[kind === "result" ? "results" : kind === "fail" ? "failures" : "cancelled"];
  if (more && cursor) q[filter.batch ? "after" : "before"] = cursor;
  const route = filter.batch ? "/api/list/" : "/api/recent/";
  const page = await getJSON(route + kind + "?" + listQuery(q));
  const table = kind === "result" ? "results" : "failures";
  if (more) keep[table] += page.rows.length;
  for (const r of page.rows) place(fromList(kind, r));
  next[kind === "result" ? "results" : kind === "fail" ? "failures" : "cancelled"] = page.next;
  $("results-more").hidden = next.results == null;
  $("failures-more").hidden = next.failures == null && next.cancelled == null;
}

// The tables' first pages: everything's newest, or one batch's rows.
async function loadRows(fresh) {
  // Running instances may sit past the first page of a long queue.
  const running = async () => {
    const page = await getJSON("/api/list/pending?" + listQuery({ running: true, limit: 100 }));
    for (const r of page.rows) place(fromList("pending", r));
    // List rows carry no start time: read the few running ones in full.
    if (page.rows.length <= BURST) for (const r of page.rows) refresh(r.id);
  };
  // Just after reading the counts, a state with none needs no read.
  const some = (k) => !fresh || !counts || counts[k] > 0;
  await Promise.all([some("pending") || some("waiting") ? loadPending(false) : null,
    some("running") ? running() : null].concat(
    ["result", "fail", "cancelled"].filter(some).map((k) => loadDone(k, false))));
  empties();
}

// Empties the tables and loads their first pages again.
async function reloadTables() {
  for (const id of ["pending", "running", "results", "failures"]) $(id).tBodies[0].textContent = "";
  rows.clear();
  keep.results = KEEP_DONE;
  keep.failures = KEEP_DONE;
  for (const k of Object.keys(next)) next[k] = null;
  try { await loadRows(false); } catch (e) { say("loading: " + e.message); }
}

async function load() {
  try {
    // The counts first: a state with no instances needs no table read.
    const [last] = await Promise.all([getJSON("/api/last-event"), loadCountsOnly()]);
    lastEvent = last.id;
    await Promise.all([loadRows(true), loadBatches(), loadCharts()]);
    empties();
    document.body.dataset.loaded = String(performance.now());
    follow();
  } catch (e) {
    say("loading: " + e.message);
    $("live").textContent = "offline";
  }
}

// ---- forms --------------------------------------------------------------

async function addJob(ev) {
  ev.preventDefault();
  const payload = $("payload").value;
  if (!payload.trim()) { say("write a job first"); return; }
  const q = new URLSearchParams();
  for (const k of ["priority", "delay", "timeout", "retries"]) {
    const v = $(k).value.trim();
    if (v !== "" && !(k === "priority" && v === "0")) q.set(k, v);
  }
  const qs = q.toString();
  $("add").disabled = true;
  try {
    const r = await api("POST", "/create" + (qs ? "?" + qs : ""), payload, "text/plain; charset=utf-8");
    const key = (await r.text()).trim();
    const id = Number(r.headers.get("x-batchdb-instance"));
    $("add-result").textContent = "pushed " + key + " as #" + id;
    if (id) refresh(id);
    countsSoon();
  } catch (e) {
    say("add: " + e.message);
  } finally {
    $("add").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("add-form").addEventListener("submit", addJob);
  $("output-close").addEventListener("click", closePanel);
  $("copy-show").addEventListener("click", copyShow);
  $("pending-more").addEventListener("click", () => loadPending(true).catch((e) => say(e.message)));
  $("results-more").addEventListener("click", () => loadDone("result", true).catch((e) => say(e.message)));
  $("failures-more").addEventListener("click", () => Promise.all(["fail", "cancelled"].map((k) => loadDone(k, true))).catch((e) => say(e.message)));
  $("filter-clear").addEventListener("click", () => pick(null));
  $("q").addEventListener("input", filterSoon);
  $("filter-bar").addEventListener("submit", (ev) => { ev.preventDefault(); applyFilter(); });
  $("state").addEventListener("change", applyFilter);
  window.addEventListener("resize", sizeCharts);
  $("token").value = token;
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    if (token) localStorage.setItem("batchdb-token", token); else localStorage.removeItem("batchdb-token");
    $("token-box").open = false;
    say("token saved", true);
    for (const t of document.querySelectorAll("table.rows tbody")) t.textContent = "";
    rows.clear();
    load();
  });
  load();
});
