// The charts: results, failures and cancellations per minute and queue depth over the
// last hour, and the run-time distribution, drawn with uPlot (vendored, MIT) from
// /api/series, which the server counts from the event log. Refreshed at most every
// 3 s while events arrive, and every 30 s anyway (the window moves).
"use strict";

const CHART_MINUTES = 60;
const CHART_HEIGHT = 150;
// A count axis: whole numbers only.
const countAxis = { size: 44, values: (u, vals) => vals.map((v) => Number.isInteger(v) ? v : "") };
// The uPlot instances by name, and the series they were last given (for tests and
// for a person at the console).
window.__batchdbCharts = {};
let lastSeries = null;
let chartsTimer = null;
let chartsAt = 0;

function chartWidth(id) {
  return Math.max(240, $(id).clientWidth - 4);
}

// Run-time bucket labels: "≤ 5 ms" ... "> 1 h".
function bucketLabel(bounds, i) {
  const fmt = (s) => s < 1 ? Math.round(s * 1000) + " ms" : s < 60 ? s + " s" : s < 3600 ? s / 60 + " min" : s / 3600 + " h";
  return i < bounds.length ? "≤ " + fmt(bounds[i]) : "> " + fmt(bounds[bounds.length - 1]);
}

function makeCharts(s) {
  const xs = s.time.map((t) => t / 1000);
  // Lines with a dot on every minute that counted something.
  const line = (label, stroke, fill) => ({ label, stroke, fill, width: 2,
    points: { show: true, size: 6, fill: stroke,
      filter: (u, si) => u.data[si].flatMap((v, i) => v > 0 ? [i] : []) } });
  const bars = uPlot.paths.bars({ size: [0.7, 40] });
  const counts = { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max)] } };
  window.__batchdbCharts.throughput = new uPlot({
    width: chartWidth("chart-throughput"), height: CHART_HEIGHT, scales: counts,
    series: [{}, line("results", "#1a8a4a", "rgba(26,138,74,.12)"),
      line("failures", "#c0392b", "rgba(192,57,43,.10)"), line("cancelled", "#7a7f8c")],
    axes: [{}, countAxis],
  }, [xs, s.results, s.failures, s.cancelled], $("chart-throughput"));
  window.__batchdbCharts.depth = new uPlot({
    width: chartWidth("chart-depth"), height: CHART_HEIGHT, scales: counts,
    series: [{}, line("not ended", "#1d6fd6", "rgba(29,111,214,.15)")],
    axes: [{}, countAxis],
  }, [xs, s.depth], $("chart-depth"));
  const idx = s.runtime.counts.map((_, i) => i);
  window.__batchdbCharts.runtime = new uPlot({
    width: chartWidth("chart-runtime"), height: CHART_HEIGHT,
    scales: { x: { time: false, range: [-0.5, idx.length - 0.5] }, y: counts.y },
    series: [{ label: "run time", value: (u, v) => v == null ? "" : bucketLabel(s.runtime.bounds, v) },
      { label: "runs", stroke: "#2f6fde", fill: "rgba(47,111,222,.55)", paths: bars, points: { show: false } }],
    axes: [{ values: (u, vals) => vals.map((v) => Number.isInteger(v) ? bucketLabel(s.runtime.bounds, v) : ""),
      rotate: 0, space: 60, gap: 4 }, countAxis],
  }, [idx, s.runtime.counts], $("chart-runtime"));
}

// Writes how many non-zero points each chart holds, for a test (or a person) to read.
function markPoints(s) {
  const nz = (a) => a.filter((v) => v > 0).length;
  $("chart-throughput").dataset.points = String(nz(s.results) + nz(s.failures) + nz(s.cancelled));
  $("chart-depth").dataset.points = String(nz(s.depth));
  $("chart-runtime").dataset.points = String(nz(s.runtime.counts));
  const total = s.results.reduce((a, b) => a + b, 0);
  const failed = s.failures.reduce((a, b) => a + b, 0);
  $("charts-summary").textContent = total + " results and " + failed + " failures in the last hour";
}

async function loadCharts() {
  chartsTimer = null;
  chartsAt = Date.now();
  let s;
  try { s = await getJSON("/api/series?minutes=" + CHART_MINUTES); } catch (e) { say("charts: " + e.message); return; }
  lastSeries = s;
  const c = window.__batchdbCharts;
  if (!c.throughput) {
    makeCharts(s);
  } else {
    const xs = s.time.map((t) => t / 1000);
    c.throughput.setData([xs, s.results, s.failures, s.cancelled]);
    c.depth.setData([xs, s.depth]);
    c.runtime.setData([s.runtime.counts.map((_, i) => i), s.runtime.counts]);
  }
  markPoints(s);
}

// Called for each event: at most one series request every 3 s.
function chartsSoon() {
  if (chartsTimer) return;
  chartsTimer = setTimeout(loadCharts, Math.max(0, 3000 - (Date.now() - chartsAt)));
}

function sizeCharts() {
  const c = window.__batchdbCharts;
  for (const [name, id] of [["throughput", "chart-throughput"], ["depth", "chart-depth"], ["runtime", "chart-runtime"]]) {
    if (c[name]) c[name].setSize({ width: chartWidth(id), height: CHART_HEIGHT });
  }
}

setInterval(() => { if (!chartsTimer) loadCharts(); }, 30000);
