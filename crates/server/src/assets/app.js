// The batchdb dashboard: loads the queue's state once, then follows /events (SSE)
// and refreshes the instances each event names. Everything is shown with
// textContent: job output and payloads are never parsed as HTML.
"use strict";

const base = document.querySelector('meta[name="batchdb-base"]').content;
let token = localStorage.getItem("batchdb-token") || "";
const MAX_OUTPUT = 1 << 20; // characters shown per stream
const KEEP_DONE = 100; // rows kept in the results and failures tables

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

async function api(method, path, body, type) {
  const r = await fetch(base + path, {
    method,
    headers: authHeaders(type ? { "Content-Type": type } : {}),
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

// ---- rows ---------------------------------------------------------------

// One model for every table, built from list rows or from /api/instance.
function fromList(kind, r) {
  if (kind === "pending") {
    return { id: r.id, job: r.job, created: r.created,
      state: r.running ? "running" : r.waiting ? "waiting" : "pending",
      priority: r.priority, run_at: r.run_at, attempts: r.attempts, batch: filter };
  }
  const v = r.value;
  const m = { id: v.id, job: r.key[0], created: v.created, start: v.start, end: v.end,
    attempts: v.attempts, exit_code: v.exit_code, stderr: v.stderr, batch: filter };
  if (kind === "result") return Object.assign(m, { state: "result", stdout: v.hash, cached: v.cached });
  return Object.assign(m, { state: kind === "cancelled" ? "cancelled" : "fail", stdout: v.stdout,
    message: v.message, signal: v.signal });
}

function fromDetail(d) {
  const a = d.attempts.length ? d.attempts[d.attempts.length - 1] : null;
  return { id: d.id, job: d.job, created: d.created, state: d.state, priority: d.priority,
    run_at: d.run_at, attempts: d.attempts.length, start: a && a.start, end: a && a.end,
    exit_code: a && a.exit_code, signal: a && a.signal, message: d.note || (a && a.message),
    batch: d.batch || null,
    stdout: a && a.stdout && a.stdout.hash, stderr: a && a.stderr && a.stderr.hash,
    cached: a && a.cached };
}

const time = (ms) => ms ? new Date(ms).toLocaleTimeString() : "";
const short = (h) => h ? h.slice(0, 12) + "…" : "";
function took(m) {
  if (!m.start || !m.end) return "";
  const s = (m.end - m.start) / 1000;
  return s < 60 ? s.toFixed(s < 10 ? 2 : 1) + " s" : Math.round(s / 60) + " min";
}

function cell(tr, text, cls, title) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  if (title) td.title = title;
  tr.appendChild(td);
  return td;
}

function button(td, label, cls, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = cls;
  b.addEventListener("click", action);
  td.appendChild(b);
  td.appendChild(document.createTextNode(" "));
}

const TABLE = { waiting: "pending", pending: "pending", running: "running", result: "results",
  fail: "failures", cancelled: "failures" };
const OPEN = new Set(["waiting", "pending", "running"]);
let filter = null; // the batch the tables show, if one was picked
const rows = new Map(); // instance id -> model

function render(m) {
  const tr = document.createElement("tr");
  tr.dataset.id = m.id;
  tr.dataset.state = m.state;
  cell(tr, m.id, "mono");
  cell(tr, short(m.job), "hash", m.job);
  if (m.state === "pending" || m.state === "waiting") {
    cell(tr, time(m.created));
    cell(tr, m.state === "waiting" ? "after its dependencies" : m.run_at > Date.now() ? time(m.run_at) : "now");
    cell(tr, m.priority);
  } else if (m.state === "running") {
    cell(tr, time(m.created));
    cell(tr, time(m.start));
    cell(tr, m.attempts);
  } else if (m.state === "result") {
    cell(tr, time(m.end));
    cell(tr, took(m) + (m.cached ? " (cached)" : ""));
    cell(tr, short(m.stdout), "hash", m.stdout);
  } else {
    cell(tr, time(m.end));
    const s = cell(tr, "");
    const b = document.createElement("span");
    b.className = "badge " + m.state;
    b.textContent = m.state;
    s.appendChild(b);
    cell(tr, m.message || "", "msg", m.message || "");
  }
  const act = cell(tr, "");
  if (m.state === "running" || (!OPEN.has(m.state) && m.attempts > 0)) {
    button(act, "output", "output", () => openOutput(m.id));
  }
  if (OPEN.has(m.state)) {
    button(act, "cancel", "cancel", () => act_on("cancel", m.id));
  }
  if (m.state === "fail" || m.state === "cancelled") {
    button(act, "retry", "retry", () => act_on("retry", m.id));
  }
  return tr;
}

// Places a row in the table its state belongs to, replacing any older one.
function place(m, flash) {
  const old = document.querySelector('table.rows tr[data-id="' + m.id + '"]');
  if (old) old.remove();
  rows.set(m.id, m);
  const table = $(TABLE[m.state]);
  if (!table || (filter && m.batch !== filter)) { empties(); return; }
  const body = table.tBodies[0];
  const tr = render(m);
  if (flash) tr.classList.add("flash");
  const done = !OPEN.has(m.state);
  // Pending and running: in push order. Ended: newest end first.
  let before = null;
  for (const other of body.rows) {
    const o = rows.get(Number(other.dataset.id));
    if (!o) continue;
    if (done ? (o.end || 0) < (m.end || 0) || ((o.end || 0) === (m.end || 0) && o.id < m.id) : o.id > m.id) {
      before = other;
      break;
    }
  }
  body.insertBefore(tr, before);
  if (done) while (body.rows.length > KEEP_DONE) body.deleteRow(body.rows.length - 1);
  empties();
}

function empties() {
  for (const p of document.querySelectorAll(".empty")) {
    p.hidden = $(p.dataset.for).tBodies[0].rows.length > 0;
  }
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
  if (!flushTimer) flushTimer = setTimeout(flush, 100);
}

async function flush() {
  flushTimer = null;
  const ids = [...dirty];
  dirty.clear();
  await Promise.all(ids.map(async (id) => {
    try {
      place(fromDetail(await getJSON("/api/instance/" + id)), true);
      if (output && output.id === id) showMeta(rows.get(id));
    } catch (e) { say("instance #" + id + ": " + e.message); }
  }));
}

async function loadCounts() {
  countsTimer = null;
  try {
    const c = await getJSON("/api/counts");
    for (const k of ["pending", "waiting", "running", "result", "fail", "cancelled"]) $("count-" + k).textContent = c[k];
  } catch (e) { say("counts: " + e.message); }
  try { showBatches(await getJSON("/api/batches")); } catch (e) { say("batches: " + e.message); }
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

// Shows only batch `name`'s instances (null: everything), reloading the tables.
function pick(name) {
  filter = name;
  $("filter").hidden = !name;
  $("filter-name").textContent = name || "";
  for (const id of ["pending", "running", "results", "failures"]) $(id).tBodies[0].textContent = "";
  rows.clear();
  pendingNext = null;
  loadRows().catch((e) => say("loading: " + e.message));
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
  };
}

let pendingNext = null;

const inBatch = () => filter ? "&batch=" + encodeURIComponent(filter) : "";

async function loadPending() {
  const page = await getJSON("/api/list/pending?limit=200" + inBatch() + (pendingNext ? "&after=" + pendingNext : ""));
  for (const r of page.rows) place(fromList("pending", r));
  pendingNext = page.next;
  $("pending-more").hidden = pendingNext == null;
}

// The tables: everything's newest, or one batch's rows.
async function loadRows() {
  await loadPending();
  // Running instances may sit past the first page of a long queue.
  const running = await getJSON("/api/list/pending?running=true&limit=100" + inBatch());
  for (const r of running.rows) place(fromList("pending", r));
  for (const kind of ["result", "fail", "cancelled"]) {
    const recent = filter
      ? await getJSON("/api/list/" + kind + "?limit=" + KEEP_DONE + inBatch())
      : await getJSON("/api/recent/" + kind + "?limit=" + KEEP_DONE);
    for (const r of recent.rows) place(fromList(kind, r));
  }
  empties();
}

async function load() {
  try {
    lastEvent = (await getJSON("/api/last-event")).id;
    await loadRows();
    await loadCounts();
    empties();
    follow();
  } catch (e) {
    say("loading: " + e.message);
    $("live").textContent = "offline";
  }
}

// ---- output -------------------------------------------------------------

let output = null; // { id, source }

function showMeta(m) {
  if (!m) return;
  const parts = ["state " + m.state, "job " + m.job, "pushed " + time(m.created)];
  if (m.attempts) parts.push("attempts " + m.attempts);
  if (m.exit_code != null) parts.push("exit code " + m.exit_code);
  if (m.signal != null) parts.push("signal " + m.signal);
  if (m.message) parts.push(m.message);
  $("output-meta").textContent = parts.join(" · ");
  for (const s of ["stdout", "stderr"]) {
    const a = $(s + "-link");
    a.hidden = !m[s];
    if (m[s]) a.href = withToken(base + "/blob/" + m[s]);
  }
}

function append(pre, text) {
  if (pre.textContent.length >= MAX_OUTPUT) return;
  const room = MAX_OUTPUT - pre.textContent.length;
  pre.appendChild(document.createTextNode(text.length > room ? text.slice(0, room) + "\n… (cut here; download the blob for the rest)" : text));
  pre.scrollTop = pre.scrollHeight;
}

function closeOutput() {
  if (output && output.source) output.source.close();
  output = null;
  $("output-panel").hidden = true;
  document.querySelector("main").classList.remove("with-output");
}

async function openOutput(id) {
  closeOutput();
  output = { id, source: null };
  $("output-panel").hidden = false;
  document.querySelector("main").classList.add("with-output");
  $("output-title").textContent = "#" + id;
  $("stdout").textContent = "";
  $("stderr").textContent = "";
  try {
    const m = fromDetail(await getJSON("/api/instance/" + id));
    rows.set(id, Object.assign(rows.get(id) || {}, m));
    showMeta(m);
  } catch (e) { say("instance #" + id + ": " + e.message); }
  const src = new EventSource(withToken(base + "/api/output/" + id));
  output.source = src;
  src.addEventListener("attempt", () => { $("stdout").textContent = ""; $("stderr").textContent = ""; });
  src.addEventListener("stdout", (e) => append($("stdout"), JSON.parse(e.data).text));
  src.addEventListener("stderr", (e) => append($("stderr"), JSON.parse(e.data).text));
  src.addEventListener("end", () => { src.close(); refresh(id); });
  src.addEventListener("error", (e) => {
    src.close();
    if (e.data) say("output of #" + id + ": " + e.data);
  });
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
  $("output-close").addEventListener("click", closeOutput);
  $("pending-more").addEventListener("click", () => loadPending().catch((e) => say(e.message)));
  $("filter-clear").addEventListener("click", () => pick(null));
  $("token").value = token;
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    if (token) localStorage.setItem("batchdb-token", token); else localStorage.removeItem("batchdb-token");
    $("token-box").open = false;
    say("token saved", true);
    for (const t of document.querySelectorAll("table.rows tbody")) t.textContent = "";
    rows.clear();
    pendingNext = null;
    load();
  });
  load();
});
