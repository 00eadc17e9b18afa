// The instance panel: the payload, what it runs with (directory, environment,
// limits, needs, concurrency key), every attempt (exit code, signal, times, outcome,
// peak memory and CPU), stdout and stderr (live while it runs, from /api/output), and a `batchdb show`
// command to copy. Payload and output are shown only as text.
"use strict";

const MAX_OUTPUT = 1 << 20; // characters shown per stream
const PAYLOAD_SHOWN = 64 * 1024; // bytes of the payload read for the panel

let panel = null; // { id, source }

function showMeta(m, d) {
  if (!m) return;
  const parts = ["state " + m.state, "job " + m.job, "pushed " + time(m.created)];
  if (d && d.batch) parts.push("batch " + d.batch);
  if (d && d.priority) parts.push("priority " + d.priority);
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

// Bytes as people read them: "12.3 MiB".
function bytes(n) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

// What an attempt used: "12.3 MiB · 0.04 s CPU" (empty where not measured).
function used(a) {
  if (a.max_rss == null) return "";
  return bytes(a.max_rss) + " · " + (a.cpu_ms / 1000).toFixed(2) + " s CPU";
}

// "k=v, k=v" of an object, or the value itself.
function pairs(v) {
  if (v == null || typeof v !== "object") return String(v);
  return Object.entries(v).map(([k, x]) => k + "=" + (typeof x === "object" ? JSON.stringify(x) : x)).join(", ");
}

// What it runs with, from the detail's cwd, env, limits, needs and concurrency (each
// there only when set).
function showContext(d) {
  const parts = [];
  const c = d || {};
  if (c.cwd) parts.push("cwd " + c.cwd);
  if (c.env && Object.keys(c.env).length) parts.push("env " + pairs(c.env));
  const l = c.limits || {};
  const limits = [];
  if (l.memory != null) limits.push("memory " + bytes(l.memory));
  if (l.millicpus != null) limits.push("cpus " + l.millicpus / 1000);
  if (l.pids != null) limits.push("pids " + l.pids);
  if (limits.length) parts.push("limits " + limits.join(", "));
  if (d && d.needs && Object.keys(d.needs).length) parts.push("needs " + pairs(d.needs));
  if (d && d.concurrency) parts.push("concurrency " + d.concurrency.key + "=" + d.concurrency.limit);
  $("output-context").textContent = parts.join(" · ");
  $("output-context").hidden = parts.length === 0;
}

function showAttempts(d) {
  const body = $("attempts").tBodies[0];
  body.textContent = "";
  for (const a of d.attempts) {
    const tr = document.createElement("tr");
    cell(tr, a.attempt, "mono");
    cell(tr, a.outcome || "running");
    cell(tr, a.exit_code != null ? a.exit_code : a.signal != null ? "signal " + a.signal : "", "mono");
    cell(tr, time(a.start));
    cell(tr, a.end ? span(a.end - a.start) : span(Date.now() - a.start) + " so far");
    cell(tr, used(a), "used");
    cell(tr, a.message || "", "msg", a.message || "");
    body.appendChild(tr);
  }
  $("attempts").hidden = d.attempts.length === 0;
  $("no-attempts").hidden = d.attempts.length > 0;
}

async function showPayload(job) {
  const pre = $("payload-text");
  pre.textContent = "";
  $("payload-link").href = withToken(base + "/blob/" + job);
  try {
    const r = await api("GET", "/blob/" + job, undefined, undefined,
      { Range: "bytes=0-" + (PAYLOAD_SHOWN - 1) });
    const text = await r.text();
    pre.textContent = text;
    $("payload-cut").hidden = r.status !== 206 || text.length < PAYLOAD_SHOWN - 4;
  } catch (e) { pre.textContent = "(payload not readable: " + e.message + ")"; }
}

function append(pre, text) {
  if (pre.textContent.length >= MAX_OUTPUT) return;
  const room = MAX_OUTPUT - pre.textContent.length;
  pre.appendChild(document.createTextNode(text.length > room ? text.slice(0, room) + "\n… (cut here; download the blob for the rest)" : text));
  pre.scrollTop = pre.scrollHeight;
}

function closePanel() {
  if (panel && panel.source) panel.source.close();
  panel = null;
  $("output-panel").hidden = true;
  document.querySelector("main").classList.remove("with-output");
  sizeCharts();
}

// Reads the instance again: its state, attempts and links.
async function refreshPanel() {
  if (!panel) return;
  const id = panel.id;
  try {
    const d = await getJSON("/api/instance/" + id);
    if (!panel || panel.id !== id) return;
    const m = fromDetail(d);
    rows.set(id, Object.assign(rows.get(id) || {}, m));
    $("output-state").className = "badge " + m.state;
    $("output-state").textContent = m.state;
    showMeta(m, d);
    showContext(d);
    showAttempts(d);
    return d;
  } catch (e) { say("instance #" + id + ": " + e.message); }
}

function followOutput(id) {
  const src = new EventSource(withToken(base + "/api/output/" + id));
  panel.source = src;
  src.addEventListener("attempt", () => { $("stdout").textContent = ""; $("stderr").textContent = ""; });
  src.addEventListener("stdout", (e) => append($("stdout"), JSON.parse(e.data).text));
  src.addEventListener("stderr", (e) => append($("stderr"), JSON.parse(e.data).text));
  src.addEventListener("end", () => { src.close(); refresh(id); });
  src.addEventListener("error", (e) => {
    src.close();
    if (e.data) say("output of #" + id + ": " + e.data);
  });
}

async function openPanel(id) {
  if (panel && panel.id === id) return;
  closePanel();
  panel = { id, source: null };
  $("output-panel").hidden = false;
  document.querySelector("main").classList.add("with-output");
  sizeCharts();
  $("output-title").textContent = "#" + id;
  $("show-cmd").textContent = "batchdb show id:" + id;
  for (const p of ["stdout", "stderr", "payload-text", "output-meta", "output-context", "output-state"]) $(p).textContent = "";
  const d = await refreshPanel();
  if (d && panel && panel.id === id) showPayload(d.job);
  if (panel && panel.id === id) followOutput(id);
}

async function copyShow() {
  const text = $("show-cmd").textContent;
  try {
    await navigator.clipboard.writeText(text);
    say("copied: " + text, true);
  } catch (_) {
    // No clipboard (an insecure origin): select the command for a manual copy.
    const range = document.createRange();
    range.selectNodeContents($("show-cmd"));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    say("selected: press Ctrl+C to copy", true);
  }
}
