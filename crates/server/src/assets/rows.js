// The dashboard's tables: one row model built from list rows or /api/instance, the
// row rendering, and the filter (state, text in the preview, job key, batch).
// Every piece of payload or output text goes in with textContent, never as HTML.
"use strict";

const KEEP_DONE = 100; // rows kept in the results and failures tables per page loaded

// One model for every table, built from list rows or from /api/instance.
function fromList(kind, r) {
  if (kind === "pending") {
    return { id: r.id, job: r.job, created: r.created, preview: r.preview,
      state: r.running ? "running" : r.waiting ? "waiting" : "pending",
      priority: r.priority, run_at: r.run_at, attempts: r.attempts, batch: filter.batch };
  }
  const v = r.value;
  const m = { id: v.id, job: r.key[0], created: v.created, start: v.start, end: v.end,
    attempts: v.attempts, exit_code: v.exit_code, stderr: v.stderr, batch: filter.batch,
    preview: r.preview };
  if (kind === "result") return Object.assign(m, { state: "result", stdout: v.hash, cached: v.cached });
  return Object.assign(m, { state: kind === "cancelled" ? "cancelled" : "fail", stdout: v.stdout,
    message: v.message, signal: v.signal });
}

function fromDetail(d) {
  const a = d.attempts.length ? d.attempts[d.attempts.length - 1] : null;
  return { id: d.id, job: d.job, created: d.created, state: d.state, priority: d.priority,
    run_at: d.run_at, attempts: d.attempts.length, start: a && a.start, end: a && a.end,
    exit_code: a && a.exit_code, signal: a && a.signal, message: d.note || (a && a.message),
    batch: d.batch || null, preview: d.preview,
    stdout: a && a.stdout && a.stdout.hash, stderr: a && a.stderr && a.stderr.hash,
    cached: a && a.cached };
}

const time = (ms) => ms ? new Date(ms).toLocaleTimeString() : "";
const short = (h) => h ? h.slice(0, 12) + "…" : "";
function span(ms) {
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  return s < 3600 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h";
}
function took(m) {
  if (!m.start || !m.end) return "";
  return span(m.end - m.start);
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
  b.addEventListener("click", (ev) => { ev.stopPropagation(); action(); });
  td.appendChild(b);
  td.appendChild(document.createTextNode(" "));
}

// The job column: the payload's first line as text, the job key in the tooltip.
function jobCell(tr, m) {
  const td = cell(tr, "", "job", m.job);
  const p = document.createElement("span");
  p.className = "preview";
  p.textContent = m.preview == null ? short(m.job) : m.preview || "(empty payload)";
  const h = document.createElement("span");
  h.className = "hash";
  h.textContent = m.job ? m.job.slice(0, 8) : "";
  td.appendChild(p);
  td.appendChild(h);
  return td;
}

const TABLE = { waiting: "pending", pending: "pending", running: "running", result: "results",
  fail: "failures", cancelled: "failures" };
const OPEN = new Set(["waiting", "pending", "running"]);
// What the tables show: one batch (null: all), rows whose preview or job key matches
// `text`, and rows of one state group (`state`: "" for all).
const filter = { batch: null, text: "", state: "" };
const rows = new Map(); // instance id -> model

// Whether a row passes the filter the server applied to the loaded pages.
function visible(m) {
  if (filter.batch && m.batch !== filter.batch) return false;
  if (filter.state && filter.state !== m.state && !(filter.state === "pending" && m.state === "waiting")) return false;
  const t = filter.text.toLowerCase();
  if (!t) return true;
  return (m.job || "").startsWith(t) || (m.preview || "").toLowerCase().includes(t);
}

function render(m) {
  const tr = document.createElement("tr");
  tr.dataset.id = m.id;
  tr.dataset.state = m.state;
  cell(tr, m.id, "mono");
  jobCell(tr, m);
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
    const b = document.createElement("span");
    b.className = "badge " + m.state;
    b.textContent = m.state;
    cell(tr, "").appendChild(b);
    cell(tr, m.message || "", "msg", m.message || "");
  }
  const act = cell(tr, "");
  button(act, "open", "output", () => openPanel(m.id));
  if (OPEN.has(m.state)) button(act, "cancel", "cancel", () => act_on("cancel", m.id));
  if (m.state === "fail" || m.state === "cancelled") button(act, "retry", "retry", () => act_on("retry", m.id));
  tr.addEventListener("click", () => openPanel(m.id));
  return tr;
}

const keep = { results: KEEP_DONE, failures: KEEP_DONE };

// Places a row in the table its state belongs to, replacing any older one.
function place(m, flash) {
  const old = document.querySelector('table.rows tr[data-id="' + m.id + '"]');
  if (old) old.remove();
  rows.set(m.id, m);
  const table = $(TABLE[m.state]);
  if (!table || !visible(m)) { empties(); return; }
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
  if (done) while (body.rows.length > keep[table.id]) body.deleteRow(body.rows.length - 1);
  empties();
}

function empties() {
  for (const p of document.querySelectorAll(".empty")) {
    p.hidden = $(p.dataset.for).tBodies[0].rows.length > 0;
  }
}

const SECTIONS = { running: ["running"], pending: ["pending"], result: ["results"],
  fail: ["failures"], cancelled: ["failures"] };

// Applies the filter box: batch:NAME picks a batch, other text filters by preview or
// job key on the server; the state menu shows one table.
function applyFilter() {
  const raw = $("q").value.trim();
  const m = /^batch:(\S+)$/.exec(raw);
  filter.batch = m ? m[1] : null;
  filter.text = m ? "" : raw;
  filter.state = $("state").value;
  for (const id of ["running", "pending", "results", "failures"]) {
    const shown = !filter.state || SECTIONS[filter.state].includes(id);
    $(id).closest("section").hidden = !shown;
  }
  $("filter").hidden = !filter.batch && !filter.text;
  $("filter-name").textContent = filter.batch ? "batch " + filter.batch : "“" + filter.text + "”";
  reloadTables();
}

// Shows only batch `name`'s instances (null: everything), reloading the tables.
function pick(name) {
  $("q").value = name ? "batch:" + name : "";
  applyFilter();
}

let filterTimer = null;
function filterSoon() {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(applyFilter, 250);
}
